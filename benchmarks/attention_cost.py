"""Attention cost: FastV and PyramidDrop as their official code runs them vs through tokenreduce.

Both methods rank image tokens by the attention the last token pays them. Their
official implementations get that attention the expensive way:

* **FastV** (github.com/pkunlp-icler/FastV, built on transformers 4.31 where LLaMA only
  had eager attention) runs every decoder layer with eager attention and reads the
  full ``(B, H, L, L)`` attention map of layer ``K-1`` (``output_attentions``); at layer
  ``K`` it keeps the top-``T`` image tokens by the last row of that map averaged over
  heads (original position ids kept). Reproduced here as ``official-eager``.
* **PyramidDrop** (github.com/Cooperx521/PyramidDrop, ``pdrop_rank_drop``) keeps the
  model's attention kernel but, at each boundary layer ``K``, projects Q, K and V of the
  *whole* sequence with layer ``K``'s input norm, applies RoPE, materialises a 4-D
  causal mask ``(B, 1, L, L)`` and takes the last instruction token's softmax row;
  position ids are renumbered. Reproduced as ``official`` (SDPA elsewhere, as released)
  and ``official-eager`` (every layer eager, as issue 8 describes the original).

tokenreduce runs both under SDPA and recomputes only the one attention row needed from
the layer's q/k (``attention_rows``). Measured per model (576 image tokens: LLaVA-1.5,
2928: LLaVA-NeXT at 672x672) and batch: TTFT (prefill forward, no KV cache in either
path, CUDA events, median) and peak memory, plus the unreduced prefill under SDPA and
eager for reference. The kept indices of both paths are compared in the benchmark dtype
and, because bf16 attention scores tie often, again after converting the model to
float32 (where both paths compute the same scores to ~1e-6).

Published settings: FastV K=2 keeping 50% of the image tokens; PyramidDrop layers 8/16/24
keeping 50% at each step.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

import tokenreduce
from tokenreduce import Pipeline, Stage, Step

from .common import Deadline, Reporter, free_device_memory, peak_memory, summarize, time_call
from .models import Inputs, ModelSpec, make_inputs, text_model

FASTV_LAYER = 2
FASTV_KEEP = 0.5
PDROP_LAYERS = (8, 16, 24)
PDROP_KEEP = 0.5


@dataclass(frozen=True)
class Method:
    """A decoder-side method at its published setting for ``n`` image tokens."""

    name: str  # "fastv" | "pdrop"
    layers: tuple[int, ...]
    budgets: tuple[int, ...]

    @classmethod
    def published(cls, name: str, n: int, n_layers: int) -> Method:
        if name == "fastv":
            return cls("fastv", (FASTV_LAYER,), (max(1, round(n * FASTV_KEEP)),))
        layers = tuple(sorted({max(1, min(n_layers - 1, round(k * n_layers / 32))) for k in PDROP_LAYERS}))
        budgets, cur = [], n
        for _ in layers:
            cur = max(1, int(cur * PDROP_KEEP))
            budgets.append(cur)
        return cls("pdrop", layers, tuple(budgets))

    def pipeline(self) -> Pipeline:
        st = Stage.LLM_LAYER
        return Pipeline(
            [Step(st, tokenreduce.create(self.name, b, stage=st), layer=k) for k, b in zip(self.layers, self.budgets)]
        )


class _Stop(Exception):
    """Raised by a pre-hook to stop a forward once the decoder input is known."""

    def __init__(self, embeds: torch.Tensor):
        self.embeds = embeds


def decoder_inputs(model: torch.nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    """``inputs_embeds`` the model feeds its decoder (vision tower, projector, splicing included)."""

    def hook(module, args, kw):
        raise _Stop(kw["inputs_embeds"] if kw.get("inputs_embeds") is not None else args[0])

    handle = text_model(model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**kwargs, use_cache=False)
    except _Stop as stop:
        return stop.embeds
    finally:
        handle.remove()
    raise RuntimeError("the decoder was never called")


@contextmanager
def attention_implementation(config: Any, name: str) -> Iterator[None]:
    """Switch a (text) config's attention kernel for the duration of the block."""
    old = config._attn_implementation
    config._attn_implementation_internal = name
    try:
        yield
    finally:
        config._attn_implementation_internal = old


