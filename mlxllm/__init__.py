"""mlxllm: run GGUF models on MLX."""

from . import _blas

_blas.preload()  # before mlx.core is imported anywhere: see _blas.py

# mlxllm.convert is the function; the module's members import as `from mlxllm.convert import X`
from .convert import convert  # noqa: E402
from .embeddings import embed  # noqa: E402
from .generate import generate, stream_generate  # noqa: E402
from .loader import load  # noqa: E402
from .registry import Arch  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Arch", "convert", "embed", "generate", "load", "stream_generate", "__version__"]
