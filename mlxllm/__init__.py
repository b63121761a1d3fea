"""mlxllm: run GGUF models on MLX."""

from . import _blas

_blas.preload()  # before mlx.core is imported anywhere: see _blas.py

from .embeddings import embed  # noqa: E402
from .generate import generate, stream_generate  # noqa: E402
from .loader import load  # noqa: E402
from .registry import Arch  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Arch", "embed", "generate", "load", "stream_generate", "__version__"]
