"""GGUF -> MLX model: build the architecture from metadata, fill its parameters by name.

Parameter names of every architecture module are GGUF tensor names (`blk.3.attn_q.weight`
is `model.blk[3].attn_q.weight`), so no per-architecture name table exists. A quantized
tensor replaces the `nn.Linear` / `nn.Embedding` that owns it with the quantized layer of
the same role; float tensors become parameters in the compute dtype.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from gguf import GGMLQuantizationType
from mlx.utils import tree_flatten

from .gguf import GGUFError, GGUFFile
from .layers import FloatLinear, QuantizedEmbedding, QuantizedLinear, QuantizedSwitchLinear, stack_projections
from .nn.moe import SwitchLinear
from .kernels import cpu as cpu_kernels
from .kernels.widen import widen
from .quant import HALF_TYPES, QuantizedTensor, keeps_blocks_on_cpu, layout_of, to_mlx
from .registry import Arch, get_arch
from .validation import HyperparameterError, check_args, check_metadata, one_line, quote


class LoadError(ValueError):
    """A file whose contents do not make a model; the message is one bounded line."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


@dataclass
class LoadStats:
    seconds: float
    nbytes: int  # bytes of MLX memory the weights occupy


def load_tensor(gf: GGUFFile, name: str, dense: bool = False) -> mx.array | QuantizedTensor:
    """One GGUF tensor as MLX memory; `dense` widens a quantized one to float32.

    Types MLX holds natively load in MLX's layout. The packed types stay GGUF blocks for
    the GPU kernels; on the CPU, where MLX runs no custom kernels, they load as their exact
    image in native layouts (kernels/widen.py) so MLX's quantized_matmul can take them.
    """
    info = gf.tensors[name]
    try:
        if (layout_of(info.qtype).kind == "packed" and not dense and mx.default_device() == mx.cpu
                and not keeps_blocks_on_cpu(info.qtype, tuple(info.shape))):
            parts = widen(info.qtype, gf.tensor_bytes(name), info.shape)
            gf.release_through(info.offset + info.nbytes)
            return QuantizedTensor(info.qtype, tuple(info.shape), None, parts=parts)
        value = to_mlx(gf.tensor_bytes(name), info.qtype, info.shape,
                       consumed=lambda start, end: gf.release_through(info.offset + end),
                       blocks=not dense and keeps_blocks_on_cpu(info.qtype, tuple(info.shape)))
    except ValueError as e:
        raise GGUFError(f"{gf.path}: tensor {name!r}: {e}") from None
    if dense and isinstance(value, QuantizedTensor):
        value = value.dequantize()
        mx.eval(value)
    return value


def load_tensors(gf: GGUFFile, dense: bool = False, skip: set[str] = frozenset()) -> dict[str, mx.array | QuantizedTensor]:
    """Every tensor of the file but `skip` in its MLX layout (see `mlxllm.quant`), converted
    in file order so the mapped pages behind each can be dropped as it is done."""
    order = sorted((n for n in gf.tensors if n not in skip), key=lambda name: gf.tensors[name].offset)
    return {name: load_tensor(gf, name, dense) for name in order}


DENSE_RAM_FRACTION = 0.5


def dense_by_default(gf: GGUFFile) -> bool:
    """Whether to widen quantized weights to float32 at load time.

    On MLX's CPU backend `quantized_matmul` has no optimized kernel (2.3x slower than a
    float32 BLAS matvec for one token, 30-60x slower for a 64-token prompt, 2 cores with
    OpenBLAS). With mlxllm's CPU kernels the quantized layouts are the faster ones (decode
    reads 4-8x fewer bytes; prefill dequantizes for BLAS) and use a fraction of the memory,
    so weights stay quantized. Without the kernels, or for a file with FP4 tensors they do
    not read as blocks (MLX's CPU has no fast path for its fp4 layouts; a build without
    AVX2), the weights are widened whenever the float32 model fits in half of the machine's
    memory. On a GPU they always stay quantized.
    """
    if mx.default_device() != mx.cpu:
        return False
    unread_fp4 = any((layout_of(t.qtype).kind == "mxfp4" or t.qtype == GGMLQuantizationType.NVFP4)
                     and not keeps_blocks_on_cpu(t.qtype, tuple(t.shape)) for t in gf.tensors.values())
    if cpu_kernels.active() is not None and not unread_fp4:
        return False
    fp32_bytes = 4 * sum(t.n_elements for t in gf.tensors.values())
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    return fp32_bytes <= DENSE_RAM_FRACTION * ram


