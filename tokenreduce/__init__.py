"""tokenreduce: pluggable visual-token reduction for vision-language models.

Quick use::

    import torch, tokenreduce
    reducer = tokenreduce.create("apet", budget=64)
    out = reducer(torch.randn(2, 576, 1024))
    out.tokens.shape, out.indices.shape      # (2, 64, 1024), (2, 64)
"""

from __future__ import annotations

from . import graphs, ops, precision, sync
from .adapter import Adapter, Handle, StageRecord, apply, live_handle, patch
from .budget import Budget, resolve_budget
from .config import json_schema, load_config, loads_config
from .context import ReductionContext
from .errors import (
    AlreadyPatchedError,
    ConfigError,
    InvalidInputError,
    MissingContextError,
    PluginError,
    StageError,
    TokenReduceError,
    UnknownNameError,
)
from .hookspecs import hookimpl
from .params import ReducerParams
from .pipeline import Pipeline, Step
from .reducer import (
    ContextByStage,
    MergingReducer,
    Reducer,
    ScoringReducer,
    identity_reduction,
    make_reduction,
    merge_nearest,
    observe,
)
from .reduction import Reduction
from .registry import create, get_registry, reset_registry
from .requirements import (
    CLS_ATTENTION,
    CLS_TOKEN,
    FRAME_INDEX,
    FRAMES,
    GRID,
    KEYS,
    POSITIONS,
    TEXT,
    TEXT_KEYS,
    TEXT_MASK,
    AttentionRows,
    Keys,
    Need,
    Provision,
    Requirement,
    RequiresByStage,
    TextKeys,
    check_context,
)
from .stages import Stage

__version__ = "0.1.0"


def available() -> list[str]:
    """Names of all registered reducers."""
    return sorted(get_registry().reducers)


__all__ = [
    "CLS_ATTENTION",
    "CLS_TOKEN",
    "FRAMES",
    "FRAME_INDEX",
    "GRID",
    "KEYS",
    "POSITIONS",
    "TEXT",
    "TEXT_KEYS",
    "TEXT_MASK",
    "AttentionRows",
    "Keys",
    "Need",
    "Provision",
    "Requirement",
    "RequiresByStage",
    "TextKeys",
    "Adapter",
    "AlreadyPatchedError",
    "Budget",
    "ConfigError",
    "ContextByStage",
    "Handle",
    "InvalidInputError",
    "MergingReducer",
    "MissingContextError",
    "Pipeline",
    "PluginError",
    "Reducer",
    "ReducerParams",
    "Reduction",
    "ReductionContext",
    "ScoringReducer",
    "Stage",
    "StageError",
    "StageRecord",
    "Step",
    "TokenReduceError",
    "UnknownNameError",
    "apply",
    "available",
    "check_context",
    "create",
    "get_registry",
    "hookimpl",
    "identity_reduction",
    "json_schema",
    "live_handle",
    "load_config",
    "loads_config",
    "make_reduction",
    "merge_nearest",
    "observe",
    "ops",
    "patch",
    "reset_registry",
    "resolve_budget",
]
