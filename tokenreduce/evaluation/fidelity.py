"""Fidelity of a reduced model to the unreduced one, without labels.

For each sample the unreduced model decodes a greedy answer ``A`` (at most
``max_new_tokens``, up to and including end-of-sequence). Then, on the same inputs:

* ``kl``: KL(unreduced || reduced) of the next-token distributions at every answer
  position, both models teacher-forced on ``A`` (mean over answer tokens; nats).
* ``top1``: fraction of answer positions where the reduced model's top-1 token is the
  unreduced greedy token.
* ``exact``: fraction of samples whose free-running greedy decode under reduction is
  identical to ``A``.
* per step: tokens before/after and the reconstruction error of the dropped tokens by the
  kept set (:func:`tokenreduce.metrics.reconstruction_error`: 0 = nothing lost, ~1 = the
  kept set explains nothing), measured on the features the step actually received.

A step that kept every token of every input it saw (a budget >= the model's ``N`` tokens,
e.g. ``--budgets 64`` on a model with 36 image tokens) reduced nothing: its row would show
KL 0 and agreement 1 as if the reduction were free. Such a step raises a
:class:`UserWarning` and is listed in :attr:`FidelityResult.warnings`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..metrics import reconstruction_error
from ..pipeline import Pipeline
from ..reducer import Reducer, observe
from .vlm import VLM, Sample


@dataclass
class StepFidelity:
    """One pipeline step: mean tokens per reduced unit and mean reconstruction error."""

    stage: str
    reducer: str
    layer: int | None
    tokens_before: float
    tokens_after: float
    reconstruction_error: float


@dataclass
class FidelityResult:
    """Fidelity of one pipeline over all samples."""

    name: str
    samples: int
    answer_tokens: int
    kl: float
    kl_first: float
    top1: float
    exact: float
    steps: list[StepFidelity] = field(default_factory=list)
    #: Why the figures may not measure what they seem to (a step that reduced nothing).
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def recording_errors(pipeline: Pipeline) -> tuple[Any, list[list[torch.Tensor]]]:
    """An observer (for :func:`tokenreduce.observe`) that records, per step of ``pipeline``,
    each call's per-row reconstruction error on the features the step's reducer received.

    Returns the callback and, per step, the list of ``(rows,)`` error tensors.
    """
    sinks: list[list[torch.Tensor]] = [[] for _ in pipeline.steps]
    step_of = {id(s.reducer): i for i, s in enumerate(pipeline.steps)}

    def record(reducer: Reducer, tokens: torch.Tensor, valid: torch.Tensor, context: Any, out: Any) -> None:
        i = step_of.get(id(reducer))
        if i is not None:
            sinks[i].append(reconstruction_error(tokens, out, valid).detach().float().cpu())

    return record, sinks


def _with_answer(inputs: Any, answer: torch.Tensor) -> dict[str, Any]:
    """Processor inputs with ``answer (B, W)`` appended to every per-token tensor.

    ``input_ids`` get the answer, ``attention_mask`` ones, any other ``(B, L)`` integer
    tensor (token type ids) zeros: the answer is plain text.
    """
    ids = inputs["input_ids"]
    out: dict[str, Any] = dict(inputs)
    for key, value in inputs.items():
        if not (torch.is_tensor(value) and value.shape[:2] == ids.shape and not value.is_floating_point()):
            continue
        if key == "input_ids":
            tail = answer.to(value)
        elif key == "attention_mask":
            tail = torch.ones_like(answer, dtype=value.dtype, device=value.device)
        else:
            tail = torch.zeros_like(answer, dtype=value.dtype, device=value.device)
        out[key] = torch.cat([value, tail], dim=1)
    return out


def _pad_answers(answers: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(a) for a in answers))
    ids = torch.full((len(answers), width), pad, dtype=torch.long)
    mask = torch.zeros(len(answers), width, dtype=torch.bool)
    for i, a in enumerate(answers):
        ids[i, : len(a)] = torch.tensor(a, dtype=torch.long)
        mask[i, : len(a)] = True
    return ids, mask


@torch.inference_mode()
def _answer_logprobs(vlm: VLM, inputs: dict[str, Any], width: int) -> tuple[torch.Tensor, list[Any]]:
    """``(B, width, V)`` float32 log-probabilities predicting the ``width`` appended tokens, and the stage records."""
    with vlm.reduced() as handle:
        logits = vlm.model(**inputs).logits
        records = list(handle.records) if handle is not None else []
    # Rows are right-aligned and reduction removes only visual tokens, so the answer is
    # the tail of every row of the (possibly shortened) logits.
    return logits[:, -width - 1 : -1].float().log_softmax(dim=-1).cpu(), records


def measure_fidelity(
    vlm: VLM,
    samples: Sequence[Sample],
    pipelines: Sequence[tuple[str, Pipeline]],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 4,
) -> list[FidelityResult]:
    """Compare each pipeline with the unreduced model on ``samples`` (see the module docstring)."""
    if not samples:
        raise ValueError("measure_fidelity needs at least one sample")
    pad = vlm.eos_token_id if vlm.eos_token_id is not None else 0
    acc = {name: _Acc(len(pipe.steps)) for name, pipe in pipelines}
    records: dict[str, list[list[Any]]] = {name: [[] for _ in pipe.steps] for name, pipe in pipelines}
    for start in range(0, len(samples), batch_size):
        batch = list(samples[start : start + batch_size])
        vlm.pipeline = None
        _, answers, _, _ = vlm.generate(batch, max_new_tokens=max_new_tokens)
        answer, mask = _pad_answers(answers, pad)
        inputs = _with_answer(vlm.encode([vlm.prompt(s) for s in batch], batch), answer.to(vlm.device))
        ref, _ = _answer_logprobs(vlm, inputs, answer.shape[1])
        for name, pipe in pipelines:
            record, sinks = recording_errors(pipe)
            vlm.pipeline = pipe
            with observe(record):
                red, recs = _answer_logprobs(vlm, inputs, answer.shape[1])
                for rec in recs:
                    records[name][_step_index(pipe, rec)].append(rec)
                _, decoded, _, _ = vlm.generate(batch, max_new_tokens=max_new_tokens)
            kl = (ref.exp() * (ref - red)).sum(dim=-1)  # (B, W)
            acc[name].add(kl, red.argmax(dim=-1) == answer, mask, [d == a for d, a in zip(decoded, answers)], sinks)
    vlm.pipeline = None
    results = []
    for name, pipe in pipelines:
        a = acc[name]
        steps = []
        for i, step in enumerate(pipe.steps):
            recs = records[name][i]
            before = [b for r in recs for b in r.tokens_before]
            after = [t for r in recs for t in r.tokens_after]
            steps.append(
                StepFidelity(
                    stage=step.stage.value,
                    reducer=step.reducer.name,
                    layer=step.layer,
                    tokens_before=sum(before) / max(1, len(before)),
                    tokens_after=sum(after) / max(1, len(after)),
                    reconstruction_error=a.step_error(i),
                )
            )
        result = a.result(name, len(samples), steps)
        result.warnings = _no_op_steps(name, pipe, records[name])
        for text in result.warnings:
            warnings.warn(text, UserWarning, stacklevel=2)
        results.append(result)
    return results


def _no_op_steps(name: str, pipe: Pipeline, records: list[list[Any]]) -> list[str]:
    """A warning for each step that kept every token of every unit it reduced."""
    out = []
    for step, recs in zip(pipe.steps, records):
        before = [b for r in recs for b in r.tokens_before]
        after = [t for r in recs for t in r.tokens_after]
        if before and before == after:
            n = max(before)
            where = f"{step.reducer.name}@{step.stage.value}" + ("" if step.layer is None else f"[{step.layer}]")
            out.append(
                f"pipeline {name!r}: step {where} with budget {step.reducer.budget} kept every token "
                f"(this model gives it {n if min(before) == n else f'{min(before)} to {n}'} per input): nothing was "
                f"reduced, so its KL and agreement measure no reduction; use a budget below {min(before)} tokens "
                f"or a ratio < 1"
            )
    return out


def _step_index(pipe: Pipeline, record: Any) -> int:
    """The pipeline step a stage record belongs to (stage, and layer for llm_layer)."""
    for i, step in enumerate(pipe.steps):
        if step.stage is record.stage and step.layer == record.layer:
            return i
    raise ValueError(f"stage record {record.stage.value}/{record.layer} matches no step of the pipeline")


class _Acc:
    """Running sums of one pipeline's measures."""

    def __init__(self, n_steps: int):
        self.kl = 0.0
        self.kl_first = 0.0
        self.top1 = 0.0
        self.tokens = 0
        self.rows = 0
        self.exact = 0
        self.errors: list[list[torch.Tensor]] = [[] for _ in range(n_steps)]

    def add(
        self, kl: torch.Tensor, agree: torch.Tensor, mask: torch.Tensor, exact: list[bool], sinks: list[list[torch.Tensor]]
    ) -> None:
        self.kl += float((kl * mask).sum())
        self.kl_first += float(kl[:, 0].sum())
        self.top1 += float((agree & mask).sum())
        self.tokens += int(mask.sum())
        self.rows += kl.shape[0]
        self.exact += sum(exact)
        for i, sink in enumerate(sinks):
            self.errors[i].extend(sink)

    def step_error(self, i: int) -> float:
        errs = self.errors[i]
        return float(torch.cat(errs).mean()) if errs else float("nan")

    def result(self, name: str, samples: int, steps: list[StepFidelity]) -> FidelityResult:
        tokens = max(1, self.tokens)
        return FidelityResult(
            name=name,
            samples=samples,
            answer_tokens=self.tokens,
            kl=self.kl / tokens,
            kl_first=self.kl_first / max(1, self.rows),
            top1=self.top1 / tokens,
            exact=self.exact / max(1, self.rows),
            steps=steps,
        )


__all__ = ["FidelityResult", "StepFidelity", "measure_fidelity", "recording_errors"]
