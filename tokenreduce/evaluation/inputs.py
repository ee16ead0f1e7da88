"""Local inputs for ``tokenreduce fidelity``: a folder of images and prompts.

Folder format::

    my_inputs/
      prompts.jsonl     # optional; one JSON object per line:
                        #   {"image": "cat.jpg", "prompt": "What is the cat doing?"}
                        #   "image" may be a list of files (several images, one prompt)
      cat.jpg
      street.png

Image paths in ``prompts.jsonl`` are relative to the folder. Without ``prompts.jsonl``
every image file of the folder (``.png .jpg .jpeg .webp .bmp .gif``, sorted by name) is
used once with the default prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InvalidInputError
from .vlm import Sample

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
DEFAULT_PROMPT = "Describe the image in one sentence."


def _open(path: Path) -> object:
    from PIL import Image

    if not path.is_file():
        raise InvalidInputError(f"image not found: {path}")
    with Image.open(path) as im:
        return im.convert("RGB")


def load_folder(folder: str | Path, prompt: str = DEFAULT_PROMPT, limit: int | None = None) -> list[Sample]:
    """The samples of an input folder (see the module docstring for the format)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInputError(f"inputs folder not found: {folder}")
    listing = folder / "prompts.jsonl"
    samples: list[Sample] = []
    if listing.is_file():
        for n, line in enumerate(listing.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise InvalidInputError(f"{listing}:{n}: not valid JSON: {err.msg}") from None
            if not isinstance(entry, dict) or "image" not in entry:
                raise InvalidInputError(f'{listing}:{n}: each line needs {{"image": ..., "prompt": ...}}, got {line.strip()!r}')
            files = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
            text = entry.get("prompt", prompt)
            samples.append(Sample(context=str(text), images=[_open(folder / f) for f in files]))
    else:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        samples = [Sample(context=prompt, images=[_open(p)]) for p in files]
    if not samples:
        raise InvalidInputError(f"no inputs in {folder}: add images ({', '.join(IMAGE_SUFFIXES)}) or a prompts.jsonl")
    return samples[:limit] if limit else samples


__all__ = ["DEFAULT_PROMPT", "IMAGE_SUFFIXES", "load_folder"]
