"""Adapter for Gemma 3 (``Gemma3ForConditionalGeneration``: SigLIP, pooling projector, Gemma 3 decoder)."""

from __future__ import annotations

import torch


from .engine import Family
from .llava_base import Encoded, LlavaFamilyAdapter
from .units import Units, keep_mask
from .vision import VisionContext, vision_context


class Gemma3Adapter(LlavaFamilyAdapter):
    """Gemma 3: each image is a ``p x p`` SigLIP patch grid that the projector average-pools
    to ``s x s`` tokens (``mm_tokens_per_image``, 16 x 16 in the released checkpoints), then
    RMS-normalises and projects into the LLM width.

    ``projector`` steps see those ``s x s`` projected tokens; ``vision_encoder`` steps see
    the same ``s x s`` cells in the vision width, pooled but not yet normalised and
    projected (the model pools inside its projector: a budget counts the same tokens at
    both stages). Context: the pooled cells' keys (the last SigLIP layer's, head-averaged,
    averaged over each cell's patches), the grid while it is intact, the instruction's
    embeddings. SigLIP has no [CLS] token: ``cls_token``/``cls_attention`` are not available.

    The decoder attends bidirectionally within each run of image tokens (``token_type_ids``):
    the shortened ``token_type_ids`` keep each image's kept tokens one run, and ``llm_layer``
    steps keep the kept tokens' runs in the masks they rebuild (sliding-window layers too).
    Deviation: attention rows recomputed for a reducer are causal; they differ from the
    model's only for a query that is itself an image token (a prompt ending in an image).
    """

    family = Family("gemma3", ("Gemma3ForConditionalGeneration",))
    def llm_grid(self) -> tuple[int, int]:
        side = self.inner.multi_modal_projector.tokens_per_side
        return side, side

    # -- the decoder sees Gemma's mask mapping, not the 2-D mask and runs it was built from --

    def attach(self) -> None:
        super().attach()
        if self.decoder is not None:
            self.patches.hook(self.inner.register_forward_pre_hook(self._decoder_inputs, with_kwargs=True))

    def _decoder_inputs(self, module, args, kwargs) -> None:
        # Imported here, not at registration (see LlavaNextAdapter.num_patches).
        from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

        types = kwargs.get("token_type_ids")
        blocks = None if types is None else get_block_sequence_ids_for_mask(types)
        self.decoder.set_image_mask(
            self._media_mask(kwargs), self.llm_grid(), padding=kwargs.get("attention_mask"), blocks=blocks
        )

    # -- encoder side ------------------------------------------------------------------------

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, p*p, D) -> (n, s*s, D)``: the projector's average pooling, as its forward does it."""
        proj = self.inner.multi_modal_projector
        n, _, d = x.shape
        grid = x.transpose(1, 2).reshape(n, d, proj.patches_per_image, proj.patches_per_image).contiguous()
        return proj.avg_pool(grid).flatten(2).transpose(1, 2)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled cells -> LLM width: the projector's norm and linear map (per token)."""
        proj = self.inner.multi_modal_projector
        return torch.matmul(proj.mm_soft_emb_norm(x), proj.mm_input_projection_weight).type_as(x)

    def encode(self, kw: dict) -> dict[str, Encoded]:
        inner = self.inner
        tower = inner.vision_tower
        need_keys = self.needs("keys")
        out = tower(pixel_values=kw["pixel_values"], output_hidden_states=need_keys, return_dict=True)
        tokens = self._pool(out.last_hidden_state)
        vctx = None
        if need_keys:  # SigLIP's output is its last layer's, post-normed: that layer's keys
            vctx = VisionContext(None, None, self._pool(vision_context(tower, out.hidden_states, -1, 0).keys))
        n, total = tokens.shape[:2]
        text, text_mask = self.text_context("image", [total] * n)

        def project(x: torch.Tensor, _units: Units, reduced: bool) -> torch.Tensor:
            # Unreduced: the stock projector on the stock input, so identity is bit for bit.
            return self._project(x) if reduced else inner.multi_modal_projector(out.last_hidden_state).flatten(0, 1)

        units = Units.rows(n, total, self.llm_grid(), tokens.device)
        flat, units, original = self.reduce_units(tokens.flatten(0, 1), units, self.unit_context(vctx, text, text_mask), project)
        # The model splices one (images, tokens, D) tensor: kept tokens of every image, in order.
        pooler = flat.view(n, total, -1) if original is None else flat[None]
        keep = list(keep_mask(original, n * total, flat.device).view(n, total))
        return {"image": Encoded(keep=keep, pooler=pooler, kept=list(units.lens))}
