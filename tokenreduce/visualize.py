"""Pictures of what a pipeline kept of an image (``tokenreduce show``).

Each patch of the image is drawn by what became of its token after every step of a
pipeline: kept as itself (outlined), merged into a kept token (tinted with the colour of
that target, one colour per output token), or dropped (darkened). Reducers that report
a per-token quantity get a heat map under their picture: ``info["errors"]`` (ApET's
reconstruction error) or, failing that, ``info["scores"]``.

Patch tokens come from one of two sources:

* :func:`stand_in_features` (the default, offline): the image is resized to 336 x 336
  and cut into a 24 x 24 grid of 14 x 14 pixel patches (CLIP-L/336's geometry); each
  patch's pixels, centred over the image, go through a fixed seeded random projection
  to 256 dimensions. Random projections keep distances (Johnson-Lindenstrauss), so
  similar-looking patches get similar tokens. It is a stand-in for a vision tower, not
  a model: it shows the geometry of a method (what it keeps, where it merges), not what
  a trained encoder would find salient. Context a reducer needs is derived from the same
  tokens (see :func:`stand_in_context`).
* :func:`model_features`: a real checkpoint's vision tower and projector through
  transformers, by the plugin that knows the model (hook ``tokenreduce_vision_features``;
  the built-in one: LLaVA-style models, ``vision_tower`` + ``multi_modal_projector``).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import ops
from .context import ReductionContext, token_context
from .errors import InvalidInputError
from .pipeline import Pipeline, Step
from .reduction import Reduction
from .registry import get_registry
from .stages import Stage

SIDE = 24  # patches per side of the stand-in grid
PATCH = 14  # pixels per patch side
STAND_IN_DIM = 256


@dataclass
class Features:
    """Patch tokens of one image and what a vision tower would give with them.

    Attributes:
        image: ``(H, W, 3)`` uint8, the picture the patches were cut from (as shown).
        grid: ``(h, w)`` patch grid; ``h * w`` tokens.
        tokens: ``(1, h*w, D)`` float32 vision-encoder output (patch tokens only).
        cls_token: ``(1, D)`` the [CLS] output, if the tower has one.
        cls_attention: ``(1, h*w)`` [CLS] attention to the patches, if known.
        keys: ``(1, h*w, D_k)`` patch keys of the selected vision layer, if known.
        project: maps vision-width tokens to the LLM width (the projector); ``None``
            keeps the vision width at every stage.
        source: a short description for figure titles.
    """

    image: np.ndarray
    grid: tuple[int, int]
    tokens: torch.Tensor
    cls_token: torch.Tensor | None = None
    cls_attention: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    project: Callable[[torch.Tensor], torch.Tensor] | None = None
    source: str = "stand-in tokens"


@dataclass
class Trace:
    """What a pipeline did to each original patch.

    Attributes:
        title: pipeline summary, e.g. ``"tome@projector 64/576"``.
        group: ``(N,)`` int64: the output token each patch ended in, ``-1`` if dropped.
        kept: ``(N,)`` bool: the patch's own token survived every step (not merged away).
        heat: ``(N,)`` float per-patch quantity from one step's ``info`` (NaN for patches
            already dropped before that step), or ``None``.
        heat_label: what ``heat`` is and which step reported it, e.g. ``"apet@projector errors"``.
        merged: whether any step merged tokens (colours mean groups, not just kept).
    """

    title: str
    group: np.ndarray
    kept: np.ndarray
    heat: np.ndarray | None = None
    heat_label: str = ""
    merged: bool = False
    records: list[str] = field(default_factory=list)


# -- token sources -----------------------------------------------------------------------------


def load_image(path: str | Path) -> Any:
    """Open an image file as RGB (PIL), with a clear error for a missing or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"image={str(path)!r}: no such file")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise InvalidInputError(f"image={str(path)!r} is not a readable image: {err}") from None


def stand_in_features(
    image: Any, *, side: int = SIDE, patch: int = PATCH, dim: int = STAND_IN_DIM, seed: int = 0
) -> Features:
    """Patch tokens derived from the pixels (offline stand-in for a vision tower; see the module doc).

    Args:
        image: a PIL image.
        side: patches per side (24 for a 336-pixel CLIP-L/14 input).
        patch: patch size in pixels.
        dim: token width.
        seed: seed of the random projection.
    """
    from PIL import Image

    size = side * patch
    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0)
    # (side, patch, side, patch, 3) -> (side*side, patch*patch*3), patches in row-major order.
    patches = x.reshape(side, patch, side, patch, 3).permute(0, 2, 1, 3, 4).reshape(side * side, -1)
    # Centring over the image makes cosine similarity about what differs between
    # patches, not the shared brightness of the picture.
    patches = patches - patches.mean(dim=0, keepdim=True)
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(patches.shape[1], dim, generator=gen) / math.sqrt(dim)
    tokens = (patches @ proj).unsqueeze(0)
    return Features(
        image=pixels,
        grid=(side, side),
        tokens=tokens,
        source=f"stand-in tokens ({patch}-pixel patches on a {side}×{side} grid)",
    )


