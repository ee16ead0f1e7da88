"""The lmms-eval model ``tokenreduce``: any transformers VLM, reduced by a tokenreduce pipeline.

Registered through lmms-eval's entry-point group ``lmms_eval.models``
(:func:`tokenreduce.evaluation.lmms_manifest`),
so after ``pip install "tokenreduce[eval]"``::

    python -m lmms_eval --model tokenreduce \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,pipeline=apet64.yaml \\
        --tasks gqa,pope --batch_size 8

    accelerate launch --num_processes 8 -m lmms_eval --model tokenreduce \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,reducer=apet-llava,budget=64 --tasks gqa

Model arguments (``--model_args``, comma separated):

* ``pretrained``: hub id or local folder (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL,
  or any model a registered adapter supports).
* the pipeline: ``pipeline=PATH.yaml``, or ``reducer=NAME,budget=N`` with optional
  ``stage=...`` and ``layer=K``; neither: the unreduced model.
* ``dtype`` (auto, float16, bfloat16, float32), ``device``, ``device_map``, ``batch_size``,
  ``attn_implementation``, ``trust_remote_code``, ``revision``.
* ``prompt_format`` (auto, llava_hf, processor) and ``chat_template``: see
  :mod:`tokenreduce.evaluation.vlm`. With ``prompt_format=llava_hf`` the prompts are exactly
  those of lmms-eval's ``llava_hf`` model.

``generate_until`` batches requests of the same task and generation settings;
``loglikelihood`` returns the continuation's mean loss, lmms-eval's convention for HF models.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import torch

try:  # lmms-eval is the optional [eval] extra; this module is only imported with it.
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError('the lmms-eval model needs lmms-eval: pip install "tokenreduce[eval]"') from err

from ..budget import parse_budget
from ..errors import ConfigError
from ..pipeline import Pipeline
from .stats import TaskStats
from .vlm import VLM, Sample

MODEL_NAME = "tokenreduce"


def _loglikelihood_result(value: tuple[float, bool]) -> Any:
    """``(loss, is_greedy)`` in a form lmms-eval hands to the task unchanged.

    lmms-eval 0.7.x passes every model output through ``unwrap_generation_output``, which
    turns a ``(float, bool)`` tuple into its string, so multiple-choice tasks fail on
    unpacking it; a ``GenerationResult`` carrying the tuple comes through as is. Detected
    at run time, so a fixed lmms-eval gets the plain tuple.
    """
    try:
        from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
    except ImportError:
        return value
    if unwrap_generation_output(value)[0] == value:
        return value
    return GenerationResult(text=value)  # type: ignore[arg-type]


def pipeline_from_args(
    pipeline: Any = None, reducer: str | None = None, budget: Any = None, stage: str | None = None, layer: Any = None
) -> Pipeline | None:
    """The pipeline named by the model arguments (a YAML path, or reducer + budget), or None."""
    from ..runner import pipeline_from_arg

    if pipeline not in (None, "", "none") and reducer:
        raise ConfigError("give either pipeline=PATH or reducer=NAME,budget=N in --model_args, not both")
    if pipeline not in (None, "", "none"):
        if isinstance(pipeline, Pipeline):
            return pipeline
        return Pipeline.coerce(str(pipeline))
    if reducer:
        if budget is None:
            raise ConfigError(f"reducer={reducer} needs budget=N (int >= 1 or ratio in (0, 1]) in --model_args")
        # The reading of ``--budgets`` (``tokenreduce eval``), error text included.
        b_val = parse_budget(budget, "--budgets") if isinstance(budget, str) else budget
        return pipeline_from_arg(str(reducer), b_val, stage, None if layer is None else int(layer))
    return None


class TokenReduceLMM(lmms):
    """lmms-eval model wrapping a transformers VLM and a tokenreduce pipeline (see the module docstring)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        pipeline: str | None = None,
        reducer: str | None = None,
        budget: Any = None,
        stage: str | None = None,
        layer: Any = None,
        device: str | None = None,
        dtype: str = "auto",
        device_map: str = "",
        batch_size: int | str = 1,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        revision: str = "main",
        prompt_format: str = "auto",
        chat_template: str | None = None,
        max_frames_num: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ConfigError(f"unknown --model_args for {MODEL_NAME}: {', '.join(sorted(kwargs))}")
        from accelerate import Accelerator

        accelerator = Accelerator()
        self.accelerator = accelerator
        if accelerator.num_processes > 1 and not device_map:
            # Data parallel (accelerate launch): one full replica per process, on the
            # process's own device (cuda:<local rank>, or cpu under `accelerate launch --cpu`).
            device = str(accelerator.device)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.vlm = VLM.load(
            pretrained,
            device=device,
            dtype=dtype,
            device_map=device_map or None,
            attn_implementation=attn_implementation,
            trust_remote_code=bool(trust_remote_code),
            revision=revision,
            prompt_format=prompt_format,
            chat_template=chat_template,
        )
        self.pretrained = pretrained
        self.batch_size_per_gpu = int(batch_size)
        self.max_frames_num = int(max_frames_num)
        self._rank = accelerator.process_index if accelerator.num_processes > 1 else 0
        self._world_size = max(1, accelerator.num_processes)
        self.set_pipeline(pipeline_from_args(pipeline, reducer, budget, stage, layer))

    # -- pipeline and bookkeeping ----------------------------------------------------------

    def set_pipeline(self, pipeline: Pipeline | None) -> None:
        """Use ``pipeline`` (None: unreduced) from the next request on; resets the stats."""
        self.vlm.pipeline = pipeline
        self.stats: dict[str, TaskStats] = defaultdict(TaskStats)

    def stats_dict(self) -> dict[str, dict[str, float]]:
        """This process's per-task time and token figures."""
        return {task: s.as_dict() for task, s in self.stats.items()}

    @property
    def model(self) -> torch.nn.Module:
        return self.vlm.model

    @property
    def tokenizer(self) -> Any:
        return self.vlm.tokenizer

    @property
    def device(self) -> torch.device:
        return self.vlm.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self) -> int | None:
        return self.vlm.eos_token_id

    def clean(self) -> None:
        """Free cached memory but keep the model: ``tokenreduce eval`` reuses it for every pipeline."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- requests ----------------------------------------------------------------------------

    def _sample(self, context: str, doc_to_visual: Any, task: str, split: str, doc_id: Any) -> Sample:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        images, videos = [], []
        for v in visuals or []:
            if isinstance(v, str):
                videos.append(self._load_video(v))
            elif v is not None:
                images.append(v.convert("RGB") if hasattr(v, "convert") else v)
        return Sample(context=context, images=images, videos=videos)

    def _load_video(self, path: str) -> Any:
        try:
            from decord import VideoReader, cpu
        except ImportError as err:
            raise ImportError("video tasks need decord: pip install decord") from err
        import numpy as np

        reader = VideoReader(path, ctx=cpu(0))
        frames = np.linspace(0, len(reader) - 1, self.max_frames_num, dtype=int).tolist()
        return reader.get_batch(frames).asnumpy()

    def _batches(self, requests: list[Instance], key: Any) -> list[list[int]]:
        """Request indices grouped by ``key`` (task, settings) in order, cut into batches."""
        groups: dict[Any, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[key(req)].append(i)
        n = max(1, self.batch_size)
        return [idx[j : j + n] for idx in groups.values() for j in range(0, len(idx), n)]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from tqdm import tqdm

        def key(req: Instance) -> Any:
            _, gen_kwargs, _, _, task, _ = req.args
            return task, json.dumps(gen_kwargs, sort_keys=True, default=str)

        results: list[str] = [""] * len(requests)
        batches = self._batches(requests, key)
        for batch in tqdm(batches, disable=self.rank != 0, desc="tokenreduce generate"):
            args = [requests[i].args for i in batch]
            gen_kwargs = dict(args[0][1])
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            samples = [self._sample(ctx, vis, task, split, doc_id) for ctx, _, vis, doc_id, task, split in args]
            texts, _, count, seconds = self.vlm.generate(
                samples,
                max_new_tokens=int(gen_kwargs.get("max_new_tokens", 1024)),
                temperature=float(gen_kwargs.get("temperature", 0) or 0),
                top_p=gen_kwargs.get("top_p"),
                num_beams=int(gen_kwargs.get("num_beams", 1) or 1),
                until=until,
            )
            self.stats[args[0][4]].add(count, seconds, [a[3] for a in args])
            for i, text in zip(batch, texts):
                results[i] = text
                self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), text)
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        from tqdm import tqdm

        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        batches = self._batches(requests, lambda req: req.args[4])
        for batch in tqdm(batches, disable=self.rank != 0, desc="tokenreduce loglikelihood"):
            args = [requests[i].args for i in batch]
            samples, continuations = [], []
            for ctx, target, vis, doc_id, task, split in args:
                doc = self.task_dict[task][split][doc_id]
                continuations.append(target if isinstance(target, str) else target(doc))
                samples.append(self._sample(ctx, vis, task, split, doc_id))
            out, count, seconds = self.vlm.continuation_loss(samples, continuations)
            self.stats[args[0][4]].add(count, seconds, [a[3] for a in args])
            for i, res in zip(batch, out):
                results[i] = _loglikelihood_result(res)
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("multi-round generation is not supported by the tokenreduce model")


__all__ = ["MODEL_NAME", "TokenReduceLMM", "pipeline_from_args"]