def causal_mask(length: int, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The additive 4-D causal mask eager attention needs, ``(B, 1, L, L)``."""
    m = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return m[None, None].expand(batch, 1, length, length)


def _gather_seq(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x (B, L, ...)`` at ``idx (B, L')`` along dim 1."""
    shape = idx.shape + x.shape[2:]
    return torch.gather(x, 1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(shape))


def _keep_layout(n_text_before: int, n_img: int, n_after: int, keep: torch.Tensor) -> torch.Tensor:
    """Sequence positions ``(B, L')`` of: the text before the image, the kept image tokens, the text after."""
    b = keep.shape[0]
    dev = keep.device
    before = torch.arange(n_text_before, device=dev).expand(b, -1)
    after = torch.arange(n_text_before + n_img, n_text_before + n_img + n_after, device=dev).expand(b, -1)
    return torch.cat([before, keep + n_text_before, after], dim=1)


def official_prefill(
    model: torch.nn.Module, inputs: Inputs, method: Method | None, *, attn: str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One prefill the way the official code runs it; returns ``(last-token logits, kept indices per step)``.

    ``attn`` is the decoder's attention kernel (``eager`` or ``sdpa``). Kept indices are
    ``(B, T)`` positions among the image tokens present at that step, ascending.
    """
    lm = text_model(model)
    embeds = decoder_inputs(model, inputs.kwargs)
    b, length, _ = embeds.shape
    dev, dtype = embeds.device, embeds.dtype
    start, n_img = inputs.image_start, inputs.image_tokens
    n_after = length - start - n_img
    h = embeds
    pos = torch.arange(length, device=dev).expand(b, length)
    cos_sin = lm.rotary_emb(h, pos)
    kept: list[torch.Tensor] = []
    captured: dict[str, torch.Tensor] = {}
    hook = None
    steps = dict(zip(method.layers, method.budgets)) if method is not None else {}
    if method is not None and method.name == "fastv":
        k_prev = lm.layers[method.layers[0] - 1].self_attn

        def grab(module, args, out):  # eager attention returns (output, weights (B, H, L, L))
            captured["attn"] = out[1]

        hook = k_prev.register_forward_hook(grab)
    try:
        with attention_implementation(lm.config, attn):
            mask = causal_mask(length, b, dtype, dev) if attn == "eager" else None
            for i, layer in enumerate(lm.layers):
                if i in steps:
                    budget = steps[i]
                    if method.name == "fastv":
                        weights = captured.pop("attn")
                        # Official: mean over heads of the last row, image columns, in the model dtype.
                        scores = weights[:, :, -1, start : start + n_img].mean(dim=1)
                        renumber = False
                    else:
                        scores = _pdrop_scores(layer, h, cos_sin, start, n_img)
                        renumber = True
                    keep = torch.topk(scores.float(), budget, dim=1).indices.sort(dim=1).values
                    kept.append(keep)
                    idx = _keep_layout(start, n_img, n_after, keep)
                    h = _gather_seq(h, idx)
                    pos = torch.arange(idx.shape[1], device=dev).expand(b, -1) if renumber else _gather_seq(pos, idx)
                    cos_sin = lm.rotary_emb(h, pos)
                    n_img = budget
                    length = idx.shape[1]
                    if attn == "eager":
                        mask = causal_mask(length, b, dtype, dev)
                out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin, use_cache=False)
                h = out[0] if isinstance(out, tuple) else out
            h = lm.norm(h[:, -1:])
            logits = model.lm_head(h)
    finally:
        if hook is not None:
            hook.remove()
    return logits, kept


def _pdrop_scores(layer: torch.nn.Module, h: torch.Tensor, cos_sin, start: int, n_img: int) -> torch.Tensor:
    """PyramidDrop's official rank step: full-sequence Q/K/V at this layer, 4-D mask, last row."""
    attn = layer.self_attn
    b, length, _ = h.shape
    x = layer.input_layernorm(h)
    hd = attn.head_dim
    q = attn.q_proj(x).view(b, length, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(b, length, -1, hd).transpose(1, 2)
    attn.v_proj(x)  # the official code projects V too (unused)
    rot = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the model's own RoPE
    q, k = rot(q, k, *cos_sin)
    mask = causal_mask(length, b, h.dtype, h.device).contiguous()  # materialised, as in the official code
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
    row = torch.matmul(q[:, :, -1:], k.transpose(2, 3)) * hd**-0.5 + mask[:, :, -1:]
    probs = torch.softmax(row, dim=-1, dtype=torch.float32).to(h.dtype)
    return probs.mean(dim=1)[:, 0, start : start + n_img]


def tokenreduce_prefill(
    model: torch.nn.Module, inputs: Inputs, method: Method
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The same prefill through ``tokenreduce.apply`` (SDPA; attention rows recomputed)."""
    with tokenreduce.apply(model, method.pipeline()) as handle:
        out = model(**inputs.kwargs, use_cache=False, logits_to_keep=1)
        kept = [torch.stack(list(r.indices)) for r in handle.records if r.stage is Stage.LLM_LAYER]
    return out.logits, kept


def compare_kept(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, Any]:
    """Whether two runs kept the same image tokens at every step; mean overlap fraction otherwise."""
    if len(a) != len(b) or not a:
        return {"identical": False, "overlap": None, "steps": [len(a), len(b)]}
    overlaps, identical = [], True
    for x, y in zip(a, b):
        x, y = x.cpu(), y.cpu()
        if x.shape != y.shape:
            return {"identical": False, "overlap": None, "shapes": [list(x.shape), list(y.shape)]}
        identical &= torch.equal(x, y)
        same = (x.unsqueeze(-1) == y.unsqueeze(-2)).any(-1).float().mean()
        overlaps.append(float(same))
    return {"identical": bool(identical), "overlap": sum(overlaps) / len(overlaps)}


@dataclass
class AttentionConfig:
    batches: tuple[int, ...] = (1, 8)
    reps: int = 3
    fp32_check: bool = True


def _paths(method: Method | None) -> list[tuple[str, Callable]]:
    if method is None:
        return [
            ("sdpa", lambda m, i: (m(**i.kwargs, use_cache=False, logits_to_keep=1).logits, [])),
            ("eager", lambda m, i: official_prefill(m, i, None, attn="eager")),
        ]
    paths = [("tokenreduce-sdpa", lambda m, i: tokenreduce_prefill(m, i, method))]
    paths.append(("official-eager", lambda m, i: official_prefill(m, i, method, attn="eager")))
    if method.name == "pdrop":
        paths.append(("official", lambda m, i: official_prefill(m, i, method, attn="sdpa")))
    return paths


def run_model(
    model: torch.nn.Module,
    spec: ModelSpec,
    *,
    device: str,
    dtype: torch.dtype,
    cfg: AttentionConfig,
    deadline: Deadline,
    reporter: Reporter,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """TTFT, peak memory and kept indices of every path, per batch; then the float32 index check."""
    config = model.config
    n_layers = config.text_config.num_hidden_layers
    n = make_inputs(spec, config, batch=1, device="cpu", dtype=torch.float32).image_tokens
    methods: list[Method | None] = [
        None,
        Method.published("fastv", n, n_layers),
        Method.published("pdrop", n, n_layers),
    ]
    jobs = [(b, m, p) for b in cfg.batches for m in methods for p in _paths(m)]
    task = reporter.task(f"attention {spec.key}", total=len(jobs) + (2 if cfg.fp32_check else 0))
    results = []
    kept_by: dict[tuple[int, str], dict[str, list[torch.Tensor]]] = {}
    inputs = {b: make_inputs(spec, config, batch=b, device=device, dtype=dtype) for b in cfg.batches}

    def emit(rec: dict[str, Any], item: str) -> None:
        results.append(rec)
        reporter.advance(task, item=item)
        if on_result is not None:
            on_result(rec)

    for i, (b, method, (path, fn)) in enumerate(jobs):
        name = method.name if method else "none"
        rec: dict[str, Any] = {"model": spec.key, "batch": b, "method": name, "path": path, "image_tokens": n}
        if method is not None:
            rec.update(layers=list(method.layers), budgets=list(method.budgets))
        if deadline.expired():
            rec.update(status="skipped", error="time budget of the suite used up")
        else:
            kept = kept_by.setdefault((b, name), {})
            rec.update(_time_path(model, inputs[b], fn, device, cfg.reps, kept, path))
            # tokenreduce runs first for each method: compare every other path with it.
            if path != "tokenreduce-sdpa" and path in kept and "tokenreduce-sdpa" in kept:
                rec["kept_vs_tokenreduce"] = compare_kept(kept[path], kept["tokenreduce-sdpa"])
        emit(rec, f"B={b} {name} {path}: {rec.get('ttft_ms', rec['status'])}")
        last_of_first_batch = b == cfg.batches[0] and (i + 1 == len(jobs) or jobs[i + 1][0] != b)
        if last_of_first_batch and cfg.fp32_check:  # before the (slow) larger batches
            for c in fp32_index_check(model, spec, [m for m in methods if m is not None], device, dtype, deadline):
                emit(c, f"fp32 {c['method']}: identical={c.get('identical')}")
    return results


def _time_path(model, inputs: Inputs, fn, device, reps, kept_store, path) -> dict[str, Any]:
    oom = False
    try:
        with torch.inference_mode():
            _, kept = fn(model, inputs)  # warm-up, and the indices this path keeps
            kept_store[path] = [k.cpu() for k in kept]
            mem: dict[str, Any] = {"peak_gib": None}
            if device.startswith("cuda"):  # a separate run, so the peak is not that of the warm-up's first allocations
                with peak_memory(device) as mem:
                    fn(model, inputs)
            ms = time_call(lambda: fn(model, inputs), device, reps=reps, warmup=0)
        stats = summarize(ms)
        return {"status": "ok", "ttft_ms": stats["median_ms"], "ttft": stats, "peak_gib": mem["peak_gib"]}
    except torch.cuda.OutOfMemoryError as err:
        oom = True
        return {"status": "oom", "error": str(err).splitlines()[0]}
    except Exception as err:
        tb = traceback.extract_tb(err.__traceback__)
        where = f" (at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
        return {"status": "error", "error": f"{type(err).__name__}: {err}{where}"}
    finally:
        free_device_memory(collect=oom)  # after an OOM, the failed call's tensors may sit in reference cycles


def fp32_index_check(
    model, spec: ModelSpec, methods: list[Method], device: str, dtype: torch.dtype, deadline: Deadline
) -> list[dict[str, Any]]:
    """Kept indices of the official-eager path and tokenreduce in float32 (batch 1); the model is restored to ``dtype``."""
    out = []
    if deadline.expired():
        return [{"model": spec.key, "method": m.name, "path": "fp32-check", "status": "skipped"} for m in methods]
    # model.to(dtype) afterwards would also round float32 buffers (rotary inv_freq): keep the originals.
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    model.float()
    try:
        inputs = make_inputs(spec, model.config, batch=1, device=device, dtype=torch.float32)
        for m in methods:
            rec: dict[str, Any] = {
                "model": spec.key,
                "batch": 1,
                "method": m.name,
                "path": "fp32-check",
                "image_tokens": inputs.image_tokens,
            }
            try:
                with torch.inference_mode():
                    _, official = official_prefill(model, inputs, m, attn="eager")
                    _, ours = tokenreduce_prefill(model, inputs, m)
                rec.update(status="ok", **compare_kept(official, ours))
            except Exception as err:
                rec.update(status="error", error=f"{type(err).__name__}: {err}")
            out.append(rec)
    finally:
        model.to(dtype)
        for m, name, b in buffers:
            m._buffers[name] = b
        free_device_memory(collect=True)
    return out