def stand_in_context(tokens: torch.Tensor, step: Step, grid: tuple[int, int] | None) -> ReductionContext:
    """Context derived from the tokens themselves, for reducers that need a model's.

    As :func:`tokenreduce.context.token_context`, with the attention a softmax over how far
    each token lies from the mean token, so distinctive patches draw attention.
    """
    x = tokens.float()
    dist = (x - x.mean(dim=1, keepdim=True)).norm(dim=-1)
    attn = (dist / dist.std(dim=1, keepdim=True).clamp_min(1e-6)).softmax(dim=-1)
    return token_context(x, attn, stage=step.stage, layer=step.layer, grid=grid)


def image_processor(model_id: str) -> Any:
    """The checkpoint's image processor.

    ``AutoImageProcessor`` of some transformers releases (5.17) needs torchvision for every
    processor; without it, the class the checkpoint names is loaded directly, which works
    with PIL alone.
    """
    import transformers
    from transformers import AutoImageProcessor
    from transformers.image_processing_utils import ImageProcessingMixin

    try:
        return AutoImageProcessor.from_pretrained(model_id)
    except ImportError:
        config, _ = ImageProcessingMixin.get_image_processor_dict(model_id)
        name = config.get("image_processor_type")
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if cls is None:
            raise
        return cls.from_pretrained(model_id)


def model_features(image: Any, model_id: str, *, device: str | None = None) -> Features:
    """Patch tokens from a real checkpoint's vision tower, by the plugin that knows its family.

    Loads the model with transformers (``AutoModelForImageTextToText``, float32, eval mode)
    and asks the ``tokenreduce_vision_features`` hook for the tokens its projector receives.
    The built-in plugin handles LLaVA-style models (``vision_tower`` +
    ``multi_modal_projector``): the model's selected feature layer
    (``vision_feature_layer``) without [CLS], [CLS] attention head-averaged from the same
    layer, and that layer's keys, heads concatenated.
    """
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=torch.float32)
    model.eval()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    found = get_registry().pm.hook.tokenreduce_vision_features(image=image, model=model, model_id=model_id, device=device)
    if found is None:
        raise InvalidInputError(
            f"model={model_id!r} ({type(model).__name__}): no installed plugin extracts vision features from it "
            "(hook tokenreduce_vision_features); with the built-in plugins `tokenreduce show --model` supports "
            "LLaVA-style checkpoints (vision_tower + multi_modal_projector)"
        )
    return found


# -- tracing a pipeline --------------------------------------------------------------------------


