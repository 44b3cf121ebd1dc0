"""The V-Reason decoding engine: ``generate``, ``VReasonConfig``, ``VReasonOutput``."""

from vreason_kernels.engine.config import VReasonConfig
from vreason_kernels.engine.loop import generate
from vreason_kernels.engine.output import VReasonOutput

__all__ = ["VReasonConfig", "VReasonOutput", "generate"]
