"""Make the pictures the documentation shows (committed under docs/assets/).

    python docs/make_pictures.py [--out docs/assets]

* ``stages.svg``: the three hook points in a VLM (drawn from the list below, not by hand).
* ``show-*.png``: ``tokenreduce show`` pictures of a photograph (Grace Hopper, the
  public-domain sample image that ships with matplotlib) on the offline stand-in tokens.
* ``video-methods.png``: what each registered video method (a reducer that needs
  ``frames``; whatever is registered when this runs) keeps of a synthetic video, one row
  per method and the ``random`` / ``pool`` baselines, frames left to right (see
  :func:`video_frames` and :func:`trace_video`). Regenerate it when a video method is added.

PNGs are palette-quantised to stay small.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"

# (x, width, label, sublabel) of the boxes of the stage diagram, left to right.
BOXES = (
    (10, 90, "image", "336 x 336 px"),
    (150, 150, "vision encoder", "CLIP / SigLIP ViT"),
    (370, 110, "projector", "MLP"),
    (550, 320, "LLM decoder", ""),
)
# (x, number, stage name, what is reduced) of the hook points.
HOOKS = (
    (335, 1, "vision_encoder", "576 patch features"),
    (515, 2, "projector", "image embeddings"),
    (705, 3, "llm_layer", "hidden states at layer K"),
)
TOKENS = ((335, 144), (515, 64))  # an example schedule: the one docs/index.md describes


def stages_svg() -> str:
    """The stage diagram as an SVG document."""
    w, h = 890, 250
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
        'font-family="-apple-system, Segoe UI, Helvetica, Arial, sans-serif" role="img" '
        'aria-label="The three stages at which tokenreduce reduces visual tokens">',
        f'<rect width="{w}" height="{h}" rx="8" fill="#ffffff"/>',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
    ]
    y, bh = 60, 80
    for x, bw, label, sub in BOXES:
        out.append(
            f'<rect x="{x}" y="{y}" width="{bw}" height="{bh}" rx="6" fill="#eef0fb" stroke="#3f51b5" stroke-width="1.5"/>'
        )
        # Labels sit inside the box, except where the box holds a drawing (image, decoder layers).
        inside = label in ("vision encoder", "projector")
        ty = y + 34 if inside else (y + bh + 18 if label == "image" else y - 8)
        out.append(
            f'<text x="{x + bw / 2}" y="{ty}" text-anchor="middle" font-size="15" font-weight="600" fill="#1a237e">{label}</text>'
        )
        if sub:
            sy = y + 56 if inside else ty + 16
            out.append(f'<text x="{x + bw / 2}" y="{sy}" text-anchor="middle" font-size="12" fill="#444">{sub}</text>')
    # Patch grid icon inside the image box.
    for i in range(4):
        for j in range(4):
            out.append(f'<rect x="{31 + 12 * j}" y="{y + 16 + 12 * i}" width="11" height="11" fill="#9fa8da"/>')
    # Decoder layers, with layer K highlighted.
    lx, lw, layers, k = 565, 290, 10, 4
    for i in range(layers):
        x = lx + i * lw / layers
        hit = i == k
        out.append(
            f'<rect x="{x + 2:.1f}" y="{y + 10}" width="{lw / layers - 4:.1f}" height="{bh - 20}" rx="3" '
            f'fill="{"#ff9800" if hit else "#c5cae9"}" opacity="{1 if hit else 0.9}"/>'
        )
    out.append(
        f'<text x="{lx + (k + 0.5) * lw / layers:.1f}" y="{y + bh + 16}" text-anchor="middle" font-size="12" fill="#e65100">layer K</text>'
    )
    out.append(
        f'<text x="{lx + lw:.1f}" y="{y + bh + 16}" text-anchor="end" font-size="11" fill="#333">from layer K on: 32 tokens</text>'
    )
    # Arrows between boxes.
    for (x1, w1, *_), (x2, *_) in zip(BOXES, BOXES[1:]):
        out.append(
            f'<line x1="{x1 + w1}" y1="{y + bh / 2}" x2="{x2 - 4}" y2="{y + bh / 2}" stroke="#555" stroke-width="2" marker-end="url(#arrow)"/>'
        )
    # Text tokens enter the decoder from below.
    out.append(
        f'<line x1="600" y1="{h - 22}" x2="600" y2="{y + bh + 4}" stroke="#555" stroke-width="2" marker-end="url(#arrow)"/>'
    )
    out.append(f'<text x="610" y="{h - 24}" font-size="12" fill="#444">text tokens (prompt)</text>')
    # Hook points: numbered badges with the stage name above.
    for x, num, name, what in HOOKS:
        by = 26
        cx = x if name != "llm_layer" else lx + (k + 0.5) * lw / layers
        out.append(f'<circle cx="{cx:.1f}" cy="{by}" r="11" fill="#ff9800"/>')
        out.append(
            f'<text x="{cx:.1f}" y="{by + 4.5}" text-anchor="middle" font-size="13" font-weight="700" fill="#fff">{num}</text>'
        )
        out.append(
            f'<text x="{cx + 16:.1f}" y="{by - 4}" font-size="13" font-family="monospace" fill="#e65100">{name}</text>'
        )
        out.append(f'<text x="{cx + 16:.1f}" y="{by + 11}" font-size="11" fill="#555">{what}</text>')
        if name != "llm_layer":
            out.append(
                f'<line x1="{cx}" y1="{by + 11}" x2="{cx}" y2="{y + bh / 2 - 6}" stroke="#ff9800" stroke-width="2" stroke-dasharray="4 3"/>'
            )
    # Token counts after each encoder-side hook (an example budget schedule).
    for x, count in TOKENS:
        out.append(
            f'<text x="{x}" y="{y + bh / 2 + 18}" text-anchor="middle" font-size="11" fill="#333">{count} tokens</text>'
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def save_small_png(fig_path: Path) -> None:
    """Re-save a PNG with a 256-colour palette (pictures here are mostly flat colours)."""
    from PIL import Image

    with Image.open(fig_path) as img:
        small = img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    buf = io.BytesIO()
    small.save(buf, format="PNG", optimize=True)
    fig_path.write_bytes(buf.getvalue())


def sample_photo() -> Path:
    """The photograph that ships with matplotlib (no download)."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def figures() -> dict[str, list]:
    """``file name -> [(title, pipeline), ...]``: the columns of every ``tokenreduce show``
    picture and the rows of the video picture (:data:`VIDEO_PICTURE`)."""
    from tokenreduce import Pipeline
    from tokenreduce.runner import pipeline_from_arg

    return {
        VIDEO_PICTURE: video_rows(),
        "show-reducers.png": [
            ("", pipeline_from_arg(n, 64, "projector", None)) for n in ("apet", "tome", "pool", "divprune")
        ],
        "show-attention.png": [
            ("", pipeline_from_arg(n, 64, s, None))
            for n, s in (("cls_attn", "projector"), ("visionzip", "projector"), ("fastv", "llm_layer"))
        ],
        "show-pipeline.png": pipeline_steps(Pipeline.coerce(ROOT / "examples" / "pipeline.yaml")),
    }


