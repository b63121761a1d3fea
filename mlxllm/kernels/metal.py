"""The packed-type kernels on Apple GPUs, through mx.fast.metal_kernel (see gpu.py)."""

from __future__ import annotations

import mlx.core as mx

from .gpu import Backend

PRELUDE = """
#define QDEV device
#define QTHR thread
#define QFN inline
inline float qhalf(uint16_t bits) { return float(as_type<half>(bits)); }
"""

METAL = Backend(
    name="metal",
    prelude=PRELUDE,
    index_x="thread_position_in_grid.x",
    index_y="thread_position_in_grid.y",
    index_z="thread_position_in_grid.z",
    lane="thread_index_in_simdgroup",
    simd_sum="simd_sum({})",
    nan="NAN",
    make_kernel=mx.fast.metal_kernel,
)
