"""decodekit: composable decoding strategies for diffusion and multimodal models.

import decodekit
with decodekit.attach(pipe, ["faster-diffusion"]) as run:
    images = pipe(prompt).images
print(run.stats)
"""

from .errors import (
    AttachError,
    CompositionError,
    ConfigError,
    DecodekitError,
    DetachError,
    UnknownNameError,
)
from .hookspecs import hookimpl
from .manager import get_manager
from .pipeline import Inputs, PipelineAdapter
from .session import Run, attach
from .strategy import LOOPS, Params, Strategy

__version__ = "0.1.0"

__all__ = [
    "attach",
    "Run",
    "Strategy",
    "Params",
    "PipelineAdapter",
    "Inputs",
    "hookimpl",
    "get_manager",
    "LOOPS",
    "DecodekitError",
    "ConfigError",
    "CompositionError",
    "AttachError",
    "DetachError",
    "UnknownNameError",
    "__version__",
]
