"""The three hook points at which a reducer can run."""

from __future__ import annotations

from enum import Enum


class Stage(str, Enum):
    """Where in a VLM a reducer is applied.

    * ``vision_encoder``: after the vision tower, before the multimodal projector.
      Tokens live in the vision width (e.g. 1024 for CLIP-L).
    * ``projector``: after the projector, before the image features are spliced into
      the text sequence. Tokens live in the LLM width.
    * ``llm_layer``: inside the decoder, at the input of layer K. Only the image
      tokens of the hidden sequence are reduced; text tokens are untouched.
    """

    VISION_ENCODER = "vision_encoder"
    PROJECTOR = "projector"
    LLM_LAYER = "llm_layer"

    def __str__(self) -> str:  # so f-strings and CLI tables show "projector", not "Stage.PROJECTOR"
        return self.value

    @property
    def is_encoder_side(self) -> bool:
        return self is not Stage.LLM_LAYER


ALL_STAGES = frozenset(Stage)
