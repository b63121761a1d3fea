"""Linear and embedding layers over GGUF weights kept in a quantized layout.

The loader swaps these in for `nn.Linear` / `nn.Embedding` wherever a GGUF tensor is
quantized (and `FloatLinear` where a matrix is float), so architectures are written once,
with plain MLX layers. Each layer exposes
the `QuantizedTensor` interface (`qtype`, `shape`, `mode`, `bits`, arrays, `parts`) and hands itself
to `mlxllm.kernels`, which picks the kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .kernels.widen import Part
from .quant import QUANT_TABLE, QuantizedTensor, cpu_activations, mode_of


class _Quantized(nn.Module):
    def __init__(self, w: QuantizedTensor):
        super().__init__()
        self.qtype = w.qtype
        # What the CPU kernels' products multiply (quant.cpu_activations), chosen at load
        # with the layout, as the blocks themselves are.
        self.activations = cpu_activations() if kernels.cpu.active() is not None else "float"
        self.experts = w.shape[0] if len(w.shape) == 3 else None  # (experts, out, in): SwitchLinear's twin
        self.rows, self.cols = w.shape[-2:]  # (out, in) / (vocab, dim)
        if w.weight is not None:
            self.weight = w.weight
        if w.scales is not None:
            self.scales = w.scales
        if w.biases is not None:
            self.biases = w.biases
        if w.parts:
            # Arrays as module state (so they count, evaluate and move with the model); each
            # part's layout beside them as plain values.
            self.part_arrays = [{k: a for k, a in (("weight", p.weight), ("scales", p.scales),
                                                   ("biases", p.biases)) if a is not None} for p in w.parts]
            self.part_layouts = tuple((p.bits, p.group_size, p.mode) for p in w.parts)
        self.freeze()

    @property
    def parts(self) -> list[Part] | None:
        if "part_arrays" not in self:
            return None
        return [Part(a["weight"], a["scales"], a.get("biases"), *layout)
                for a, layout in zip(self.part_arrays, self.part_layouts)]

    def cpu_blocks(self) -> mx.array | None:
        """`kernels.blocks_of(self)`, worked out once per weight array: a decode step asks it
        for every product, and the answer only changes when the arrays are replaced."""
        source = self["part_arrays"][0]["weight"] if "part_arrays" in self else self.get("weight")
        known = self.__dict__.get("_blocks")
        if known is None or known[0] is not source:
            known = (source, kernels.blocks_of(self))
            object.__setattr__(self, "_blocks", known)  # a plain attribute, not module state
        return known[1]

    def __setitem__(self, key: str, value) -> None:
        # Replaced arrays (stacking's row views, Module.update) must not stay alive in the
        # memo: stacking would otherwise hold every projection twice.
        self.__dict__.pop("_blocks", None)
        super().__setitem__(key, value)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, self.cols) if self.experts is None else (self.experts, self.rows, self.cols)

    @property
    def mode(self) -> str:
        return mode_of(self.qtype, self.get("weight"), "part_arrays" in self)

    @property
    def bits(self) -> int:
        return QUANT_TABLE[self.qtype].bits

    def _extra_repr(self) -> str:
        return f"{self.rows}x{self.cols}, {self.qtype.name}"


class QuantizedLinear(_Quantized):
    def __init__(self, w: QuantizedTensor, bias: mx.array | None = None):
        super().__init__(w)
        if bias is not None:
            self.bias = bias

    def __call__(self, x: mx.array) -> mx.array:
        y = kernels.matmul(x, self)
        return y + self.bias if "bias" in self else y


class FloatLinear(nn.Linear):
    """An `nn.Linear` given a float matrix (F32 in the file: MoE routers, which llama.cpp's
    converter keeps F32). Its product runs on the CPU kernels' GEMM where they run, so its
    speed does not depend on the BLAS that MLX's own matmul found: with `mlx.core` imported
    before mlxllm, that is netlib's reference BLAS, and a 512-token prompt's router took
    66 ms a layer instead of 1.2."""

    def __init__(self, weight: mx.array, bias: mx.array | None = None):
        nn.Module.__init__(self)
        self.weight = weight
        if bias is not None:
            self.bias = bias

    def __call__(self, x: mx.array) -> mx.array:
        y = kernels.dense_matmul(x, self.weight)
        return y + self.bias if "bias" in self else y


class QuantizedSwitchLinear(_Quantized):
    """Experts' weights (experts, out, in) in a quantized layout: `nn.moe.SwitchLinear`'s twin."""

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        y = kernels.gather_matmul(x, self, indices)
        return y + self.bias[indices] if "bias" in self else y


class QuantizedEmbedding(_Quantized):
    def __call__(self, ids: mx.array) -> mx.array:
        return kernels.embed(ids, self)

    def as_linear(self, x: mx.array) -> mx.array:
        """Tied output projection: x @ E.T."""
        return kernels.matmul(x, self)


@dataclass(eq=False)
class StackedRows:
    """Projections of one input whose weights `stack_projections` stacked by rows: `layer`
    computes them all in one product, whose last axis splits at `splits`. The members are
    known by identity (`ids`), so that holding them here makes no reference cycle."""

    layer: QuantizedLinear
    splits: list[int]
    ids: tuple[int, ...]


def stack_projections(module: nn.Module, names: Sequence[str]) -> None:
    """Stack by rows the weights of `module`'s projections `names` (which read the same
    input), each run of neighbours that share a layout (`kernels.stacking_layout`), so
    `project` computes a run as one product: one pass over the weights and one kernel
    dispatch instead of one each, which counts for small decode matrices (SmolLM2's 192-row
    k and v). A file may give v another type than q and k; then q and k stack alone. Each
    member's arrays become row views of the stacked ones, so the weights are still held once."""
    runs: list[tuple[tuple | None, list[QuantizedLinear]]] = []
    for m in (getattr(module, name) for name in names):
        layout = kernels.stacking_layout(m) if isinstance(m, QuantizedLinear) and "bias" not in m else None
        if layout is not None and runs and runs[-1][0] == layout:
            runs[-1][1].append(m)
        else:
            runs.append((layout, [m]))
    for layout, members in runs:
        if layout is not None and len(members) > 1:
            _stack(members)


