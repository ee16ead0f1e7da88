"""Optional inputs a reducer may declare it needs, filled in by the caller or an adapter."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .stages import Stage


@dataclass
class ReductionContext:
    """Everything beyond the tokens themselves that a reducer may use.

    A reducer declares what it needs in ``requires`` (typed requirements, see
    :mod:`tokenreduce.requirements`; ``required_context`` lists their fields); the call fails
    with :class:`~tokenreduce.errors.MissingContextError` if one is ``None``. Shapes
    use ``B`` rows (images or sequences), ``N`` tokens being reduced.

    Attributes:
        stage: the stage being run (the adapter sets it; defaults to the reducer's).
        layer: decoder layer index at the ``llm_layer`` stage.
        cls_token: ``(B, D_v)`` the vision tower's [CLS] output (vision width).
        cls_attention: ``(B, N)`` attention of [CLS] to the patch tokens in the selected
            vision layer, averaged over heads.
        keys: ``(B, N, D_k)`` the selected vision layer's keys of the patch tokens
            (head-averaged or concatenated), for key-similarity merging.
        text_embeds: ``(B, L, D)`` embeddings (or hidden states) of the text tokens.
        text_mask: ``(B, L)`` bool validity of ``text_embeds``.
        attention: ``(B, Q, N)`` attention that Q query tokens (last token first, or
            all text tokens) pay to the image tokens at the current decoder layer,
            averaged over heads, softmax over the full causal row.
        grid: ``(h, w)`` patch grid of the tokens when they form an image grid.
        positions: ``(B, N)`` or ``(B, N, 3)`` position ids of the tokens.
        extra: free-form additions, keyed by name. Filled by adapters where a reducer
            class asks for it: ``"shallow_cls_attention"``, ``(B, N)`` as
            ``cls_attention`` but of vision encoder layer ``shallow_cls_layer`` (a class
            attribute, e.g. VScan's 5; LLaVA-family adapters with a [CLS] token, for
            encoder-side steps). Third-party reducers may read their own keys.
        text_keys: ``(B, L, D_k)`` keys of the text tokens of ``text_embeds``, from the
            same layer as ``keys`` (DART ranks text pivots by their norm).
        frames: ``T``, for the tokens of one whole video (adapters set it for video
            units under ``video_budget: per_video``): each row holds ``T`` frames in time
            order, frame after frame. ``None`` for images and single frames.
        frame_index: ``(B, N)`` long, the frame (``0 .. T-1``) of each token; set with
            ``frames`` and kept right after earlier steps removed tokens (padding: 0).
            While every token is present, frame ``t`` is tokens ``t*N/T .. (t+1)*N/T - 1``
            and ``grid`` is the frames stacked vertically, ``(T*h, w)``.
        uniform_count: set by :meth:`Reducer.__call__` (whatever the caller passed) when
            no mask was given: every row is fully valid and keeps exactly this many
            tokens. It is known on the host, so a reducer can use it instead of reading
            ``counts`` or ``valid`` back from the device (a host-device sync on CUDA).
    """

    stage: Stage | None = None
    layer: int | None = None
    cls_token: torch.Tensor | None = None
    cls_attention: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    positions: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    text_keys: torch.Tensor | None = None
    frames: int | None = None
    frame_index: torch.Tensor | None = None
    uniform_count: int | None = None

    def select_rows(self, rows: torch.Tensor | slice) -> ReductionContext:
        """The context of a subset of rows (tensors with a batch dim are indexed)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[rows] if isinstance(v, torch.Tensor) else v
        return ReductionContext(**out)


def token_context(
    tokens: torch.Tensor,
    attention: torch.Tensor,
    *,
    stage: Stage | None = None,
    layer: int | None = None,
    grid: tuple[int, int] | None = None,
    frames: int | None = None,
) -> ReductionContext:
    """A stand-in for a model's context, made from ``tokens (B, N, D)`` alone.

    For running reducers that need a model's context where there is none (``tokenreduce
    run`` on synthetic tokens, the pictures of ``tokenreduce show``): [CLS] = the mean
    token; ``attention (B, N)`` serves as the [CLS] attention and as the decoder's
    attention row; keys = the tokens; one "text" token = the mean token, whose keys are
    itself, as ``keys`` are the tokens. ``frames``: the tokens are that many equal frames
    of a video, one after another (``frame_index`` follows).
    """
    text = tokens.mean(dim=1).unsqueeze(1)
    b, n = tokens.shape[:2]
    frame_index = None
    if frames is not None:
        if frames < 1 or n % frames:
            raise ValueError(f"frames={frames} must be >= 1 and divide the {n} tokens into equal frames")
        frame_index = (torch.arange(n, device=tokens.device) // (n // frames)).expand(b, n)
    return ReductionContext(
        stage=stage,
        layer=layer,
        cls_token=text[:, 0],
        cls_attention=attention,
        keys=tokens,
        attention=attention.unsqueeze(1),
        text_embeds=text,
        text_keys=text,
        text_mask=torch.ones(text.shape[:2], dtype=torch.bool, device=tokens.device),
        grid=grid,
        frames=frames,
        frame_index=frame_index,
    )
