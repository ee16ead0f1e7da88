"""A transformers VLM behind one small interface: prompts, batched generation, continuation loss.

Model-agnostic: the model and processor come from the ``Auto`` classes and the prompt
from the processor's own chat template. It is the engine of the lmms-eval model
(:mod:`tokenreduce.evaluation.lmms`) and of ``tokenreduce fidelity``.

Prompt formats
--------------
* ``llava_hf``: exactly what lmms-eval's ``llava_hf`` model sends: the context as a plain
  string with one ``<image>`` placeholder per image prepended (unless the context already
  holds one), rendered with ``chat_template`` if given, else the tokenizer's chat template,
  else the Vicuna template of LLaVA-1.5.
* ``processor``: the processor's chat template with structured content
  (``[{"type": "image"}, ..., {"type": "text", ...}]``), as model cards and lmms-eval's chat
  models do; needed by models whose image placeholder is more than one token of text
  (Qwen2.5-VL's vision start/pad/end).
* ``auto`` (default): ``processor`` when the processor has a chat template, else ``llava_hf``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidInputError
from ..pipeline import Pipeline
from ..stages import Stage

# lmms-eval's fallback template for LLaVA-1.5 checkpoints without one (llava_hf.VICUNA_CHAT_TEMPLATE).
VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}A chat between a curious user and an artificial "
    "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: {{ message['content'] }} {% elif message['role'] == 'user' %}USER: {{ message['content'] }} {% else %} "
    "ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
PROMPT_FORMATS = ("auto", "llava_hf", "processor")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Sample:
    """One model input: a context (question) and its images (PIL) or videos (frame arrays)."""

    context: str
    images: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)


@dataclass
class TokenCount:
    """Visual tokens of one forward, summed over its batch rows.

    ``visual_in``: image/video placeholder tokens of the unreduced input. ``llm_input``:
    visual tokens entering the decoder (after encoder-side steps). ``layer_mean``: visual
    tokens averaged over decoder layers (differs from ``llm_input`` only with llm_layer
    steps). ``per_step``: ``(stage, reducer, layer, tokens before, tokens after)`` per record.
    """

    rows: int
    visual_in: int
    llm_input: float
    layer_mean: float
    per_step: list[tuple[str, str, int | None, int, int]] = field(default_factory=list)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """``"auto"``, a dtype name (``float16``, ``bfloat16``, ``float32``) or a torch dtype."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    if dtype not in DTYPES:
        raise InvalidInputError(f"dtype={dtype!r} is not supported; use auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def decoder_layers(config: Any) -> int | None:
    """Number of decoder layers of a VLM config (its text config's, if nested)."""
    text = getattr(config, "text_config", None) or config
    return getattr(text, "num_hidden_layers", None)


def count_tokens(visual_in: int, rows: int, records: Sequence[Any], layers: int | None) -> TokenCount:
    """Visual-token bookkeeping of one forward from the adapter's stage records.

    Encoder-side steps shorten the sequence the decoder sees; an llm_layer step at layer K
    shortens it from layer K on. ``layer_mean`` integrates the count over the decoder's layers.
    """
    llm_input = float(visual_in)
    drops_at: list[tuple[int, int]] = []
    per_step = []
    for rec in records:
        before, after = int(sum(rec.tokens_before)), int(sum(rec.tokens_after))
        per_step.append((rec.stage.value, rec.reducer, rec.layer, before, after))
        if rec.stage is Stage.LLM_LAYER:
            drops_at.append((int(rec.layer), before - after))
        else:
            llm_input -= before - after
    layer_mean = llm_input
    if drops_at and layers:
        per_layer = torch.full((layers,), llm_input)
        for layer, drop in drops_at:
            per_layer[min(layer, layers) :] -= drop
        layer_mean = float(per_layer.mean())
    return TokenCount(rows, visual_in, llm_input, layer_mean, per_step)


class VLM:
    """A loaded VLM and its processor, optionally reduced by a tokenreduce pipeline.

    Args:
        model: a transformers image-text-to-text model (eval mode).
        processor: its processor (tokenizer + image processor).
        device: where inputs go (default: the model's device).
        prompt_format: ``auto``, ``llava_hf`` or ``processor`` (see the module docstring).
        chat_template: a Jinja chat template overriding the tokenizer's (``llava_hf`` format).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        *,
        device: torch.device | str | None = None,
        prompt_format: str = "auto",
        chat_template: str | None = None,
    ):
        if prompt_format not in PROMPT_FORMATS:
            raise InvalidInputError(f"prompt_format={prompt_format!r} is not one of {', '.join(PROMPT_FORMATS)}")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        # Batched generation needs the prompts right-aligned (left padding).
        self.tokenizer.padding_side = "left"
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if prompt_format == "auto":
            prompt_format = "processor" if getattr(processor, "chat_template", None) else "llava_hf"
        self.prompt_format = prompt_format
        self.chat_template = chat_template
        self.pipeline: Pipeline | None = None
        self.last_records: list[Any] = []

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        pretrained: str,
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        device_map: str | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        revision: str = "main",
        prompt_format: str = "auto",
        chat_template: str | None = None,
    ) -> VLM:
        """Load a checkpoint (hub id or local folder) with ``AutoModelForImageTextToText``."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype), "revision": revision, "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if device_map:
            kwargs["device_map"] = device_map
        model = AutoModelForImageTextToText.from_pretrained(pretrained, **kwargs)
        if not device_map:
            model.to(device)
        processor = AutoProcessor.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code)
        return cls(
            model,
            processor,
            device=device if not device_map else None,
            prompt_format=prompt_format,
            chat_template=chat_template,
        )

    # -- pipeline --------------------------------------------------------------------------

    @contextmanager
    def reduced(self) -> Iterator[Any]:
        """Patch the model with :attr:`pipeline` (if any) for the duration; yields the handle or None."""
        from ..adapter import apply

        if self.pipeline is None or not len(self.pipeline):
            yield None
            return
        with apply(self.model, self.pipeline) as handle:
            yield handle

    # -- prompts ---------------------------------------------------------------------------

    @property
    def image_token(self) -> str:
        return getattr(self.processor, "image_token", None) or "<image>"

    @property
    def video_token(self) -> str:
        return getattr(self.processor, "video_token", None) or "<video>"

    def prompt(self, sample: Sample, continuation: str | None = None) -> str:
        """The rendered prompt (generation prompt appended; ``continuation`` as the assistant turn)."""
        if self.prompt_format == "processor":
            content: list[dict[str, Any]] = [{"type": "image"} for _ in sample.images]
            content += [{"type": "video"} for _ in sample.videos]
            content.append({"type": "text", "text": sample.context})
            messages = [{"role": "user", "content": content}]
            return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        context = sample.context
        if sample.images and self.image_token not in context:
            context = " ".join([self.image_token] * len(sample.images)) + "\n" + context
        elif sample.videos and self.video_token not in context:
            context = " ".join([self.video_token] * len(sample.videos)) + "\n" + context
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None) or VICUNA_CHAT_TEMPLATE
        messages = [{"role": "user", "content": context}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=template)

    def encode(self, texts: list[str], samples: Sequence[Sample]) -> Any:
        """Processor inputs of a batch (left-padded), on :attr:`device`, floats in the model's dtype."""
        images = [im for s in samples for im in s.images]
        videos = [v for s in samples for v in s.videos]
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = videos
        inputs = self.processor(**kwargs)
        dtype = next(self.model.parameters()).dtype
        return inputs.to(self.device, dtype) if hasattr(inputs, "to") else inputs

    def visual_tokens(self, input_ids: torch.Tensor) -> int:
        """Image + video placeholder tokens in ``input_ids`` (the unreduced visual token count)."""
        cfg = self.model.config
        ids = {getattr(cfg, a, None) for a in ("image_token_id", "image_token_index", "video_token_id", "video_token_index")}
        ids.discard(None)
        if not ids:
            return 0
        return int(torch.isin(input_ids, torch.tensor(sorted(ids), device=input_ids.device)).sum())

    def _count(self, input_ids: torch.Tensor, handle: Any) -> TokenCount:
        records = list(handle.records) if handle is not None else []
        self.last_records = records
        return count_tokens(self.visual_tokens(input_ids), input_ids.shape[0], records, decoder_layers(self.model.config))

    # -- generation ------------------------------------------------------------------------

    def _sync(self) -> None:
        """Wait for queued GPU work, so that timings cover the computation, not its launch."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @torch.inference_mode()
    def generate(
        self,
        samples: Sequence[Sample],
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float | None = None,
        num_beams: int = 1,
        until: Sequence[str] = (),
    ) -> tuple[list[str], list[list[int]], TokenCount, float]:
        """Decode a batch; returns texts (cut at ``until``), new token ids, token count, seconds."""
        texts = [self.prompt(s) for s in samples]
        inputs = self.encode(texts, samples)
        do_sample = temperature > 0
        gen: dict[str, Any] = {
            "max_new_tokens": int(max_new_tokens),
            "do_sample": do_sample,
            "num_beams": int(num_beams),
            "pad_token_id": self.eos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if do_sample:
            gen.update(temperature=temperature, top_p=top_p)
        start = time.perf_counter()
        with self.reduced() as handle:
            out = self.model.generate(**inputs, **gen)
            self._sync()
            count = self._count(inputs["input_ids"], handle)
        seconds = time.perf_counter() - start
        new = out[:, inputs["input_ids"].shape[1] :]
        decoded = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        cut = []
        for text in decoded:
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            cut.append(text)
        ids = [_trim(row.tolist(), self.eos_token_id) for row in new]
        return cut, ids, count, seconds

    @torch.inference_mode()
    def continuation_loss(
        self, samples: Sequence[Sample], continuations: Sequence[str]
    ) -> tuple[list[tuple[float, bool]], TokenCount, float]:
        """Mean negative log-likelihood of each continuation after its prompt, and whether greedy.

        Follows lmms-eval's convention for ``loglikelihood`` (its HF models return the
        continuation's mean loss and multiple-choice tasks take the argmin). The
        continuation's tokens are those the tokenizer adds to the prompt.
        """
        prompts = [self.prompt(s) for s in samples]
        fulls = [p + c for p, c in zip(prompts, continuations)]
        prompt_len = [len(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        full_len = [len(self.tokenizer(f, add_special_tokens=False)["input_ids"]) for f in fulls]
        n_cont = torch.tensor([max(1, f - p) for p, f in zip(prompt_len, full_len)])
        inputs = self.encode(fulls, samples)
        start = time.perf_counter()
        with self.reduced() as handle:
            logits = self.model(**inputs).logits
            self._sync()
            count = self._count(inputs["input_ids"], handle)
        seconds = time.perf_counter() - start
        ids = inputs["input_ids"]
        width = int(n_cont.max())
        # Rows are right-aligned (left padding), and reduction only removes image tokens,
        # so the continuation is the tail of every row in the input and in the logits.
        targets = ids[:, -width:]
        pred = logits[:, -width - 1 : -1].float().log_softmax(dim=-1)
        logp = pred.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        mask = torch.arange(width).flip(0).unsqueeze(0) < n_cont.unsqueeze(1)
        mask = mask.to(logp.device)
        nll = -(logp * mask).sum(dim=1) / mask.sum(dim=1)
        greedy = ((pred.argmax(dim=-1) == targets) | ~mask).all(dim=1)
        return [(float(a), bool(b)) for a, b in zip(nll.tolist(), greedy.tolist())], count, seconds


def _trim(ids: list[int], eos: int | None) -> list[int]:
    """Token ids up to and including the first ``eos``."""
    if eos is not None and eos in ids:
        return ids[: ids.index(eos) + 1]
    return ids


__all__ = [
    "PROMPT_FORMATS",
    "VICUNA_CHAT_TEMPLATE",
    "VLM",
    "Sample",
    "TokenCount",
    "count_tokens",
    "decoder_layers",
    "resolve_dtype",
]