def pipeline_steps(pipeline) -> list:
    """``examples/pipeline.yaml`` step by step: one column after each of its steps."""
    from tokenreduce import Pipeline

    return [
        (f"examples/pipeline.yaml, step{'s' if k > 1 else ''} 1{f'-{k}' if k > 1 else ''}", Pipeline(pipeline.steps[:k]))
        for k in range(1, len(pipeline.steps) + 1)
    ]


def pictures(out: Path, only: str | None = None) -> list[Path]:
    """Write every picture (or the one named ``only``) into ``out``; returns their paths."""
    from tokenreduce.visualize import show

    out.mkdir(parents=True, exist_ok=True)
    made = []
    if only in (None, "stages.svg"):
        svg = out / "stages.svg"
        svg.write_text(stages_svg())
        made.append(svg)
    for name, columns in figures().items():
        if only not in (None, name):
            continue
        path = video_picture(columns, out / name) if name == VIDEO_PICTURE else show(sample_photo(), columns, out / name)
        save_small_png(path)
        made.append(path)
    return made


# -- the video picture ---------------------------------------------------------------------------------

VIDEO_PICTURE = "video-methods.png"
#: The synthetic video: frames of a LLaVA-OneVision pooled frame's grid (14 x 14 tokens).
VIDEO_FRAMES = 8
VIDEO_SIDE = 14
VIDEO_PATCH = 12  # pixels per token side in the picture
VIDEO_CUT = 5  # the camera cuts to another scene before this frame
#: Share of the video's tokens every row keeps (the benchmark's video row keeps the same).
VIDEO_RATIO = 0.1
VIDEO_BASELINES = ("random", "pool")


