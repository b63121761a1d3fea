"""Mixture-of-experts feed-forward as llama.cpp's build_moe_ffn computes it.

GGUF stores a layer's experts as 3-D tensors, (experts, out, in) in numpy order
(ffn_gate_exps, ffn_up_exps, ffn_down_exps), each expert's rows in the file's quant type.
`SwitchLinear` holds one such tensor (the loader swaps in the quantized twin, as it does
for nn.Linear) and multiplies each token by the experts chosen for it only.

Routing (per token): router logits -> softmax / sigmoid / raw (softmax over the chosen
ones) -> experts chosen by the top k of the scores plus a selection-only bias
(exp_probs_b), within the best expert groups where the file has groups -> the weights are
the unbiased probabilities of the chosen, optionally normalized to sum 1 and scaled. The
weighted expert outputs are added in the order chosen (highest score first), as
llama.cpp adds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from .ffn import gate

# llama.cpp clamps the normalizing sum to fp16's smallest normal number
NORM_MIN = 6.103515625e-5


@dataclass(frozen=True)
class MoEArgs:
    n_experts: int
    n_used: int  # experts per token (expert_used_count)
    gating: str = "softmax"  # "softmax" | "sigmoid" | "softmax_weight" (softmax over the chosen logits)
    normalize: bool = False  # the chosen weights divided by their sum (HF norm_topk_prob)
    scale: float = 1.0  # multiplies the chosen weights (expert_weights_scale; 0 means 1)
    n_groups: int = 0  # expert groups (DeepSeek V3): only the best n_group_used groups are eligible
    n_group_used: int = 0
    activation: str = "silu"
    select_logits: bool = False  # choose on the raw router logits (Llama 4), weigh by the gated probabilities
    weight_input: bool = False  # the weight multiplies an expert's input, not its output (Llama 4)


class SwitchLinear(nn.Module):
    """Experts' weights of one projection, (experts, out, in): y[t, j] = W[e[t, j]] @ x[t]."""

    def __init__(self, n_experts: int, fan_in: int, fan_out: int, bias: bool = False):
        super().__init__()
        self.weight = mx.zeros((n_experts, fan_out, fan_in))
        if bias:  # one row per expert (gpt-oss)
            self.bias = mx.zeros((n_experts, fan_out))

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x (N, D), indices (N, k) -> (N, k, out)."""
        y = kernels.gather_matmul(x, self.weight, indices)
        return y + self.bias[indices] if "bias" in self else y


def route(logits: mx.array, args: MoEArgs, selection_bias: mx.array | None) -> tuple[mx.array, mx.array]:
    """Router logits (N, E) -> (chosen experts (N, k) by descending score, their weights (N, k))."""
    scale = 1.0 if args.scale in (0.0, 1.0) else args.scale
    if args.n_groups <= 1 and not args.select_logits:
        fused = kernels.moe_route(logits, args.n_used, args.gating, args.normalize, scale, selection_bias)
        if fused is not None:
            return fused
    logits = logits.astype(mx.float32)
    if args.gating == "softmax":
        probs = mx.softmax(logits, axis=-1, precise=True)
    elif args.gating == "sigmoid":
        probs = mx.sigmoid(logits)
    elif args.gating == "softmax_weight":
        probs = logits
    else:
        raise ValueError(f"unknown expert gating {args.gating!r}")
    scores = logits if args.select_logits else probs
    if selection_bias is not None:
        scores = scores + selection_bias
    if args.n_groups > 1:
        N, E = scores.shape
        grouped = scores.reshape(N, args.n_groups, E // args.n_groups)
        # a group's score is the sum of its two best experts (llama.cpp and HF DeepSeek V3)
        top2 = mx.sort(grouped, axis=-1)[..., -2:].sum(axis=-1)  # (N, groups)
        worst = mx.argsort(-top2, axis=-1)[:, args.n_group_used:]
        drop = mx.zeros((N, args.n_groups), mx.bool_)
        drop = mx.put_along_axis(drop, worst, mx.array(True), axis=-1)
        scores = mx.where(drop[..., None], -mx.inf, grouped).reshape(N, E)
    chosen = mx.argsort(-scores, axis=-1)[:, :args.n_used]  # (N, k), best first
    weights = mx.take_along_axis(probs, chosen, axis=-1)
    if args.gating == "softmax_weight":
        weights = mx.softmax(weights, axis=-1, precise=True)
    if args.normalize:
        weights = weights / mx.maximum(weights.sum(axis=-1, keepdims=True), NORM_MIN)
    if scale != 1.0:
        weights = weights * scale
    return chosen, weights


def experts(block: nn.Module, x: mx.array, args: MoEArgs) -> mx.array:
    """The routed experts of `block` (ffn_gate_inp, ffn_{gate,up,down}_exps) on x (B, L, D)."""
    B, L, D = x.shape
    flat = x.reshape(-1, D)  # (N, D)
    N = flat.shape[0]
    bias = block["exp_probs_b"]["bias"].reshape(-1) if "exp_probs_b" in block else None
    chosen, weights = route(block.ffn_gate_inp(flat), args, bias)
    if args.weight_input:  # each chosen expert sees its own weighted copy of the row: (N * k, D)
        flat = (flat[:, None, :] * weights[..., None].astype(flat.dtype)).reshape(-1, D)
        chosen = chosen.reshape(-1, 1)
    up = block.ffn_up_exps(flat, chosen)  # (N, k, ff)
    h = gate(block.ffn_gate_exps(flat, chosen), up, args.activation) if "ffn_gate_exps" in block \
        else nn.silu(up)
    y = block.ffn_down_exps(h.reshape(-1, h.shape[-1]), chosen.reshape(-1, 1)).reshape(N, args.n_used, D)
    # weighted (where the weights did not already scale the inputs), added in llama.cpp's order
    out = kernels.expert_sum(y, None if args.weight_input else weights)
    return out.reshape(B, L, D)
