"""Make the pictures the documentation shows (committed under docs/assets/).

    python docs/make_pictures.py [--out docs/assets]

* ``stages.svg``: the three hook points in a VLM (drawn from the list below, not by hand).
* ``show-*.png``: ``tokenreduce show`` pictures of a photograph (Grace Hopper, the
  public-domain sample image that ships with matplotlib) on the offline stand-in tokens.
  PNGs are palette-quantised to stay small.
"""

from __future__ import annotations

import argparse
import io
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
    """``file name -> [(column title, pipeline), ...]`` of every ``tokenreduce show`` picture."""
    from tokenreduce import Pipeline
    from tokenreduce.runner import pipeline_from_arg

    return {
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


def pictures(out: Path) -> list[Path]:
    """Write every picture into ``out``; returns their paths."""
    from tokenreduce.visualize import show

    out.mkdir(parents=True, exist_ok=True)
    svg = out / "stages.svg"
    svg.write_text(stages_svg())
    made = [svg]
    for name, columns in figures().items():
        path = show(sample_photo(), columns, out / name)
        save_small_png(path)
        made.append(path)
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args(argv)
    for path in pictures(args.out):
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