def token_to_slot(out: Reduction, tokens: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(N,)`` the output slot each input token of row 0 went to (-1: dropped), and whether any merged.

    Uses the reduction's own bookkeeping when it has it (``info["assignment"]`` or
    ``info["cell"]``: a slot per token; ``info["merged_into"]``: a kept position per
    token); otherwise, when ``sizes`` show merging, the most cosine-similar kept token.
    """
    n = tokens.shape[1]
    t = int(out.counts[0])
    idx = out.indices[0, :t]
    slot = torch.full((n,), -1, dtype=torch.long, device=idx.device)
    slot[idx] = torch.arange(t, device=idx.device)
    info = out.info
    for key in ("assignment", "cell"):
        value = info.get(key)
        if isinstance(value, torch.Tensor) and tuple(value.shape) == (tokens.shape[0], n):
            a = value[0].long()
            if bool((a < t).all()):
                return torch.where(a >= 0, a, slot), bool(((a >= 0) & (slot < 0)).any())
    value = info.get("merged_into")
    if isinstance(value, torch.Tensor) and tuple(value.shape) == (tokens.shape[0], n):
        m = value[0].long()
        merged = torch.where(m >= 0, slot[m.clamp(min=0)], slot)
        return merged, bool(((m >= 0) & (slot < 0)).any())
    if out.sizes is not None and bool((out.sizes[0, :t] > 1).any()):
        sim = ops.cosine_similarity(tokens[:1].float(), tokens[:1, idx].float())[0]  # (N, T)
        nearest = sim.argmax(dim=1)
        return torch.where(slot >= 0, slot, nearest), True
    return slot, False


def _heat_of(info: dict[str, Any], n: int) -> tuple[torch.Tensor, str] | None:
    for key in ("errors", "scores"):
        value = info.get(key)
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == n:
            return value[0].float(), key
    return None


def trace_pipeline(features: Features, pipeline: Pipeline, title: str | None = None) -> Trace:
    """Run ``pipeline`` on the features, chaining the steps, and follow every original patch.

    Vision-encoder steps see the vision tokens; the first later step sees them through
    :attr:`Features.project`. Decoder-layer steps see the projected tokens (a stand-in for
    the hidden states at layer K). Context comes from the features while the tokens are
    the original patches and from :func:`stand_in_context` otherwise.
    """
    if not len(pipeline):
        raise InvalidInputError("the pipeline has no steps")
    x = features.tokens
    n0 = x.shape[1]
    group = torch.arange(n0)
    kept = torch.ones(n0, dtype=torch.bool)
    cls_attention, keys = features.cls_attention, features.keys
    projected = features.project is None
    heat: tuple[torch.Tensor, str] | None = None
    merged_any = False
    records = []
    for step in pipeline:
        if step.stage is not Stage.VISION_ENCODER and not projected:
            x = features.project(x)  # type: ignore[misc]
            projected = True
        ctx = stand_in_context(x, step, features.grid if x.shape[1] == n0 else None)
        if cls_attention is not None:
            ctx.cls_token, ctx.cls_attention = features.cls_token, cls_attention
        if keys is not None:
            ctx.keys = keys
        before = x.shape[1]
        out = step.reducer(x, context=ctx)
        to_slot, merged = token_to_slot(out, x)
        merged_any |= merged
        found = _heat_of(out.info, before)
        # ApET's errors are the picture's point: they win over scores of any step.
        if found is not None and (heat is None or (found[1] == "errors" and heat[1] != "errors")):
            values = torch.full((n0,), float("nan"))
            alive = group >= 0
            values[alive] = found[0].cpu()[group[alive]]
            layer = f"[{step.layer}]" if step.layer is not None else ""
            heat = (values, f"{step.reducer.name}@{step.stage.value}{layer} {found[1]}")
        alive = group >= 0
        own = out.keep_mask[0].cpu()
        kept = kept & alive & own[group.clamp(min=0)]
        group = torch.where(alive, to_slot.cpu()[group.clamp(min=0)], group)
        t = int(out.counts[0])
        x = out.tokens[:, :t]
        idx = out.indices[0, :t]
        cls_attention = None if cls_attention is None else cls_attention[:, idx.to(cls_attention.device)]
        keys = None if keys is None else keys[:, idx.to(keys.device)]
        layer = f"[{step.layer}]" if step.layer is not None else ""
        records.append(f"{step.reducer.name}@{step.stage.value}{layer} {before}->{t}")
    summary = textwrap.fill(" > ".join(records), 52)
    return Trace(
        title=f"{title}\n{summary}" if title else summary,
        group=group.numpy(),
        kept=kept.numpy(),
        heat=None if heat is None else heat[0].numpy(),
        heat_label="" if heat is None else heat[1],
        merged=merged_any,
        records=records,
    )


# -- drawing ------------------------------------------------------------------------------------------


def group_colours(group: np.ndarray) -> np.ndarray:
    """``(N, 3)`` RGB in [0, 1]: one colour per output token, black for dropped patches.

    Hues come from a fixed seeded sequence rather than from the slot number, so that
    neighbouring groups (whose slot numbers are often close) rarely look alike.
    """
    from matplotlib.colors import hsv_to_rgb

    size = int(group.max()) + 1 if group.size and group.max() >= 0 else 1
    rng = np.random.default_rng(0)
    hsv = np.stack([rng.random(size), rng.uniform(0.55, 0.95, size), rng.uniform(0.8, 1.0, size)], axis=-1)
    rgb = hsv_to_rgb(hsv)[np.clip(group, 0, None)]
    return np.where((group >= 0)[:, None], rgb, 0.0)


def _upsample(values: np.ndarray, grid: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Per-patch values ``(h*w, ...)`` to per-pixel ``(H, W, ...)`` by nearest patch."""
    h, w = grid
    rows = np.minimum(np.arange(shape[0]) * h // shape[0], h - 1)
    cols = np.minimum(np.arange(shape[1]) * w // shape[1], w - 1)
    cell = rows[:, None] * w + cols[None, :]
    return values[cell]


def kept_picture(image: np.ndarray, grid: tuple[int, int], trace: Trace) -> np.ndarray:
    """``(H, W, 3)`` float picture: dropped patches darkened, merged ones tinted by their
    target's colour, kept ones outlined."""
    img = image.astype(np.float32) / 255.0
    shape = img.shape[:2]
    grey = img.mean(axis=-1, keepdims=True)
    colour = _upsample(group_colours(trace.group), grid, shape)
    group = _upsample(trace.group, grid, shape)[..., None]
    kept = _upsample(trace.kept, grid, shape)[..., None]
    tint = 0.45 if trace.merged else 0.0
    out = np.where(
        group < 0,
        0.25 * grey,
        np.where(kept, (1 - tint / 2) * img + tint / 2 * colour, (1 - tint) * img + tint * colour),
    )
    # A one-pixel outline around every patch whose own token survived.
    h, w = grid
    pr = np.arange(shape[0]) * h // shape[0]
    pc = np.arange(shape[1]) * w // shape[1]
    edge_r = (pr != np.r_[-1, pr[:-1]]) | (pr != np.r_[pr[1:], h])
    edge_c = (pc != np.r_[-1, pc[:-1]]) | (pc != np.r_[pc[1:], w])
    edge = (edge_r[:, None] | edge_c[None, :])[..., None] & kept
    return np.clip(np.where(edge, 1.0, out), 0.0, 1.0)


#: Pipelines per band of the picture; more columns wrap into further bands below.
COLUMNS_PER_ROW = 4
PANEL_INCHES = 3.0  # at 100 dpi: 300 pixels per column


def render(
    features: Features,
    traces: Sequence[Trace],
    output: str | Path,
    *,
    suptitle: str | None = None,
    columns_per_row: int = COLUMNS_PER_ROW,
) -> Path:
    """Write :func:`figure` as a PNG (100 dpi: 300 pixels per column)."""
    import matplotlib.pyplot as plt

    fig = figure(features, traces, suptitle=suptitle, columns_per_row=columns_per_row)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def figure(
    features: Features, traces: Sequence[Trace], *, suptitle: str | None = None, columns_per_row: int = COLUMNS_PER_ROW
) -> Any:
    """The matplotlib figure: one column per trace, its kept-patch picture on top and its heat
    map (when any trace has one) below; beyond ``columns_per_row`` columns the picture wraps
    into further bands, so it stays readable however many pipelines are compared."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if columns_per_row < 1:
        raise InvalidInputError(f"columns_per_row={columns_per_row}: must be >= 1")
    if not traces:
        raise InvalidInputError("nothing to draw: give at least one trace")
    bands = math.ceil(len(traces) / columns_per_row)
    cols = math.ceil(len(traces) / bands)  # balanced: 6 columns wrap as 3 + 3, not 4 + 2
    heat_rows = any(t.heat is not None for t in traces)
    per_band = 2 if heat_rows else 1
    title = textwrap.fill(suptitle or f"tokens: {features.source}", 40 * cols)  # ~40 characters per 300 px
    top = 0.2 + 0.15 * (title.count("\n") + 1)
    # Constrained layout keeps the column titles clear of the main title and of each other.
    fig = plt.figure(figsize=(PANEL_INCHES * cols, top + 3.3 * per_band * bands), layout="constrained")
    fig.get_layout_engine().set(h_pad=0.08, w_pad=0.05)
    axes = fig.subplots(per_band * bands, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    shape = features.image.shape[:2]
    for i, trace in enumerate(traces):
        band, col = divmod(i, cols)
        ax = axes[band * per_band][col]
        ax.imshow(kept_picture(features.image, features.grid, trace), interpolation="nearest")
        n_out = len(set(trace.group[trace.group >= 0].tolist()))
        ax.set_title(f"{trace.title}\n{n_out} of {trace.group.size} tokens", fontsize=8)
        if not heat_rows:
            continue
        ax = axes[band * per_band + 1][col]
        if trace.heat is None:
            ax.text(0.5, 0.5, "no per-token values\nreported", ha="center", va="center", fontsize=8, color="0.4")
            continue
        grey = features.image.astype(np.float32).mean(axis=-1) / 255.0
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1, alpha=0.6)
        heat = np.ma.masked_invalid(_upsample(trace.heat, features.grid, shape))
        im = ax.imshow(heat, cmap="inferno", alpha=0.75, interpolation="nearest")
        # Below the map, so that it keeps the width of the picture above it.
        bar = fig.colorbar(im, ax=ax, location="bottom", fraction=0.05, pad=0.02, aspect=30)
        bar.ax.tick_params(labelsize=6)
        ax.set_title(trace.heat_label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig


def show(
    image: str | Path,
    pipelines: Sequence[tuple[str, Pipeline]],
    output: str | Path,
    *,
    model: str | None = None,
    seed: int = 0,
) -> Path:
    """Trace each ``(title, pipeline)`` on one image and write the picture grid to ``output``."""
    if not pipelines:
        raise InvalidInputError("nothing to show: give at least one pipeline or reducer")
    img = load_image(image)
    features = model_features(img, model) if model else stand_in_features(img, seed=seed)
    traces = [trace_pipeline(features, pipe, title) for title, pipe in pipelines]
    return render(features, traces, output)


__all__ = [
    "Features",
    "Trace",
    "figure",
    "kept_picture",
    "load_image",
    "model_features",
    "render",
    "show",
    "stand_in_context",
    "stand_in_features",
    "token_to_slot",
    "trace_pipeline",
]
