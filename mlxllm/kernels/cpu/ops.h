// mlxllm's CPU kernels as MLX primitives: lazy, scheduled on MLX's CPU stream like MLX's
// own ops, so they mix freely with them in one graph. See affine.cpp and activation.cpp.
#pragma once

#include <optional>
#include <string>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mlxllm_cpu {

namespace mx = mlx::core;

// x (..., in) @ W.T for W in MLX's affine layout with group size 32 and float32 scales
// and biases: w (out, in * bits / 32) uint32, scales/biases (out, in / 32).
mx::array affine_matvec(const mx::array& x, const mx::array& w, const mx::array& scales,
                        const mx::array& biases, int bits, mx::StreamOrDevice s = {});

// The same W as float32 (out, in).
mx::array affine_dequantize(const mx::array& w, const mx::array& scales, const mx::array& biases,
                            int bits, mx::StreamOrDevice s = {});

// softmax(scale * scores) over the last axis (scale > 0). scores (..., R, T) holds R / queries
// groups of `queries` rows each, row r being query r % queries (grouped-query heads
// stacked). causal: query i sees keys [0, T - queries + i]; mask: bool (queries, T), true
// where a query sees a key. Masked entries are exactly 0; a row that sees nothing is 0.
mx::array masked_softmax(const mx::array& scores, float scale, int queries, bool causal,
                         const std::optional<mx::array>& mask, mx::StreamOrDevice s = {});

// act(gate) * up, act "silu" or "gelu_tanh".
mx::array gated_activation(const mx::array& gate, const mx::array& up, const std::string& kind,
                           mx::StreamOrDevice s = {});

// Rotary embedding of x (B, L, H, D) at positions whose angles are given: cos/sin
// (L, dims / 2), pair i of position l rotated by the angle whose cos is cos[l, i]. Pairs
// are (i, i + dims/2), or (2i, 2i + 1) when traditional; dims <= D, the rest pass through.
mx::array rope(const mx::array& x, const mx::array& cos, const mx::array& sin, bool traditional,
               mx::StreamOrDevice s = {});

// weight * x / sqrt(mean(x^2) + eps) over the last axis (mx.fast.rms_norm).
mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s = {});

// What every op here does on the way in and every eval_cpu on the way out.

// The op's stream, which must be the CPU's.
inline mx::Stream cpu_stream(mx::StreamOrDevice s, const char* op) {
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) {
    throw std::invalid_argument(std::string("[") + op + "] runs on the CPU only");
  }
  return stream;
}

// a as a row-contiguous array of `dtype`: the layout the kernels index (no copy when it
// already is one).
inline mx::array contiguous_as(const mx::array& a, mx::Dtype dtype, mx::Stream s) {
  return mx::contiguous(mx::astype(a, dtype, s), false, s);
}

// Allocates out and registers the arrays with the stream's encoder; dispatch the kernel
// on the encoder returned.
inline mx::cpu::CommandEncoder& begin_eval(mx::Stream s, const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(s);
  for (const auto& a : inputs) {
    enc.set_input_array(a);
  }
  enc.set_output_array(out);
  return enc;
}

class CpuPrimitive : public mx::UnaryPrimitive {
 public:
  using mx::UnaryPrimitive::UnaryPrimitive;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error(std::string("[") + name() + "] has no GPU implementation");
  }
  // The output has the first input's shape unless a primitive says otherwise.
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
};

class AffineMatvec : public CpuPrimitive {
 public:
  AffineMatvec(mx::Stream s, int bits) : CpuPrimitive(s), bits_(bits) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override { return "AffineMatvec"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return bits_ == static_cast<const AffineMatvec&>(other).bits_;
  }

 private:
  int bits_;
};

class AffineDequantize : public CpuPrimitive {
 public:
  AffineDequantize(mx::Stream s, int bits) : CpuPrimitive(s), bits_(bits) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override { return "AffineDequantize"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return bits_ == static_cast<const AffineDequantize&>(other).bits_;
  }

 private:
  int bits_;
};

class MaskedSoftmax : public CpuPrimitive {
 public:
  MaskedSoftmax(mx::Stream s, float scale, int queries, bool causal)
      : CpuPrimitive(s), scale_(scale), queries_(queries), causal_(causal) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "MaskedSoftmax"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const MaskedSoftmax&>(other);
    return scale_ == o.scale_ && queries_ == o.queries_ && causal_ == o.causal_;
  }

 private:
  float scale_;
  int queries_;
  bool causal_;
};

class GatedActivation : public CpuPrimitive {
 public:
  enum Kind { SILU, GELU_TANH };
  GatedActivation(mx::Stream s, int kind) : CpuPrimitive(s), kind_(kind) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "GatedActivation"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return kind_ == static_cast<const GatedActivation&>(other).kind_;
  }

 private:
  int kind_;
};

class Rope : public CpuPrimitive {
 public:
  Rope(mx::Stream s, bool traditional) : CpuPrimitive(s), traditional_(traditional) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "Rope"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return traditional_ == static_cast<const Rope&>(other).traditional_;
  }

 private:
  bool traditional_;
};

class RmsNorm : public CpuPrimitive {
 public:
  RmsNorm(mx::Stream s, float eps) : CpuPrimitive(s), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "RmsNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RmsNorm&>(other).eps_;
  }

 private:
  float eps_;
};

} // namespace mlxllm_cpu
