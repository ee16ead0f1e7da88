"""Evaluation: lmms-eval benchmarks of reduced models, and label-free fidelity to the unreduced model.

* :mod:`~tokenreduce.evaluation.vlm`: a transformers VLM behind prompts, batched generation
  and continuation loss (no lmms-eval needed).
* :mod:`~tokenreduce.evaluation.fidelity`: ``tokenreduce fidelity`` (no lmms-eval needed).
* :mod:`~tokenreduce.evaluation.lmms`: the lmms-eval model ``tokenreduce`` (the ``[eval]`` extra).
* :mod:`~tokenreduce.evaluation.benchmark` and :mod:`~tokenreduce.evaluation.report`:
  ``tokenreduce eval``, the unreduced model and each pipeline over lmms-eval tasks in one table.

Nothing here imports lmms-eval until it is used.
"""

from __future__ import annotations

from typing import Any


def lmms_manifest() -> Any:
    """lmms-eval's model manifest for ``--model tokenreduce`` (entry point group ``lmms_eval.models``).

    Kept free of module-level lmms-eval imports: lmms-eval calls it while its own model
    registry is being built.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="tokenreduce", simple_class_path="tokenreduce.evaluation.lmms.TokenReduceLMM")


__all__ = ["lmms_manifest"]