def _benchmarks_video():
    """:mod:`benchmarks.video` (the repository root on the path): the rows use its plans, so the
    picture shows each method's step exactly as the benchmark runs it."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import video

    return video


def video_rows() -> list:
    """``[(title, pipeline), ...]``: every registered video method, then the baselines.

    Each row is the method's first step as the benchmark's video row runs it (its published
    stage, or its YAML example's first step, with that example's parameters) at
    :data:`VIDEO_RATIO` of the video, under ``video_budget: per_video``. A method's later
    ``llm_layer`` part (its companion) needs the decoder's attention to the question, which a
    picture without a model does not have: it is not drawn.
    """
    from tokenreduce import Pipeline, Stage, Step, create, get_registry

    video = _benchmarks_video()
    names = video.video_methods() + [b for b in VIDEO_BASELINES if b in get_registry().reducers]
    rows = []
    for name in names:
        first = video.method_plan(name, video.EXAMPLE_DEPTH, VIDEO_RATIO)[0]
        stage = Stage(first.stage)
        step = Step(stage, create(name, VIDEO_RATIO, stage=stage, **dict(first.params)), layer=first.layer)
        rows.append((f"{name}@{stage.value}", Pipeline([step], video_budget="per_video")))
    return rows


def video_frames(frames: int = VIDEO_FRAMES, side: int = VIDEO_SIDE, patch: int = VIDEO_PATCH):
    """``(T, H, W, 3)`` uint8: a synthetic clip whose motion is known.

    A static outdoor scene (sky, sun, house, tree, grass) in which a red ball rolls left to
    right and a blue car drives right to left; at :data:`VIDEO_CUT` the camera cuts to an
    indoor scene (wall, window, table) where the ball keeps rolling. Every frame gets a
    little seeded sensor noise, so the static background is near-identical over time, not
    bit-identical.
    """
    import numpy as np

    size = side * patch
    yy, xx = np.mgrid[0:size, 0:size] / size  # (0..1) rows and columns
    rng = np.random.default_rng(0)
    out = []
    for t in range(frames):
        img = np.zeros((size, size, 3), np.float32)
        if t < VIDEO_CUT:
            sky = np.stack([0.55 + 0.35 * yy, 0.75 + 0.2 * yy, np.ones_like(yy)], -1)
            img[:] = np.where((yy < 0.62)[..., None], sky, np.array([0.35, 0.62, 0.25], np.float32))
            img[(xx - 0.82) ** 2 + (yy - 0.15) ** 2 < 0.006] = (1.0, 0.85, 0.2)  # sun
            img[(xx > 0.1) & (xx < 0.35) & (yy > 0.38) & (yy < 0.62)] = (0.6, 0.4, 0.25)  # house
            roof = (yy > 0.24) & (yy <= 0.38) & (np.abs(xx - 0.225) < (yy - 0.24) * 1.0)
            img[roof] = (0.7, 0.15, 0.15)
            img[(xx > 0.2) & (xx < 0.25) & (yy > 0.5) & (yy < 0.62)] = (0.3, 0.2, 0.1)  # door
            img[(xx > 0.6) & (xx < 0.64) & (yy > 0.45) & (yy < 0.62)] = (0.4, 0.25, 0.1)  # tree trunk
            img[(xx - 0.62) ** 2 + (yy - 0.38) ** 2 < 0.012] = (0.1, 0.4, 0.15)  # crown
            # The car drives right to left along the road.
            cx = 0.85 - 0.15 * t
            img[(np.abs(xx - cx) < 0.09) & (yy > 0.8) & (yy < 0.88)] = (0.15, 0.3, 0.85)
            img[(np.abs(xx - cx) < 0.05) & (yy > 0.74) & (yy <= 0.8)] = (0.5, 0.7, 0.95)
        else:
            img[:] = np.stack([0.85 - 0.1 * xx, 0.8 - 0.1 * xx, 0.7 - 0.05 * xx], -1)  # wall
            img[(xx > 0.55) & (xx < 0.9) & (yy > 0.1) & (yy < 0.45)] = (0.6, 0.8, 1.0)  # window
            img[(np.abs(xx - 0.725) < 0.01) & (yy > 0.1) & (yy < 0.45)] = (0.4, 0.3, 0.2)
            img[yy > 0.7] = (0.55, 0.35, 0.2)  # floor
            img[(xx > 0.08) & (xx < 0.42) & (yy > 0.45) & (yy < 0.5)] = (0.45, 0.25, 0.1)  # table top
        # The ball rolls left to right through both scenes.
        bx, by = 0.08 + 0.12 * t, 0.68
        img[(xx - bx) ** 2 + (yy - by) ** 2 < 0.0045] = (0.9, 0.1, 0.1)
        img = img + rng.normal(0.0, 0.015, img.shape).astype(np.float32)
        out.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return np.stack(out)


def video_tokens(frames, patch: int = VIDEO_PATCH, dim: int = 256, seed: int = 0):
    """``(1, T*h*w, dim)`` stand-in tokens of a clip, frame after frame (raster order inside a
    frame), as :func:`tokenreduce.visualize.stand_in_features` makes them for one image: each
    patch's pixels, centred over the whole clip, through one fixed seeded random projection, so
    a patch that does not change over time keeps (nearly) the same token."""
    import math

    import torch

    t, size, _, _ = frames.shape
    side = size // patch
    x = torch.from_numpy(frames.astype("float32") / 255.0)
    patches = x.reshape(t, side, patch, side, patch, 3).permute(0, 1, 3, 2, 4, 5).reshape(t * side * side, -1)
    patches = patches - patches.mean(dim=0, keepdim=True)
    proj = torch.randn(patches.shape[1], dim, generator=torch.Generator().manual_seed(seed)) / math.sqrt(dim)
    return (patches @ proj).unsqueeze(0)


def trace_video(tokens, frames: int, grid: tuple[int, int], pipeline, title: str):
    """What ``pipeline`` did to every token of one whole video (a
    :class:`tokenreduce.visualize.Trace`), each step given the temporal context an adapter
    gives a video row under ``video_budget: per_video``: ``frames``, ``frame_index`` (kept
    right after each step) and the stacked grid ``(T*h, w)`` while every token is present;
    other context from :func:`tokenreduce.visualize.stand_in_context`."""
    import torch

    from tokenreduce.visualize import Trace, stand_in_context, token_to_slot

    x = tokens
    n0 = x.shape[1]
    stacked = (frames * grid[0], grid[1])
    frame_index = torch.arange(n0) // (grid[0] * grid[1])
    group = torch.arange(n0)
    kept = torch.ones(n0, dtype=torch.bool)
    merged_any = False
    records = []
    for step in pipeline:
        ctx = stand_in_context(x, step, stacked if x.shape[1] == n0 else None)
        ctx.frames, ctx.frame_index = frames, frame_index[None]
        before = x.shape[1]
        out = step.reducer(x, context=ctx)
        to_slot, merged = token_to_slot(out, x)
        merged_any |= merged
        alive = group >= 0
        kept = kept & alive & out.keep_mask[0][group.clamp(min=0)]
        group = torch.where(alive, to_slot[group.clamp(min=0)], group)
        t = int(out.counts[0])
        x = out.tokens[:, :t]
        frame_index = frame_index[out.indices[0, :t]]
        records.append(f"{step.reducer.name}@{step.stage.value} {before}->{t}")
    return Trace(title=title, group=group.numpy(), kept=kept.numpy(), merged=merged_any, records=records)


def video_picture(rows: list, output: Path) -> Path:
    """The video picture: the clip on top, then one row per ``(title, pipeline)``, frames left
    to right; kept tokens outlined, merged ones tinted with their target's colour (a token
    merged into one of an earlier frame shares its colour), dropped ones darkened."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    from tokenreduce.visualize import kept_picture

    clip = video_frames()
    t, size = clip.shape[0], clip.shape[1]
    grid = (VIDEO_SIDE, VIDEO_SIDE)
    tokens = video_tokens(clip)
    n = tokens.shape[1]
    stacked = clip.reshape(t * size, size, 3)
    traces = [trace_video(tokens, t, grid, pipe, title) for title, pipe in rows]
    fig, axes = plt.subplots(
        1 + len(traces), t, figsize=(1.25 * t + 1.9, 1.45 * (1 + len(traces)) + 0.5), squeeze=False, layout="constrained"
    )
    per = VIDEO_SIDE * VIDEO_SIDE
    for j in range(t):
        axes[0][j].imshow(clip[j])
        axes[0][j].set_title(f"frame {j}" + (" (cut)" if j == VIDEO_CUT else ""), fontsize=8)
    axes[0][0].set_ylabel(f"the clip\n{t} x {per} tokens", fontsize=8)
    for i, trace in enumerate(traces, start=1):
        picture = kept_picture(stacked, (t * VIDEO_SIDE, VIDEO_SIDE), trace)
        out_tokens = len(set(trace.group[trace.group >= 0].tolist()))
        for j in range(t):
            ax = axes[i][j]
            ax.imshow(picture[j * size : (j + 1) * size])
            own = int(trace.kept[j * per : (j + 1) * per].sum())
            ax.set_xlabel(f"{own} kept", fontsize=7, labelpad=1)
        axes[i][0].set_ylabel(f"{trace.title}\n{out_tokens} of {n}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"What each video method keeps of one {t}-frame video at {VIDEO_RATIO:.0%} of its tokens (per video): "
        "kept tokens outlined, merged ones tinted with their target's colour, dropped ones dark",
        fontsize=9,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS)
    parser.add_argument("--only", default=None, help="make only this picture (a file name, e.g. video-methods.png)")
    args = parser.parse_args(argv)
    names = ["stages.svg", *figures()]
    if args.only is not None and args.only not in names:
        parser.error(f"--only {args.only!r}: not one of the pictures ({', '.join(names)})")
    for path in pictures(args.out, args.only):
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
