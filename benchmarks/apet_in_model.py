"""ApET's own cost inside a VLM prefill, separated from everything the budget changes.

For each batch size and budget T the script times the prefill (time to first token) of a
randomly initialised LLaVA-1.5-7B-shaped model (``benchmarks/models.py``) with

* no reduction,
* ``random`` at the projector keeping T tokens (it does almost no work), and
* ``apet-llava`` at the projector keeping T tokens.

Both reduced settings send the same number of tokens through the decoder, so
``apet - random`` is what ApET itself adds to the prefill. ApET is also timed alone on the
very tokens the adapter hands it (captured with ``tokenreduce.observe``: bfloat16,
``(B, 576, 4096)``, called with an all-true mask, which costs one device read more than
the adapter's maskless call). The settings are timed in rotation
(none, random, apet, none, ...) so a drift of the machine hits them alike; each figure is
the median of ``--reps`` runs after a warm-up (which also captures ApET's CUDA graph).

Usage::

    python -m benchmarks.apet_in_model             # H100: LLaVA-1.5-7B shape, B 1 and 8
    python -m benchmarks.apet_in_model --quick     # tiny model on CPU (seconds; what CI runs)

Writes ``benchmarks/results/apet_in_model_<device>.json`` and ``.md`` and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

import tokenreduce
from tokenreduce import Pipeline, Stage, Step

from .common import command_line, run_meta, sync, time_call, write_json
from .models import build_model, make_inputs, model_specs

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = ("none", "random", "apet-llava")
WARMUP_ROUNDS = 3


def _pipeline(name: str, budget: int) -> Pipeline | None:
    if name == "none":
        return None
    return Pipeline([Step(Stage.PROJECTOR, tokenreduce.create(name, budget, stage=Stage.PROJECTOR))])


def _capture_reducer_input(model, kwargs: dict[str, Any], budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens and mask the adapter passes to ApET during one prefill."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def grab(reducer, tokens, valid, context, reduction):
        seen.append((tokens.clone(), valid.clone()))

    with torch.inference_mode(), tokenreduce.apply(model, _pipeline("apet-llava", budget)), tokenreduce.observe(grab):
        model(**kwargs, use_cache=True, logits_to_keep=1)
    return seen[0]


def measure(model, spec, batch: int, budgets: list[int], reps: int, device: str) -> list[dict[str, Any]]:
    inputs = make_inputs(spec, model.config, batch=batch, device=device, dtype=torch.bfloat16)
    kw = inputs.kwargs

    def prefill():
        return model(**kw, use_cache=True, logits_to_keep=1)

    rows = []
    for t in budgets:
        pipes = {name: _pipeline(name, t) for name in SETTINGS}
        times: dict[str, list[float]] = {name: [] for name in SETTINGS}
        with torch.inference_mode():
            # Warm-up, a few rounds: kernel choices, the allocator, ApET's graph capture, and
            # the host's clocks (at batch 1 the prefill is bound by the host's launch speed).
            for _ in range(WARMUP_ROUNDS):
                for name, pipe in pipes.items():
                    with tokenreduce.apply(model, pipe) if pipe else nullcontext():
                        prefill()
            sync(device)
            for _ in range(reps):
                for name, pipe in pipes.items():
                    with tokenreduce.apply(model, pipe) if pipe else nullcontext():
                        times[name] += time_call(prefill, device, reps=1, warmup=0)
        tokens, valid = _capture_reducer_input(model, kw, t)
        reducer = tokenreduce.create("apet-llava", t, stage=Stage.PROJECTOR)
        alone = time_call(lambda r=reducer, x=tokens, v=valid: r(x, mask=v), device, reps=max(reps, 20), warmup=3)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        row = {
            "batch": batch,
            "image_tokens": inputs.image_tokens,
            "budget": t,
            "ttft_none_ms": med["none"],
            "ttft_random_ms": med["random"],
            "ttft_apet_ms": med["apet-llava"],
            "apet_minus_random_ms": med["apet-llava"] - med["random"],
            "apet_alone_ms": statistics.median(alone),
            "reducer_input": {"shape": list(tokens.shape), "dtype": str(tokens.dtype).removeprefix("torch.")},
            "reps": reps,
            "spread_ms": {name: [min(ts), max(ts)] for name, ts in times.items()},
        }
        row["apet_share_of_reduced_prefill"] = row["apet_alone_ms"] / row["ttft_apet_ms"]
        row["speedup_apet"] = row["ttft_none_ms"] / row["ttft_apet_ms"]
        rows.append(row)
        print(
            f"B={batch} T={t}: none {med['none']:.1f} ms, random {med['random']:.1f} ms, apet {med['apet-llava']:.1f} ms, "
            f"apet alone {row['apet_alone_ms']:.2f} ms",
            flush=True,
        )
    return rows


COLUMNS = [
    ("batch", "B", "d"),
    ("budget", "T", "d"),
    ("ttft_none_ms", "TTFT none ms", ".1f"),
    ("ttft_random_ms", "TTFT random@T ms", ".1f"),
    ("ttft_apet_ms", "TTFT ApET@T ms", ".1f"),
    ("apet_minus_random_ms", "ApET - random ms", ".1f"),
    ("apet_alone_ms", "ApET alone ms", ".2f"),
    ("apet_share_of_reduced_prefill", "ApET alone / TTFT ApET", ".1%"),
    ("speedup_apet", "speed-up (none / ApET)", ".2f"),
]


def to_markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"# {meta['title']} on {meta['gpu'] or meta['device']}",
        "",
        f"torch {meta['torch']}, transformers {meta['transformers']}, bfloat16, sdpa, {meta['date']}; "
        f"command: `{meta['command']}`",
        "",
        "TTFT: median prefill time over the reps, settings timed in rotation. `random@T` keeps as many tokens "
        "as ApET and does almost no work, so `ApET - random` is ApET's own cost in the model; `ApET alone` "
        "times ApET on the tokens the adapter gives it (bfloat16), called with an all-true mask: one device "
        "read more than the adapter's call without a mask.",
        "",
        "| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        lines.append("| " + " | ".join(format(r[k], f) for k, _, f in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llava-1.5-7b", help="a LLaVA-1.5-family key of benchmarks/models.py")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 8 (quick: 1 2)")
    p.add_argument("--budgets", type=int, nargs="+", default=None, help="default: 64 128 192 (quick: 16)")
    p.add_argument("--reps", type=int, default=None, help="timed prefills per setting (default 20; quick 2)")
    p.add_argument("--quick", action="store_true", help="tiny model on CPU: the same code in seconds")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available, cpu with --quick)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: results/apet_in_model_<device>.json)")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    batches = args.batches or ([1, 2] if args.quick else [1, 8])
    budgets = args.budgets or ([16] if args.quick else [64, 128, 192])
    reps = args.reps or (2 if args.quick else 20)

    specs = {s.key: s for s in model_specs(args.quick)}
    if args.model not in specs or specs[args.model].family != "llava":
        allowed = ", ".join(k for k, s in specs.items() if s.family == "llava")
        raise SystemExit(f"--model={args.model!r} is not a LLaVA-1.5-family model; allowed: {allowed}")
    spec = specs[args.model]
    torch.manual_seed(0)
    model = build_model(spec, device=device, dtype=torch.bfloat16, quick=args.quick, seed=0)
    meta = run_meta(quick=args.quick, device=device, command=command_line(sys.argv[1:] if argv is None else argv, "benchmarks.apet_in_model"))
    rows = []
    for b in batches:
        rows += measure(model, spec, b, budgets, reps, device)
        sync(device)
    out = args.out or RESULTS / (f"apet_in_model_{device}{'_quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"title": f"ApET inside the prefill of {spec.title}", **meta, "results": rows})
    md = to_markdown({"title": f"ApET inside the prefill of {spec.title}", **meta}, rows)
    out.with_suffix(".md").write_text(md)
    sys.stdout.write(md)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
