"""Benchmarks: what token reduction buys end to end, against the roofline ideal and eager baselines.

One command runs everything and writes ``benchmarks/results/``::

    python -m benchmarks.run --suite all            # on a GPU machine (~8 minutes on an H100)
    python -m benchmarks.run --suite all --quick    # the same code, tiny configs, CPU (CI)

Modules:

* :mod:`benchmarks.reducer_overhead`: time per reducer call over a grid of shapes.
* :mod:`benchmarks.end_to_end`: TTFT, decode rate, memory and KV cache of real model
  classes at 7B sizes with random weights, for every reducer at its published stage.
* :mod:`benchmarks.attention_cost`: FastV / PyramidDrop run the way their official code
  runs them versus through tokenreduce (SDPA, attention rows recomputed).
* :mod:`benchmarks.roofline`: measured device peaks and the analytic FLOPs / bytes of a prefill.
* :mod:`benchmarks.report`: Markdown tables and PNG plots from the JSON results.
* :mod:`benchmarks.models`: the model configurations (published sizes) and fast random builds.
* :mod:`benchmarks.common`: run metadata, timing, JSON output, deadlines, progress.
"""
