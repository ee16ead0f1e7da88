"""Adapter for Qwen2-VL, Qwen2.5-VL and Qwen3-VL (transformers 5.x): dynamic resolution, 2x2 merger, 3-D M-RoPE.

Nothing of the modeling code is copied: the adapter wraps the model's ``forward`` (the
``*ForConditionalGeneration`` and the inner ``*Model``) and its ``get_image_features`` /
``get_video_features`` (instance attributes, removed by ``detach``), and reuses the stock
feature getters, merger, ``compute_3d_position_ids`` and forward.

Stages
------
* ``vision_encoder``: the vision tower's output **before** the patch merger. The merger
  concatenates each 2x2 block of neighbouring patches (four consecutive rows of the
  tower's output) into one token, so this stage reduces in units of merge groups: a
  token is one group, ``4 * D_v`` wide (the four patch features concatenated, in natural
  raster order, i.e. after undoing Qwen2.5-VL's window reordering; see
  :mod:`.qwen_vision`). The stock merger then runs on the kept (or merged) groups.
  Selecting groups here equals selecting the merged tokens at the projector; merging
  reducers average groups before the merger's MLP.
* ``projector``: the merger's output (LLM width), before the features are spliced into
  the text sequence; this is where the ApET and VisionZip Qwen code reduce.
* ``llm_layer``: image tokens of the hidden sequence at decoder layer K, by the
  model-generic :class:`~tokenreduce_plugins.adapters.decoder.DecoderReduction` on the
  text model (3-D ids are gathered along their last dim). Qwen3-VL adds DeepStack
  features after its first layers, so there K must come after them.

Each image is reduced on its own budget. A video is reduced per frame (temporal patch)
or as a whole, as the pipeline's ``video_budget`` says (``per_frame``: each frame is a
unit with the frame's ``(h, w)`` grid; ``per_video``: the video is one unit whose grid is
its frames stacked vertically, ``(t * h, w)``). Units are padded into one batch with a
validity mask and reduced in one call per distinct grid (a reducer reading
``context.grid`` needs one grid per call), see :mod:`.units`.

Positions
---------
* ``original`` (the default for Qwen): each kept token keeps the 3-D M-RoPE id the stock
  model computes on the unreduced input (``compute_3d_position_ids``, or the ids
  ``generate()`` passes); text keeps its ids too. Decoding continues as the stock model
  would: under ``generate()`` with exactly the stock ``generate()`` ids; in a plain
  forward loop the first new token gets ``max(prompt ids) + 1`` (the stock
  ``rope_deltas`` rule).
* ``compact``: the shortened sequence is renumbered ``0, 1, 2, ...`` on all three axes,
  as LLaVA-style pruning renumbers it. With M-RoPE an image advances the position by
  ``max(h, w)`` however many tokens it keeps, so the only renumbering that shortens
  anything is 1-D; it drops the 2-D layout of the image ids the model was trained with,
  hence ``original`` is the default. A pipeline with ``compact`` and ``llm_layer`` steps
  uses 1-D ids from the prompt on (also when no encoder-side step removed anything),
  because layer K renumbers by subtracting the tokens removed before each token, which
  is only meaningful for 1-D ids.

Sequence bookkeeping
--------------------
``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``labels`` and the position ids
are cut to the real tokens minus the dropped placeholders, so the stock forward's own
check (placeholder count == feature count) passes; the shortened rows are left-padded
afresh (an attention mask is created when rows differ in length). Logits (and the
cache) cover the shortened sequence. Later calls that continue the cache of a reduced
prompt (``generate()`` steps, or a loop passing ``cache=out.cache``) get their
full-length attention mask and position ids translated
(:class:`~.qwen_sequence.DecodeState`, kept per cache object). ``generate()`` pre-encodes
images into ``mm_encoder_outputs`` before the first forward (and may repeat them for
beam search): the wrapped feature getters tag each image's features with its grid (and
merge groups), so the reduction still runs in the forward, with full context.

Context
-------
Qwen's vision tower has no [CLS] token and the adapter exposes no vision keys, so a
reducer that needs ``cls_token``, ``cls_attention``, ``keys`` (or other context it cannot
give) at an encoder-side stage is refused at patch time. Reducers get ``grid`` (the
unit's token grid while it is complete), ``positions`` (``(U, N, 3)`` original M-RoPE
ids), ``text_embeds`` / ``text_mask`` (embeddings of the text tokens of the unit's
sequence, only when required) and ``extra`` (``modality``, ``rows``, ``items``).

Records
-------
One :class:`~tokenreduce.adapter.StageRecord` per encoder-side step and modality per
prefill, with one entry per unit: ``indices`` index the unit's unreduced merged-token
grid (raster order; a merged token's is its representative's), ``info`` the reducer's
diagnostics for that unit plus ``modality`` and ``item``. ``llm_layer`` records come from
the decoder reduction (one entry per batch row). Records are reset at every forward
except those continuing a reduced prompt's cache, so after ``generate()`` they describe
the prompt.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from transformers.cache_utils import Cache

from tokenreduce import Stage
from tokenreduce.adapter import Adapter
from tokenreduce.errors import ConfigError, InvalidInputError, MissingContextError

from . import compat, varlen_attention
from .decoder import DecoderReduction
from .qwen_encoder import MODALITIES, PROVIDED, PROVIDED_PER_VIDEO, EncoderSide, Prompt
from .qwen_sequence import DecodeState, Shrink, sequence_positions
from .qwen_vision import meta_of

# Why the encoder-side stages cannot give some context (what they do give: ``PROVIDED``).
_WHY_NOT = {
    "cls_token": "the Qwen-VL vision tower has no [CLS] token",
    "cls_attention": "the Qwen-VL vision tower has no [CLS] token",
    "keys": "the Qwen-VL adapter does not expose vision-tower keys",
    "text_keys": "keys exist only inside the decoder (llm_layer stage)",
    "attention": "decoder attention exists only at the llm_layer stage",
    "frames": "only whole videos have frames: set the pipeline's video_budget to per_video",
    "frame_index": "only whole videos have frames: set the pipeline's video_budget to per_video",
}
_MISSING = object()


class QwenVLAdapter(Adapter):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL: all three stages with 3-D M-RoPE bookkeeping (see the module docs)."""

    name = "qwen-vl"
    model_classes: ClassVar[tuple[str, ...]] = (
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2VLForConditionalGeneration",
        "Qwen3VLForConditionalGeneration",
        "Qwen2_5_VLModel",
        "Qwen2VLModel",
        "Qwen3VLModel",
    )
    default_positions = "original"

    def __init__(self, model: torch.nn.Module, pipeline: Any):
        super().__init__(model, pipeline)
        # ``*ForConditionalGeneration`` holds the multimodal model in ``.model``.
        self.inner = model.model if hasattr(model, "lm_head") else model
        self.encoder = EncoderSide(self.inner, pipeline, self.records)
        self._saved: list[tuple[torch.nn.Module, str, Any]] = []
        self._busy = False
        # Per cache object filled by a reduced prefill: how to continue it (several may be alive).
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._decoder: DecoderReduction | None = None
        self._attn_saved: tuple[Any, str | None] | None = None  # the tower's attention before the fast path

    # -- patch-time checks -------------------------------------------------------------

    def validate(self) -> None:
        compat.check_supported()
        if self.positions not in ("original", "compact"):
            raise ConfigError(f"positions={self.positions!r} is not supported; use 'original' or 'compact'")
        llm_steps = self.steps(Stage.LLM_LAYER)
        deepstack = len(getattr(self.inner.config.vision_config, "deepstack_visual_indexes", None) or ())
        for step in llm_steps:
            if step.layer is not None and step.layer < deepstack:
                raise ConfigError(
                    f"llm_layer step {step.reducer.name!r}: layer={step.layer} is out of range for "
                    f"{type(self.model).__name__}: its DeepStack adds vision features after decoder layers "
                    f"0..{deepstack - 1}, so image tokens can be removed from layer {deepstack} on"
                )
        if llm_steps:  # checks layers and attention settings, raises ConfigError
            self._decoder = DecoderReduction(
                self.inner.language_model, llm_steps, positions=self.positions, on_record=self.records.append
            )
        for step in self.pipeline:
            if step.stage is Stage.LLM_LAYER:
                continue
            provided = PROVIDED_PER_VIDEO if self.pipeline.video_budget == "per_video" else PROVIDED
            missing = sorted(set(step.reducer.required_context) - provided)
            if missing:
                why = "; ".join(f"{m}: {_WHY_NOT.get(m, 'not provided by this adapter')}" for m in missing)
                raise MissingContextError(
                    f"reducer {step.reducer.name!r} at stage {step.stage.value!r} needs context "
                    f"{', '.join(missing)}, which {type(self.model).__name__} cannot provide ({why}); "
                    "use a reducer that scores the tokens themselves (e.g. 'random', 'pool', 'apet')"
                )

    # -- installing / removing ---------------------------------------------------------

    def attach(self) -> None:
        modules = [self.model] if self.inner is self.model else [self.model, self.inner]
        for module in modules:
            self._set(module, "forward", self._wrap_forward(module.forward))
        for modality in MODALITIES:
            name = f"get_{modality}_features"
            self._set(self.inner, name, self._wrap_features(getattr(self.inner, name)))
        if self._decoder is not None:
            self._decoder.attach()
        if self.pipeline.fast:
            self._fast_tower()

    def _fast_tower(self) -> None:
        """The fast path's tower: each layer's windows (or images) in one attention call.

        Under SDPA/eager the stock tower calls attention once per window (thousands of calls
        at high resolution); flash-attention already makes one varlen call and is kept.
        """
        warnings.warn(
            f"tokenreduce fast path: {type(self.model).__name__}'s decoder runs eagerly: capturing its prefill "
            "(M-RoPE positions) is not built yet; its vision tower takes the fast path",
            stacklevel=4,
        )
        config = self.inner.visual.config
        current = config._attn_implementation
        if current is not None and "flash" in current:
            return
        self._attn_saved = (config, current)
        config._attn_implementation = varlen_attention.register()

    def _set(self, module: torch.nn.Module, name: str, value: Any) -> None:
        self._saved.append((module, name, module.__dict__.get(name, _MISSING)))
        setattr(module, name, value)

    def detach(self) -> None:
        if self._attn_saved is not None:
            config, implementation = self._attn_saved
            config._attn_implementation = implementation
            self._attn_saved = None
        if self._decoder is not None:
            self._decoder.detach()
        for module, name, saved in reversed(self._saved):
            if saved is _MISSING:
                module.__dict__.pop(name, None)
            else:
                setattr(module, name, saved)
        self._saved.clear()
        self._states = weakref.WeakKeyDictionary()

    def _wrap_features(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        # (pixel_values, grid_thw) are named per modality: image_grid_thw / pixel_values_videos, ...
        sig = inspect.signature(orig)
        pixels_name, grid_name = list(sig.parameters)[:2]

        @functools.wraps(orig)
        def get_features(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            kw = dict(bound.arguments)
            for p in sig.parameters.values():
                if p.kind is p.VAR_KEYWORD:
                    kw.update(kw.pop(p.name, {}))
            pixels, grid_thw = kw.pop(pixels_name), kw.pop(grid_name)
            if grid_thw is None:
                return orig(pixels, grid_thw, **kw)
            kw["return_dict"] = True
            groups = bool(self.steps(Stage.VISION_ENCODER))
            return self.encoder.vision.features(orig, pixels, grid_thw, groups, **kw)

        return get_features

    def _wrap_forward(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(orig)
        var_kw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)

        @functools.wraps(orig)
        def forward(*args: Any, **kwargs: Any) -> Any:
            # The top-level forward calls the inner one: only the outermost call reduces.
            if self._busy:
                return orig(*args, **kwargs)
            kw = dict(sig.bind(*args, **kwargs).arguments)
            if var_kw is not None:
                kw.update(kw.pop(var_kw, {}))
            kw = compat.canonical_kwargs(kw)  # internally the cache is always ``cache``
            self._busy = True
            try:
                return self._call(orig, kw)
            finally:
                self._busy = False

        return forward

    # -- one forward call -----------------------------------------------------------------

    def _encoder_steps(self) -> bool:
        return bool(self.steps(Stage.VISION_ENCODER) or self.steps(Stage.PROJECTOR))

    def _renumbers(self) -> bool:
        """``compact`` with llm_layer steps: 1-D ids from the start, so that layer K can renumber them.

        The decoder renumbers by subtracting the tokens removed before each token, which is
        only meaningful for 1-D ids; with M-RoPE ids the text after an image would land
        before the image's own ids.
        """
        return self.positions == "compact" and self._decoder is not None

    @staticmethod
    def _has_vision(kw: dict[str, Any]) -> bool:
        pre = kw.get("mm_encoder_outputs") or {}
        return (
            kw.get("pixel_values") is not None
            or kw.get("pixel_values_videos") is not None
            or any(pre.get(m) is not None for m in MODALITIES)
        )

    def _call(self, orig: Callable[..., Any], kw: dict[str, Any]) -> Any:
        has_vision = self._has_vision(kw)
        cache = kw.get("cache")
        state = self._states.get(cache) if cache is not None and not has_vision else None
        if state is not None and cache.get_seq_length() > 0:
            return self._forward(orig, state.translate(kw))
        if has_vision:  # a new prompt: its records replace the last one's (decoding steps add theirs)
            self.records.clear()
        if not (has_vision and (self._encoder_steps() or self._renumbers())):
            return self._forward(orig, kw)
        kw, pending, served = self._prefill(kw, compat.takes_encoder_outputs(orig))
        with compat.serving_features(self.inner, served):
            out = self._forward(orig, kw)
        if pending is not None:
            fields = out if isinstance(out, tuple) else (compat.output_cache(out),)
            cache = next((x for x in fields if isinstance(x, Cache)), kw.get("cache"))
            if cache is not None:
                self._states[cache] = pending
        return out

    def _forward(self, orig: Callable[..., Any], kw: dict[str, Any]) -> Any:
        """The stock forward, telling the decoder-layer reduction where the image tokens are."""
        kw = compat.native_kwargs(orig, kw)
        if self._decoder is None:
            return orig(**kw)
        ids = kw.get("input_ids")
        cfg = self.inner.config
        image = None if ids is None else (ids == cfg.image_token_id) | (ids == cfg.video_token_id)
        self._decoder.set_image_mask(image, self._common_grid(kw))
        labels = kw.pop("labels", None)
        out = orig(**kw)
        return out if labels is None else self._loss_after_layers(out, labels)

    def _common_grid(self, kw: dict[str, Any]) -> tuple[int, int] | None:
        """The merged-token grid shared by all images of the call, if there is one (for ``context.grid``).

        The decoder reduction uses it only where every row holds exactly that many image tokens.
        """
        pre = kw.get("mm_encoder_outputs") or {}
        if kw.get("pixel_values_videos") is not None or pre.get("video") is not None:
            return None
        grid_thw = kw.get("image_grid_thw")
        if grid_thw is not None:
            grids = {tuple(g) for g in grid_thw.tolist()}
        elif pre.get("image") is not None:
            metas = [meta_of(t) for t in pre["image"].pooler_output]
            grids = {m.thw if m is not None else None for m in metas}
        else:
            return None
        if len(grids) != 1 or None in grids:
            return None
        t, h, w = grids.pop()
        merge = self.encoder.vision.merge_size
        return (h // merge, w // merge) if t == 1 else None

    def _loss_after_layers(self, out: Any, labels: torch.Tensor) -> Any:
        """The stock loss on the logits of a sequence shortened inside the decoder (labels follow the kept tokens)."""
        kept = self._decoder.last_kept if self._decoder is not None else None
        if kept is not None:
            labels = torch.gather(labels, 1, kept.clamp(min=0)).masked_fill(kept < 0, -100)
        vocab = getattr(self.model.config, "text_config", self.model.config).vocab_size
        loss = self.model.loss_function(logits=out.logits, labels=labels, vocab_size=vocab)
        return type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})

    # -- prefill -----------------------------------------------------------------------------

    def _full_positions(self, kw: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stock model's ``(3, B, L)`` rotary ids of the unreduced prompt, and the 1-D row if given."""
        ids = kw["input_ids"]
        batch, length = ids.shape
        pos = kw.get("position_ids")
        if pos is not None:
            if pos.dim() == 3 and pos.shape[0] == 4:
                return pos[1:], pos[0]
            if pos.dim() == 3:
                return pos, None
            return pos.unsqueeze(0).expand(3, batch, -1), None
        args = {
            "input_ids": ids,
            "inputs_embeds": ids.new_empty((batch, length, 0), dtype=torch.float32),
            "image_grid_thw": kw.get("image_grid_thw"),
            "video_grid_thw": kw.get("video_grid_thw"),
            "attention_mask": kw.get("attention_mask"),
            "cache": kw.get("cache"),
            "second_per_grid_ts": kw.get("second_per_grid_ts"),
            "mm_token_type_ids": kw.get("mm_token_type_ids"),
        }
        pos3 = compat.compute_3d_position_ids(self.inner, **args)
        if pos3 is None:  # the stock text model then numbers the sequence 0..L-1 on all axes
            pos3 = torch.arange(length, device=ids.device).expand(3, batch, length)
        return pos3, None

    def _prefill(
        self, kw: dict[str, Any], takes_outputs: bool
    ) -> tuple[dict[str, Any], DecodeState | None, dict[str, Any]]:
        """The shortened call, how to continue its cache, and what the feature getters must serve.

        ``takes_outputs``: the stock forward accepts the reduced features as
        ``mm_encoder_outputs``; otherwise the pixel inputs stay and the model's own feature
        getters serve the reduced features during the call (:func:`.compat.serving_features`).
        """
        ids = kw.get("input_ids")
        if ids is None:
            raise InvalidInputError(
                "reducing visual tokens needs input_ids (its placeholder tokens mark where each image's "
                "tokens go); got inputs_embeds only"
            )
        cache = kw.get("cache")
        if cache is not None and cache.get_seq_length() > 0:
            raise InvalidInputError(
                f"new images on top of a non-empty cache ({cache.get_seq_length()} tokens) are not supported "
                "while visual tokens are reduced; start from an empty cache"
            )
        mask = kw.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise InvalidInputError(
                f"attention_mask must be 2-D (B, L) while visual tokens are reduced, got shape {tuple(mask.shape)} "
                "(static/compiled caches, which get 4-D masks, are not supported)"
            )
        if kw.get("inputs_embeds") is not None:
            raise InvalidInputError(
                "pass input_ids, not inputs_embeds, together with images while visual tokens are reduced"
            )
        pos3, text_row = self._full_positions(kw)
        prompt = Prompt(self.inner, ids, mask, pos3)

        # Kept columns: every real token but the dropped placeholders (old padding is dropped too:
        # the shortened rows are left-padded afresh).
        keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        dropped = False
        outputs = dict(kw.get("mm_encoder_outputs") or {})
        for modality in MODALITIES:
            reduced = self.encoder.reduce(modality, kw, prompt)
            if reduced is not None:
                outputs[modality], token_mask, keep_tokens = reduced
                keep[token_mask] = keep_tokens
                dropped = dropped or not bool(keep_tokens.all())
        served: dict[str, Any] = {}
        if takes_outputs:
            kw["pixel_values"] = None
            kw["pixel_values_videos"] = None
            kw["mm_encoder_outputs"] = outputs
        else:
            served = outputs
        if not dropped and not self._renumbers():  # nothing removed: the stock forward does the rest
            return kw, None, served

        shrink = Shrink.from_keep(keep)
        batch, red_len = shrink.index.shape
        mask_red = shrink.mask(mask)
        kw["input_ids"] = shrink.take(ids, self._pad_id())
        kw["attention_mask"] = mask_red
        for key, fill in (("mm_token_type_ids", 0), ("labels", -100)):
            if kw.get(key) is not None:
                kw[key] = shrink.take(kw[key], fill)
        seq_red = sequence_positions(mask_red, batch, red_len, ids.device)
        if self.positions == "original":
            pos_red = shrink.take(pos3, 0)
        else:
            pos_red = seq_red.unsqueeze(0).expand(3, batch, red_len)
        kw["position_ids"] = pos_red if text_row is None else torch.cat([seq_red.unsqueeze(0), pos_red], dim=0)

        # Where decoding continues, and how to shift caller-given ids of later steps.
        seq_full = text_row if text_row is not None else sequence_positions(mask, batch, ids.shape[1], ids.device)
        if self.positions == "original":
            valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            next_pos = pos3.masked_fill(~valid, 0).amax(dim=(0, 2)).unsqueeze(1) + 1
            rope_shift = torch.zeros(3, batch, 1, dtype=pos3.dtype, device=pos3.device)
        else:
            next_pos = seq_red[:, -1:] + 1
            rope_shift = pos_red[..., -1:] - pos3[..., -1:]
        state = DecodeState(
            full_len=ids.shape[1],
            red_len=red_len,
            mask_prefix=mask_red,
            next_pos=next_pos,
            text_shift=seq_red[:, -1:] - seq_full[:, -1:],
            rope_shift=rope_shift,
        )
        return kw, state, served

    def _pad_id(self) -> int:
        cfg = self.inner.config
        pad = getattr(getattr(cfg, "text_config", cfg), "pad_token_id", None)
        return 0 if pad is None or pad in (cfg.image_token_id, cfg.video_token_id) else int(pad)
