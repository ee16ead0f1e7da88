"""An example tokenreduce plugin: the ``norm`` reducer."""

from .norm import Norm, NormParams

__all__ = ["Norm", "NormParams"]