def by_expert(w: QuantizedTensor) -> QuantizedTensor:
    """A 3-D tensor's quantized arrays, converted row by row as (experts * out, ...), as
    (experts, out, ...): the layout gather_qmm reads."""
    E, out = w.shape[0], w.shape[1]

    def split(a: mx.array | None) -> mx.array | None:
        return None if a is None else a.reshape(E, out, -1)
    parts = [p._replace(weight=split(p.weight), scales=split(p.scales), biases=split(p.biases)) for p in w.parts] \
        if w.parts else None
    return QuantizedTensor(w.qtype, w.shape, split(w.weight), split(w.scales), split(w.biases), parts=parts)


def _takes_blocks(model: nn.Module, name: str) -> bool:
    """Whether tensor `name` is the weight of a layer that a quantized twin can replace."""
    owner_path, leaf = name.rsplit(".", 1)
    return leaf == "weight" and isinstance(_get(model, owner_path), (nn.Linear, nn.Embedding, SwitchLinear))


def _walk(model: nn.Module, path: list[str]) -> tuple[object, str | int]:
    """The container holding `path[-1]` and the key into it."""
    node: object = model
    for part in path[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part] if isinstance(node, dict) else getattr(node, part)
    last = path[-1]
    return node, int(last) if isinstance(node, list) else last


def _set(model: nn.Module, dotted: str, value: object) -> None:
    node, key = _walk(model, dotted.split("."))
    if isinstance(node, (list, dict)):
        node[key] = value
    else:
        setattr(node, key, value)


def _get(model: nn.Module, dotted: str) -> object:
    node, key = _walk(model, dotted.split("."))
    return node[key] if isinstance(node, (list, dict)) else getattr(node, key)