def _stack(members: list[QuantizedLinear]) -> None:
    parts = kernels.stack_rows(members)
    rows = [m.rows for m in members]
    stacked = QuantizedTensor(members[0].qtype, (sum(rows), members[0].cols), None, parts=parts)
    group = StackedRows(QuantizedLinear(stacked), [sum(rows[:i + 1]) for i in range(len(rows) - 1)],
                        tuple(map(id, members)))
    start = 0
    for m, n in zip(members, rows):
        views = [{k: a[start:start + n] for k, a in (("weight", p.weight), ("scales", p.scales),
                                                     ("biases", p.biases)) if a is not None} for p in parts]
        if "part_arrays" in m:
            m.part_arrays = views
        else:
            for key, view in views[0].items():
                setattr(m, key, view)
        m.stacked = group
        start += n
    mx.eval(group.layer.parameters(), [m.parameters() for m in members])


def stacked_product(x: mx.array, linears: Sequence[nn.Module]) -> mx.array | None:
    """The outputs of `linears` side by side on the last axis, as one product, where they are
    one stacked run and x has few rows (where `project` would split that product), else None."""
    group = getattr(linears[0], "stacked", None)
    if group is None or group.ids != tuple(map(id, linears)) or x.size // x.shape[-1] > kernels.STACKED_MAX_ROWS:
        return None
    return group.layer(x)


def project(x: mx.array, linears: Sequence[nn.Module]) -> list[mx.array]:
    """[l(x) for l in linears], each stacked run (`stack_projections`) as one product when x
    has few rows (decode: `kernels.STACKED_MAX_ROWS`)."""
    if x.size // x.shape[-1] > kernels.STACKED_MAX_ROWS:
        return [linear(x) for linear in linears]
    out: list[mx.array] = []
    i = 0
    while i < len(linears):
        group = getattr(linears[i], "stacked", None)
        if group is not None and group.ids == tuple(map(id, linears[i:i + len(group.ids)])):
            out += mx.split(group.layer(x), group.splits, axis=-1)
            i += len(group.ids)
        else:
            out.append(linears[i](x))
            i += 1
    return out
