"""The embedded evaluation default: a tiny random LLaVA-1.5 checkpoint, images and lmms-eval tasks.

Everything is made here, seeded, with no download, so that ``tokenreduce fidelity`` and
``tokenreduce eval --model tiny`` run anywhere and the tests exercise the real code paths
(``from_pretrained``, the processor, lmms-eval's task loading):

* :func:`write_tiny_checkpoint`: a ``LlavaForConditionalGeneration`` with LLaVA-1.5's token
  layout at tiny widths (CLIP at 336 px with 14-pixel patches: a 24 x 24 grid, 576 image
  tokens + CLS; 4-layer Llama of width 64) saved with its processor; the tokenizer is a
  word-level vocabulary of 96 tokens (ids 0-3: pad, bos, eos, ``<image>``). Budgets of
  64/128/192 tokens mean what they mean for LLaVA-1.5.
* :func:`tiny_samples`: seeded synthetic images (coloured shapes) with questions.
* :func:`write_tiny_tasks`: two lmms-eval tasks over such images, saved with
  ``datasets.save_to_disk`` and loaded by lmms-eval with ``load_from_disk``:
  ``tiny_pope`` (generate_until, yes/no accuracy, parsed as POPE does) and ``tiny_mc``
  (multiple_choice, scored from the continuations' loss).

The model's answers are those of random weights: the point is exact, repeatable
behaviour, not accuracy.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

PAD, BOS, EOS, IMAGE = 0, 1, 2, 3
VOCAB = 96
#: LLaVA-1.5's vision geometry (CLIP-L/14 at 336 px): 24 x 24 = 576 patches + CLS.
IMAGE_SIZE = 336
PATCH = 14
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "bar")
WORDS = (
    "yes no red green blue yellow square circle bar is there a an the in on of image picture what color shape "
    "answer question with single word or phrase using this object left right top bottom big small"
).split()


def tokenizer_vocab() -> list[str]:
    """The word-level vocabulary: specials, :data:`WORDS`, then filler words up to :data:`VOCAB`."""
    vocab = ["<pad>", "<s>", "</s>", "<image>", "<unk>", *WORDS]
    return vocab + [f"w{i}" for i in range(VOCAB - len(vocab))]


def tiny_processor() -> Any:
    """A ``LlavaProcessor`` for the tiny model: CLIP-style 336 px images (576 patches), word-level tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = tokenizer_vocab()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    images = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=fast,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def tiny_model(seed: int = 0, std: float = 0.15) -> Any:
    """The tiny LLaVA-1.5-layout model with seeded random weights (std > default: clear argmaxes)."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=1024,  # 576 image tokens + prompt + answer
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        rope_theta=100.0,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=32,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model.eval()


def write_tiny_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Save the tiny model and its processor to ``path`` (loadable with ``from_pretrained``)."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "processor_config.json").is_file() and _current(path):
        return path
    path.mkdir(parents=True, exist_ok=True)
    tiny_model(seed).save_pretrained(path)
    tiny_processor().save_pretrained(path)
    return path


def _current(path: Path) -> bool:
    """Whether a checkpoint written earlier has today's layout (older versions had 36 image
    tokens: a cache written by them is rewritten rather than silently reused)."""
    try:
        vision = json.loads((path / "config.json").read_text())["vision_config"]
    except (OSError, ValueError, KeyError):
        return False
    return vision.get("image_size") == IMAGE_SIZE and vision.get("patch_size") == PATCH


# -- images and questions -------------------------------------------------------------------


def tiny_image(rng: np.random.Generator, size: tuple[int, int] = (32, 40)) -> tuple[Any, str, str]:
    """An image of one coloured shape on a noisy background; returns (PIL image, colour, shape)."""
    from PIL import Image

    h, w = size
    img = (rng.random((h, w, 3)) * 60 + 100).astype(np.uint8)
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    cy, cx, r = int(rng.integers(8, h - 8)), int(rng.integers(8, w - 8)), int(rng.integers(4, 8))
    yy, xx = np.mgrid[:h, :w]
    if shape == "square":
        region = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
    elif shape == "circle":
        region = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    else:
        region = (abs(yy - cy) <= 2) & (abs(xx - cx) <= 2 * r)
    img[region] = COLORS[color]
    return Image.fromarray(img), color, shape


def tiny_samples(n: int = 4, seed: int = 0) -> list[Any]:
    """``n`` seeded :class:`~tokenreduce.evaluation.vlm.Sample` s (one image, one question each)."""
    from tokenreduce.evaluation.vlm import Sample

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image, _, _ = tiny_image(rng)
        out.append(Sample(context="what color is the shape in the image", images=[image]))
    return out


def tiny_docs(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Documents of the tiny tasks: image, a yes/no question with its answer, colour choices."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        image, color, shape = tiny_image(rng)
        asked = color if i % 2 == 0 else list(COLORS)[(list(COLORS).index(color) + 1) % len(COLORS)]
        docs.append(
            {
                "question_id": i,
                "image": image,
                "question": f"is there a {asked} {shape} in the image",
                "answer": "yes" if asked == color else "no",
                "choices": list(COLORS),
                "label": list(COLORS).index(color),
            }
        )
    return docs


_TASK_UTILS = '''
"""Document functions of the tiny lmms-eval tasks (written by tokenreduce_plugins.eval_tiny)."""


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def mc_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return "what color is the shape answer with a single word"


def doc_to_choice(doc):
    return [" " + c for c in doc["choices"]]


def pope_process_results(doc, results):
    # As POPE does: the answer is yes if the reply's first word is yes, else no.
    words = results[0].strip().lower().replace(".", " ").replace(",", " ").split()
    pred = "yes" if words and words[0] == "yes" else "no"
    return {"accuracy": float(pred == doc["answer"])}
'''


def write_tiny_tasks(folder: str | Path, n: int = 6, seed: int = 0) -> Path:
    """Write the tiny tasks' data and YAML into ``folder`` (pass it as lmms-eval's ``include_path``)."""
    from datasets import Dataset, DatasetDict, Features, Image, Sequence, Value

    folder = Path(folder)
    data = folder / "tiny_data"
    folder.mkdir(parents=True, exist_ok=True)
    features = Features(
        {
            "question_id": Value("int64"),
            "image": Image(),
            "question": Value("string"),
            "answer": Value("string"),
            "choices": Sequence(Value("string")),
            "label": Value("int64"),
        }
    )
    docs = tiny_docs(n, seed)
    columns = {k: [d[k] for d in docs] for k in features}
    DatasetDict({"test": Dataset.from_dict(columns, features=features)}).save_to_disk(str(data))
    (folder / "tiny_tasks_utils.py").write_text(textwrap.dedent(_TASK_UTILS).lstrip())
    common = {"dataset_path": str(data), "dataset_kwargs": {"load_from_disk": True}, "test_split": "test"}
    pope = {
        **common,
        "task": "tiny_pope",
        "output_type": "generate_until",
        "doc_to_visual": "!function tiny_tasks_utils.doc_to_visual",
        "doc_to_text": "!function tiny_tasks_utils.doc_to_text",
        "doc_to_target": "answer",
        "generation_kwargs": {"max_new_tokens": 4, "temperature": 0, "do_sample": False, "num_beams": 1},
        "process_results": "!function tiny_tasks_utils.pope_process_results",
        "metric_list": [{"metric": "accuracy", "aggregation": "mean", "higher_is_better": True}],
        "lmms_eval_specific_kwargs": {"default": {"pre_prompt": "", "post_prompt": " answer yes or no"}},
        "metadata": [{"version": 0.0}],
    }
    mc = {
        **common,
        "task": "tiny_mc",
        "output_type": "multiple_choice",
        "doc_to_visual": "!function tiny_tasks_utils.doc_to_visual",
        "doc_to_text": "!function tiny_tasks_utils.mc_doc_to_text",
        "doc_to_choice": "!function tiny_tasks_utils.doc_to_choice",
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": [{"version": 0.0}],
    }
    for task in (pope, mc):
        (folder / f"{task['task']}.yaml").write_text(_yaml_with_functions(task))
    return folder


def _yaml_with_functions(cfg: dict[str, Any]) -> str:
    """YAML text in which ``"!function x.y"`` strings become lmms-eval's ``!function`` tags."""
    lines = []
    for key, value in cfg.items():
        if isinstance(value, str) and value.startswith("!function "):
            lines.append(f"{key}: {value}")
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


__all__ = ["tiny_docs", "tiny_model", "tiny_processor", "tiny_samples", "write_tiny_checkpoint", "write_tiny_tasks"]