def load_model(path: str, dtype: mx.Dtype = mx.float32, dense: bool | None = None,
               part: Callable[[nn.Module, GGUFFile], None] | None = None
               ) -> tuple[nn.Module, GGUFFile, Arch, LoadStats]:
    """Build the architecture named in the file and load every tensor into it.

    dtype: the compute dtype float weights are cast to (float32 on the CPU, where MLX has
    no fast half-precision matmul). dense: widen quantized weights to float32 (None: see
    `dense_by_default`); otherwise they stay in their quantized layouts.
    part: for a process that runs only part of the model (a pipeline stage,
    `mlxllm.distributed`): called with the built, still unallocated model before any tensor
    is read, it removes the modules this process will not run; their tensors are then
    neither checked nor read.
    """
    start = time.perf_counter()
    gf = GGUFFile(path)
    arch = get_arch(gf.architecture)
    # Everything the file claims is checked before a module is built or a tensor read:
    # the metadata, the hyperparameters read from it, then every tensor's shape against
    # the lazily built (unallocated) model.
    try:
        check_metadata(gf)
        args = arch.hparams(gf)
        check_args(args)
    except HyperparameterError as e:
        raise LoadError(f"{path}: invalid {arch.name} hyperparameter: {e}") from None
    except (KeyError, TypeError, ValueError, ArithmeticError) as e:  # ArithmeticError: a zero it divides by
        detail = f"{type(e).__name__}: {e}" if isinstance(e, ArithmeticError) else e
        raise LoadError(f"{path}: metadata for {arch.name!r} is incomplete or invalid: {detail}") from None
    try:
        model = arch.model(args)
    except KeyError as e:  # a tensor the layer's shape is read from
        raise LoadError(f"{path}: {arch.name} needs tensor {quote(e.args[0] if e.args else e)}, which the file lacks") from None
    except (ArithmeticError, ValueError) as e:  # e.g. a product of valid sizes past MLX's int32 dimensions
        raise LoadError(f"{path}: {arch.name} cannot be built from this file's hyperparameters: "
                        f"{type(e).__name__}: {e}") from None
    expected = dict(tree_flatten(model.parameters()))
    # tensors the model declares it does not use (llama.cpp's TENSOR_SKIP: MTP layers)
    ignored = set(getattr(model, "ignored_tensors", ()))
    if part is not None:
        part(model, gf)
        kept = dict(tree_flatten(model.parameters()))
        ignored |= set(expected) - set(kept)
        expected = kept
    unexpected = sorted(set(gf.tensors) - set(expected) - ignored)
    missing = sorted(set(expected) - set(gf.tensors))
    if unexpected or missing:
        raise LoadError(f"{path}: tensors do not match architecture {arch.name!r}: "
                        f"unexpected {quote(unexpected[:5])}{'...' if len(unexpected) > 5 else ''}, "
                        f"missing {quote(missing[:5])}{'...' if len(missing) > 5 else ''}")
    for name, param in expected.items():
        have = gf.tensors[name].shape
        if 0 in have:  # a model may take a tensor's length as given (rope factors): none is empty
            raise LoadError(f"{path}: tensor {name!r} has shape {list(have)}: an empty dimension")
        if tuple(have) != tuple(param.shape):
            raise LoadError(f"{path}: tensor {name!r} has shape {list(have)}, {arch.name} expects {list(param.shape)}")
    nbytes = 0
    values = load_tensors(gf, dense_by_default(gf) if dense is None else dense, skip=ignored)
    # Quantized weights first: they replace their owning module, then float params follow
    # (a bias set afterwards lands on the replacement).
    for name in sorted(values, key=lambda n: not isinstance(values[n], QuantizedTensor)):
        value = values.pop(name)
        want = expected[name].shape
        if tuple(value.shape) != tuple(want):
            raise LoadError(f"{path}: tensor {name!r} has shape {list(value.shape)}, {arch.name} expects {list(want)}")
        if isinstance(value, QuantizedTensor) and not _takes_blocks(model, name):
            if value.qtype not in HALF_TYPES:
                raise LoadError(f"{path}: tensor {name!r} is {value.qtype.name}, but {arch.name} needs it as floats")
            value = value.dequantize()  # a half-precision tensor the model reads as floats (a conv, a position table)
        if isinstance(value, QuantizedTensor):
            owner_path = name.rsplit(".", 1)[0]
            owner = _get(model, owner_path)
            if isinstance(owner, SwitchLinear):
                layer = QuantizedSwitchLinear(by_expert(value))
            else:
                layer = QuantizedEmbedding(value) if isinstance(owner, nn.Embedding) else QuantizedLinear(value)
            _set(model, owner_path, layer)
        else:
            if value.dtype != dtype:
                value = value.astype(dtype)
                mx.eval(value)
            owner_path, leaf = name.rsplit(".", 1)
            owner = _get(model, owner_path)
            if leaf == "weight" and type(owner) is nn.Linear:
                _set(model, owner_path, FloatLinear(value, owner.get("bias")))
            _set(model, name, value)
        nbytes += value.nbytes
    for _, module in model.named_modules():
        for names in getattr(module, "SHARED_INPUT_PROJECTIONS", ()):
            stack_projections(module, names)
            # The members' own buffers are free now: hand them back before the next stack,
            # so loading peaks one stack above the weights, not a stacked copy of them all.
            mx.clear_cache()
    model.eval()
    return model, gf, arch, LoadStats(time.perf_counter() - start, nbytes)


def load(model: str, dtype: mx.Dtype = mx.float32, dense: bool | None = None):
    """`model, tokenizer = load("smollm2:135m")`: a GGUF path or short name, ready to run.
    The model keeps `model.gguf` (the open file) and `model.load_stats`."""
    from .models import resolve
    from .tokenizer import Tokenizer

    net, gf, _, stats = load_model(resolve(model), dtype, dense)
    tokenizer = Tokenizer.from_metadata(gf.metadata)
    net.gguf, net.load_stats = gf, stats
    return net, tokenizer
