"""Roofline-ideal prefill time: analytic FLOPs and bytes per component, measured device peaks.

The ideal time of a component is ``max(FLOPs / matmul peak, bytes / memory bandwidth)``;
the ideal prefill is the sum over the components, which run one after the other: the
vision tower, the projector, every decoder layer (each with its own token count, so
decoder-side reductions are counted layer by layer) and the LM head (last token only,
as ``generate()`` computes it).

Counted:

* FLOPs: ``2 x tokens x weights`` of every ``Linear`` / ``Conv`` the component runs (read
  off the real modules, so every architecture detail is included), plus attention:
  ``4 s^2 w`` per full bidirectional layer of a sequence of ``s`` tokens and width ``w``
  (``QK^T`` and ``AV``), ``4 s k w`` for windowed layers of ``k`` tokens, and ``2 L^2 w``
  per causal decoder layer (half of the full square).
* Bytes: the weights once per forward (shared across the batch), the input and output
  activations of every ``Linear`` (``tokens x (in + out)``), Q/K/V/O of attention (no
  ``L^2`` traffic: a fused kernel keeps scores on chip), and the KV cache written.

Peaks are measured on the device, not taken from a datasheet: a large bf16 GEMM (best
of several runs) and a large device-to-device copy (read + write bytes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .common import sync, time_call
from .models import LLAVA_NEXT, LLAVA_ONEVISION, QWEN, ModelSpec, text_model, vision_modules


@dataclass
class Peaks:
    """Measured device limits."""

    matmul_tflops: float
    bandwidth_gbs: float
    matmul_n: int
    copy_mib: float
    device: str
    dtype: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_peaks(device: str, dtype: torch.dtype = torch.bfloat16, *, quick: bool = False) -> Peaks:
    """Best-of-N throughput of an ``n x n x n`` GEMM and of a large copy on ``device``."""
    big = device.startswith("cuda") and not quick
    n = 8192 if big else 256
    reps = 10 if big else 3
    gen = torch.Generator(device=device).manual_seed(0)
    mats = [torch.randn(n, n, device=device, dtype=dtype, generator=gen) for _ in range(2)]
    ms = time_call(lambda: torch.mm(mats[0], mats[1]), device, reps=reps, warmup=2)
    tflops = 2 * n**3 / (min(ms) * 1e-3) / 1e12
    mats.clear()
    size = (2048 if big else 8) * 2**20  # bytes per buffer
    bufs = [torch.ones(size // 2, device=device, dtype=torch.bfloat16) for _ in range(2)]
    ms = time_call(lambda: bufs[1].copy_(bufs[0]), device, reps=reps, warmup=2)
    gbs = 2 * size / (min(ms) * 1e-3) / 1e9  # each byte is read once and written once
    bufs.clear()
    sync(device)
    return Peaks(tflops, gbs, n, size / 2**20, device, str(dtype).replace("torch.", ""))


# -- what a module computes per token -----------------------------------------------------


def linear_weights(module: torch.nn.Module, exclude: torch.nn.Module | None = None) -> tuple[int, int]:
    """``(weights, io)``: total weight count of the Linear/Conv layers and the sum of their in+out widths.

    A convolution counts per output position (a patch embedding is a Linear over a flattened patch).
    """
    skip = set()
    if exclude is not None:
        skip = {id(m) for m in exclude.modules()}
    weights = io = 0
    for m in module.modules():
        if id(m) in skip:
            continue
        if isinstance(m, torch.nn.Linear):
            weights += m.weight.numel()
            io += m.in_features + m.out_features
        elif isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            weights += m.weight.numel()
            io += m.weight[0].numel() + m.out_channels
    return weights, io


def module_bytes(module: torch.nn.Module, exclude: torch.nn.Module | None = None) -> int:
    skip = set() if exclude is None else {id(p) for p in exclude.parameters()}
    return sum(p.numel() * p.element_size() for p in module.parameters() if id(p) not in skip)


@dataclass
class TokenProfile:
    """Tokens each component processes, per batch row.

    Attributes:
        vision_sequences: independent sequences through the vision tower (tiles / images).
        vision_len: tokens per vision sequence.
        vision_windows: per vision layer, the attention window in tokens (``None`` = full).
        projector_tokens: tokens through the projector.
        text_tokens: non-image tokens of the prompt.
        image_tokens: image tokens entering each decoder layer.
    """

    vision_sequences: int
    vision_len: int
    vision_windows: list[int | None]
    projector_tokens: int
    text_tokens: int
    image_tokens: list[int]


def token_profile(
    spec: ModelSpec,
    config: Any,
    *,
    image_tokens: int,
    prompt_len: int,
    per_layer: list[int],
    projector_tokens: int | None = None,
) -> TokenProfile:
    """The token counts of one prompt row; ``per_layer`` are the image tokens entering each decoder layer."""
    v = config.vision_config
    if spec.family == QWEN:
        h, w = spec.image_size
        patches = (h // v.patch_size) * (w // v.patch_size)
        window = (v.window_size // v.patch_size) ** 2
        windows = [None if i in set(v.fullatt_block_indexes) else window for i in range(v.depth)]
        seqs, length, proj = 1, patches, image_tokens
    elif spec.family == LLAVA_ONEVISION:
        # Video: every frame through SigLIP (no [CLS]); the projector runs on every frame's
        # patches before the 2x2 pooling (the stock order, kept by the adapter whatever the steps).
        p = v.image_size // v.patch_size
        seqs, length, proj = spec.frames, p * p, spec.frames * p * p
        windows = [None] * v.num_hidden_layers
    else:
        p = v.image_size // v.patch_size
        seqs = 1
        if spec.family == LLAVA_NEXT:
            h, w = spec.image_size
            seqs = 1 + (h // v.image_size) * (w // v.image_size)
        length, proj = p * p + 1, seqs * p * p  # CLS + patches; the projector sees the patches
        windows = [None] * v.num_hidden_layers
    return TokenProfile(
        vision_sequences=seqs,
        vision_len=length,
        vision_windows=windows,
        projector_tokens=proj if projector_tokens is None else projector_tokens,
        text_tokens=prompt_len - image_tokens,
        image_tokens=per_layer,
    )


@dataclass
class Component:
    name: str
    flops: float
    bytes: float

    def ideal_ms(self, peaks: Peaks) -> float:
        return max(self.flops / (peaks.matmul_tflops * 1e12), self.bytes / (peaks.bandwidth_gbs * 1e9)) * 1e3


def prefill_components(model: torch.nn.Module, spec: ModelSpec, profile: TokenProfile, batch: int) -> list[Component]:
    """Analytic FLOPs and bytes of one prefill of ``batch`` rows (see the module docstring)."""
    elem = next(model.parameters()).element_size()
    tower, projector = vision_modules(model, spec)
    config = model.config
    comps = []

    # Vision tower (the Qwen merger is its projector: counted there, not here).
    excl = projector if spec.family == QWEN else None
    w_vis, io_vis = linear_weights(tower, exclude=excl)
    width = config.vision_config.hidden_size
    tokens = batch * profile.vision_sequences * profile.vision_len
    attn = 0.0
    for win in profile.vision_windows:
        span = profile.vision_len if win is None else win
        attn += 4.0 * profile.vision_len * span * width * batch * profile.vision_sequences
    qkvo = 4 * width * len(profile.vision_windows)
    comps.append(
        Component(
            "vision",
            2.0 * tokens * w_vis + attn,
            module_bytes(tower, exclude=excl) + elem * tokens * (io_vis + qkvo),
        )
    )

    w_proj, io_proj = linear_weights(projector)
    ptoks = batch * profile.projector_tokens
    comps.append(Component("projector", 2.0 * ptoks * w_proj, module_bytes(projector) + elem * ptoks * io_proj))

    lm = text_model(model)
    tc = config.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    d_q = tc.num_attention_heads * head_dim
    d_kv = tc.num_key_value_heads * head_dim
    layer = lm.layers[0]
    w_layer, io_layer = linear_weights(layer)
    layer_bytes = module_bytes(layer)
    for i, n_img in enumerate(profile.image_tokens):
        length = profile.text_tokens + n_img
        toks = batch * length
        flops = 2.0 * toks * w_layer + 2.0 * batch * length * length * d_q
        traffic = layer_bytes + elem * toks * (io_layer + 2 * d_q + 2 * d_kv) + elem * toks * 2 * d_kv
        comps.append(Component(f"decoder.{i}", flops, traffic))

    head = model.lm_head
    comps.append(
        Component(
            "lm_head",
            2.0 * batch * head.weight.numel(),
            module_bytes(head) + elem * batch * (head.in_features + head.out_features),
        )
    )
    return comps


def summarize_components(comps: list[Component], peaks: Peaks) -> dict[str, Any]:
    """Totals, per-group ideal milliseconds (vision / projector / decoder / lm_head) and the ideal prefill."""
    groups: dict[str, dict[str, float]] = {}
    for c in comps:
        g = groups.setdefault(c.name.split(".")[0], {"flops": 0.0, "bytes": 0.0, "ideal_ms": 0.0})
        g["flops"] += c.flops
        g["bytes"] += c.bytes
        g["ideal_ms"] += c.ideal_ms(peaks)
    return {
        "ideal_ms": sum(c.ideal_ms(peaks) for c in comps),
        "flops": sum(c.flops for c in comps),
        "bytes": sum(c.bytes for c in comps),
        "components": groups,
    }


def kv_cache_bytes_analytic(model: torch.nn.Module, profile: TokenProfile, batch: int, new_tokens: int = 0) -> int:
    """KV-cache bytes after prefill (+ ``new_tokens`` decoded) from the per-layer token counts."""
    tc = model.config.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    elem = next(model.parameters()).element_size()
    per_token = 2 * tc.num_key_value_heads * head_dim * elem
    return int(sum((profile.text_tokens + n + new_tokens) * per_token * batch for n in profile.image_tokens))
