"""The shared kernel source: block decoding headers (blocks/*.h) and each type's codebook.

Metal (metal.py), CUDA (cuda.py) and the host build in the tests all compile the same text
from `block_source()`, so a type's bit-unpacking math exists once. Codebooks come from
gguf-py at first use (the same tables the reference and the oracle use), passed to the
kernels as an input array rather than retyped into the source.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

_Q = GGMLQuantizationType
_BLOCKS = Path(__file__).with_name("blocks")

# Packed GGUF types the kernels decode -> their name in blocks/*.h (dq8_<name>, QK_<NAME>).
KERNEL_NAMES: dict[GGMLQuantizationType, str] = {
    _Q.Q2_K: "q2_k",
    _Q.Q3_K: "q3_k",
    _Q.Q6_K: "q6_k",
    _Q.TQ1_0: "tq1_0",
    _Q.TQ2_0: "tq2_0",
    _Q.IQ4_NL: "iq4_nl",
    _Q.IQ4_XS: "iq4_xs",
    _Q.NVFP4: "nvfp4",
    _Q.IQ1_S: "iq1_s",
    _Q.IQ1_M: "iq1_m",
    _Q.IQ2_XXS: "iq2_xxs",
    _Q.IQ2_XS: "iq2_xs",
    _Q.IQ2_S: "iq2_s",
    _Q.IQ3_XXS: "iq3_xxs",
    _Q.IQ3_S: "iq3_s",
}


@functools.cache
def _headers() -> str:
    return "\n".join((_BLOCKS / name).read_text() for name in ("common.h", "kquants.h", "iquants.h"))


def kernel_types() -> list[GGMLQuantizationType]:
    """The packed types blocks/*.h decodes (the tests require all of KERNEL_NAMES)."""
    return [t for t, name in KERNEL_NAMES.items() if f" dq8_{name}(" in _headers()]


def block_source() -> str:
    """common.h, every type's decoder, and a fused row-dot function per type."""
    rowdots = [f"QDEFINE_ROWDOT({KERNEL_NAMES[t].upper()}, {KERNEL_NAMES[t]})\n" for t in kernel_types()]
    return _headers() + "\n" + "".join(rowdots)


@functools.cache
def codebook(cls: type) -> np.ndarray:
    """A gguf-py IQ grid as small integers (entries, width) int16: the one place the
    kernels, the widening and the reference read gguf-py's codebooks from."""
    cls.init_grid()
    grid = np.asarray(cls.grid).reshape(cls.grid_shape)
    values = np.rint(grid).astype(np.int16)
    assert (values == grid).all(), f"{cls.__name__}: grid values are not integers"
    return values


def _grid_bytes(cls: type) -> np.ndarray:
    """An IQ grid as (entries x width) bytes; IQ1 grids hold -1/0/1, stored as int8."""
    return codebook(cls).astype(np.int8).view(np.uint8).reshape(-1)


def _signs() -> np.ndarray:
    return np.frombuffer(bytes(gq.IQ2_XXS.ksigns), dtype=np.uint8)


def _kvalues(cls: type) -> np.ndarray:
    return np.asarray(cls.kvalues, dtype=np.int8).view(np.uint8)


# Table layout per type (byte offsets the headers rely on, checked by the tests):
#   IQ2_XXS grid 256x8 | signs 128 at 2048     IQ2_XS grid 512x8 | signs 128 at 4096
#   IQ3_XXS grid 256x4 | signs 128 at 1024     IQ2_S grid 1024x8   IQ3_S grid 512x4
#   IQ1_S / IQ1_M grid 2048x8 (int8)           IQ4_NL / IQ4_XS / NVFP4 / MXFP4 kvalues 16 (int8)
_TABLES = {
    _Q.IQ2_XXS: lambda: np.concatenate([_grid_bytes(gq.IQ2_XXS), _signs()]),
    _Q.IQ2_XS: lambda: np.concatenate([_grid_bytes(gq.IQ2_XS), _signs()]),
    _Q.IQ2_S: lambda: _grid_bytes(gq.IQ2_S),
    _Q.IQ3_XXS: lambda: np.concatenate([_grid_bytes(gq.IQ3_XXS), _signs()]),
    _Q.IQ3_S: lambda: _grid_bytes(gq.IQ3_S),
    _Q.IQ1_S: lambda: _grid_bytes(gq.IQ1_S),
    _Q.IQ1_M: lambda: _grid_bytes(gq.IQ1_M),
    _Q.IQ4_NL: lambda: _kvalues(gq.IQ4_NL),
    _Q.IQ4_XS: lambda: _kvalues(gq.IQ4_NL),
    _Q.NVFP4: lambda: _kvalues(gq.NVFP4),
    _Q.MXFP4: lambda: _kvalues(gq.MXFP4),  # the CPU kernels' (GPUs take MLX's mxfp4 layout)
}


@functools.cache
def table(qtype: GGMLQuantizationType) -> np.ndarray:
    """The codebook bytes the kernels of `qtype` read (one zero byte for types without)."""
    make = _TABLES.get(_Q(qtype))
    return np.ascontiguousarray(make() if make else np.zeros(1, np.uint8))


def block_shape(qtype: GGMLQuantizationType) -> tuple[int, int]:
    """(elements, bytes) per block."""
    return GGML_QUANT_SIZES[_Q(qtype)]
