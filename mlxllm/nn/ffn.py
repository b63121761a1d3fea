"""Feed-forward activations as llama.cpp's build_ffn applies them.

ggml_gelu is GELU's tanh approximation (LLM_FFN_GELU); GELU with erf is LLM_FFN_GELU_ERF;
relu² is LLM_FFN_RELU_SQR; xIELU (Apertus) has per-layer constants from the file."""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .. import kernels, layers

# Gates the CPU kernels fuse (activation(gate) * up in one multi-threaded pass).
KERNEL_GATES = ("silu", "gelu_tanh")


def _softplus(x: float) -> float:
    return x if x > 20 else math.log1p(math.exp(x))


@dataclass(frozen=True)
class XIELU:
    """xIELU for one layer (Apertus; llama.cpp ggml_xielu), from the raw trained parameters
    the converter stores: alpha_p = softplus(raw alpha_p), alpha_n = beta + softplus(raw alpha_n)."""

    alpha_n: float
    alpha_p: float
    beta: float
    eps: float

    def __call__(self, x: mx.array) -> mx.array:
        a_p, a_n = _softplus(self.alpha_p), self.beta + _softplus(self.alpha_n)
        positive = a_p * x * x + self.beta * x
        negative = (mx.expm1(mx.minimum(x, self.eps)) - x) * a_n + self.beta * x
        return mx.where(x > 0, positive, negative)


def activate(x: mx.array, kind: str | XIELU) -> mx.array:
    if isinstance(kind, XIELU):
        return kind(x)
    if kind == "silu":
        return nn.silu(x)
    if kind == "gelu_tanh":
        return nn.gelu_approx(x)
    if kind == "gelu_erf":
        return nn.gelu(x)
    if kind == "relu2":
        return mx.square(nn.relu(x))
    if kind == "relu":
        return nn.relu(x)
    raise ValueError(f"unknown activation {kind!r}")


# gpt-oss's clamped SwiGLU (llama.cpp swiglu_oai, constants fixed in build_moe_ffn)
OAI_ALPHA, OAI_LIMIT = 1.702, 7.0


def gate_halves(both: mx.array, kind: str | XIELU) -> mx.array:
    """`gate` of the halves of both's last axis, [gate | up]: a stacked projection's output."""
    if kind in KERNEL_GATES:
        return kernels.gated(both, None, kind)
    return gate(*mx.split(both, 2, axis=-1), kind)


def gated_projection(x: mx.array, gate_linear: nn.Module, up_linear: nn.Module, kind: str | XIELU) -> mx.array:
    """`gate` of gate_linear(x) and up_linear(x), from their one product where they are stacked."""
    both = layers.stacked_product(x, (gate_linear, up_linear))
    if both is not None:
        return gate_halves(both, kind)
    return gate(*layers.project(x, (gate_linear, up_linear)), kind)


def gate(g: mx.array, up: mx.array, kind: str | XIELU) -> mx.array:
    """activation(g) * up (LLM_FFN_PAR)."""
    if kind in KERNEL_GATES:
        return kernels.gated(g, up, kind)
    if kind == "swiglu_oai":  # the gate clamped from above only, up both ways, then + 1
        g = mx.minimum(g, OAI_LIMIT)
        return g * mx.sigmoid(OAI_ALPHA * g) * (mx.clip(up, -OAI_LIMIT, OAI_LIMIT) + 1)
    return activate(g, kind) * up


