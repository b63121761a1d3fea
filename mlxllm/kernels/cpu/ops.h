// mlxllm's CPU kernels as MLX primitives: lazy, scheduled on MLX's CPU stream like MLX's
// own ops, so they mix freely with them in one graph. See affine.cpp and activation.cpp.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

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

// x (N, in) @ W[e].T for each expert e = indices[n, j] -> (N, k, out), W stacked as
// (experts, out, in) in the same layout: w (E, out, in * bits / 32), scales/biases
// (E, out, in / 32). Reads only the chosen experts' rows; an index past the experts gives NaN.
mx::array affine_gather_matvec(const mx::array& x, const mx::array& w, const mx::array& scales,
                               const mx::array& biases, const mx::array& indices, int bits,
                               mx::StreamOrDevice s = {});

// The same W as float32 (out, in).
mx::array affine_dequantize(const mx::array& w, const mx::array& scales, const mx::array& biases,
                            int bits, mx::StreamOrDevice s = {});

// softmax(scale * scores) over the last axis (scale > 0). scores (..., R, T) holds R / queries
// groups of `queries` rows each, row r being query r % queries (grouped-query heads
// stacked). causal: query i sees keys [0, T - queries + i]; mask: bool (queries, T), true
// where a query sees a key. Masked entries are exactly 0; a row that sees nothing is 0.
mx::array masked_softmax(const mx::array& scores, float scale, int queries, bool causal,
                         const std::optional<mx::array>& mask, mx::StreamOrDevice s = {});

// Attention for a few queries (decode) in one op: softmax(scale * q @ k.T, masked) @ v for
// q (B, H, L, D), k (B, H_kv, T, D), v (B, H_kv, T, Dv), H a multiple of H_kv, at most
// kFewRows queries per kv head (H / H_kv * L) -> (B, L, H, Dv). The same products (few-row
// ones) and softmax as matmul and masked_softmax compute for these shapes, bit for bit
// where matmul takes its few-row path (a side of at most 256), without their graph nodes
// and hand-offs. Keys and values are read in place from any view whose rows are contiguous
// (a KV cache's slice). causal and mask as in masked_softmax, the mask (L, T) or (B, L, T).
mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal,
                    const std::optional<mx::array>& mask, mx::StreamOrDevice s = {});

// A decode step's attention in one op, which spares it the graph nodes of the splits, norms,
// rotations, transposes, slice updates and slices around it: the new keys and values stored
// at slots [slot, slot + L) of the float32 or float16 storage keys (B, H_kv, S, D) / values
// (B, H_kv, S, Dv), then `attention` of the queries against the first slot + L slots, read in
// place. projections: q (B, L, n_heads * D), k (B, L, H_kv * D), v (B, L, H_kv * Dv), or one
// array with the three side by side (a fused or stacked projection's [q | k | v]), views
// whose last axis is contiguous. Each head of q and k is RMS-normalized by q_norm / k_norm
// (D,) where given (eps), then rotated by cos/sin (L or B * L, dims / 2) where given (as
// `rope`); a float16 storage takes each entry rounded as astype(float16) rounds it. causal
// and mask as `attention` takes them, the mask (L, slot + L) or (B, L, slot + L).
// Returns {(B, L, n_heads * Dv), keys', values'}: the storage with the slots written, in the
// old buffers when nothing else holds them (the cache replaces its storage by these), as
// MLX's slice_update does, else in copies.
std::vector<mx::array> attention_step(const std::vector<mx::array>& projections, int n_heads, const mx::array& keys,
                                      const mx::array& values, int slot, float scale, bool causal,
                                      const std::optional<mx::array>& mask, const std::optional<mx::array>& cos,
                                      const std::optional<mx::array>& sin, bool traditional,
                                      const std::optional<mx::array>& q_norm, const std::optional<mx::array>& k_norm,
                                      float eps, mx::StreamOrDevice s = {});

// act(gate) * up, act "silu" or "gelu_tanh". Without up, gate (..., 2n) holds each row's gate
// and up side by side (a stacked projection's [gate | up]) -> (..., n), with no split nodes.
mx::array gated_activation(const mx::array& gate, const std::optional<mx::array>& up, const std::string& kind,
                           mx::StreamOrDevice s = {});

// Rotary embedding of x (B, L, H, D) at positions whose angles are given: cos/sin
// (L, dims / 2), pair i of position l rotated by the angle whose cos is cos[l, i]. Pairs
// are (i, i + dims/2), or (2i, 2i + 1) when traditional; dims <= D, the rest pass through.
mx::array rope(const mx::array& x, const mx::array& cos, const mx::array& sin, bool traditional,
               mx::StreamOrDevice s = {});

// weight * x / sqrt(mean(x^2) + eps) over the last axis (mx.fast.rms_norm).
mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s = {});
// A mixture of experts' output: out (N, D)[n] = sum over j of y[n, j] * weights[n, j], for
// y (N, k, D), added in order of j (llama.cpp's order), each product rounded before its add
// (as the multiply and the adds would be as MLX ops: one op instead of ~2k graph nodes).
mx::array expert_sum(const mx::array& y, const mx::array& weights, mx::StreamOrDevice s = {});
// A mixture of experts' routing for the common gatings (nn.moe.route without expert groups):
// logits (N, E) -> [chosen (N, k) uint32 by descending score, weights (N, k)]. gating:
// "softmax" or "sigmoid" of the logits (scores = those plus `bias` where given, for choosing
// only), or "softmax_weight" (chosen on the logits, weights the softmax over the chosen);
// then normalized to sum 1 (the sum clamped as llama.cpp's) where asked, times scale.
std::vector<mx::array> moe_route(const mx::array& logits, int k, const std::string& gating, bool normalize,
                                 float scale, const std::optional<mx::array>& bias = std::nullopt,
                                 mx::StreamOrDevice s = {});

// GGUF blocks as stored (gguf.cpp): w uint8 (out, bytes per row) of GGML type `qtype`
// (its enum value), table the type's codebook bytes (kernels/source.py; any one byte for
// types without). x (..., in) @ W.T -> (..., out): up to 16 rows read the blocks in place,
// more rows dequantize tiles for a GEMM. activations: "float" (exact); "int8", llama.cpp's
// integer arithmetic (activations rounded per block to 8 bits, prefill's too); "int16", the
// same with 16-bit blocks and every type the float kernels read but F16 / BF16.
// Where x is a pending rms_norm or gated_activation, the product computes it from that op's
// inputs itself (the same rows, bit for bit), so a decode step has one graph node fewer for
// each: ~5 us of MLX's scheduling a node (SmolLM2's 61 norms: 168 -> 178 tok/s spared).
mx::array gguf_matmul(const mx::array& x, const mx::array& w, int qtype, const mx::array& table,
                      const std::string& activations = "float", mx::StreamOrDevice s = {});
// Experts: y[n, j] = x[n] @ W[e].T for e = indices[n, j], w uint8 (experts, out, bytes per
// row), only the chosen experts' rows read, float or (activations "int16") 16-bit activations
// ("int8" multiplies floats); an index past the experts gives NaN. x (rows, in) -> (rows, k, out).
// Up to 16 rows, each (row, choice) reads its expert's rows; more rows are grouped by expert,
// each expert's multiplied together as gguf_matmul would multiply them.
mx::array gguf_gather_matmul(const mx::array& x, const mx::array& w, int qtype, const mx::array& table,
                             const mx::array& indices, const std::string& activations = "float",
                             mx::StreamOrDevice s = {});
// W as float32 (out, in_features), bit-exact to gguf-py's dequantize.
// x + y. Where y is a pending gguf_matmul's product (float32, x's shape), or a pending
// rms_norm of one (a post-norm), that product normalizes its rows and adds x itself as it
// writes them: the same sums, bit for bit, without the RmsNorm and Add nodes.
mx::array residual_add(const mx::array& x, const mx::array& y, mx::StreamOrDevice s = {});
mx::array gguf_dequantize(const mx::array& w, int qtype, int in_features, const mx::array& table,
                          mx::StreamOrDevice s = {});
bool gguf_has_kernel(int qtype);     // whether gguf_matmul takes this type
bool gguf_integer_dots(int qtype);   // whether int8 mode has integer dots for it (else float, by block decoders)
bool gguf_int16_dots(int qtype);     // whether int16 mode rounds its activations here (else it multiplies floats)
bool gguf_float_kernel(int qtype);   // whether float activations meet its blocks in a dedicated kernel on this build
void gguf_use_simd(bool on);         // off: the portable dot products (for tests)

// float32 a (..., M, K) @ b (..., K, N), or b.T for b (..., N, K), on the BLAS that
// bind_blas bound (blas.cpp), never MLX's; same batch dimensions. Strided views are read
// in place where rows are contiguous (slices of a KV cache).
mx::array matmul(const mx::array& a, const mx::array& b, bool transpose_b, mx::StreamOrDevice s = {});
// dlopen a CBLAS library privately (RTLD_LOCAL) and use its `<prefix>cblas_sgemm`.
bool bind_blas(const std::string& path, const std::string& prefix);
std::string blas_library();  // the bound library's path, "" when our own GEMM runs
void set_blas_threads(int n);

// Routines the kernels share (blas.cpp).

// C (M, N) = A @ B.T (transpose_b, B (N, K)) or A @ B (B (K, N)) on one thread: the bound
// BLAS, else our blocked GEMM. Leading dimensions as in CBLAS.
void gemm_serial(bool transpose_b, int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C,
                 int ldc);
// The same for M <= kFewRows without BLAS, each output summed in one order whatever M and N.
// Without transpose_b (A @ B: attention's value product, K its keys), each output is summed
// kSumTerms terms at a time and the partial sums added in order, so a product split into
// those blocks of K (the threads each taking some, as attention does for one sequence)
// sums exactly as the whole.
constexpr int kFewRows = 8;
constexpr int kSumTerms = 256;
void gemm_few_rows(bool transpose_b, int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C,
                   int ldc);
// The same with B's entries float16 bits (a KV cache stored as halves), each widened exactly
// as read: the same sums as B's float32 copy gives.
void gemm_few_rows(bool transpose_b, int M, int N, int K, const float* A, int lda, const uint16_t* B, int ldb,
                   float* C, int ldc);

// Prefill's weight GEMM. Activation rows packed for weight_tile_product, once per product:
// panels of panel_rows() rows (two vectors of the GEMM's ISA), k-major (row i of panel p at
// panel(p)[k * panel_rows() + i]), a last panel's missing rows zero.
class PackedRows {
 public:
  PackedRows(int M, int K);
  // Packs panels [p0, p1) from the rows' pointers (M of them, K floats each).
  void pack(const float* const* rows, int p0, int p1);
  int M() const { return M_; }
  int K() const { return K_; }
  int lanes() const { return lanes_; }
  int panel_rows() const { return 2 * lanes_; }
  int panels() const { return (M_ + panel_rows() - 1) / panel_rows(); }
  const float* panel(int p) const { return data_.data() + static_cast<size_t>(p) * K_ * panel_rows(); }

 private:
  int M_, K_, lanes_;
  std::vector<float> data_;
};
// C (M, n) = A @ w.T for n dequantized weight rows of K floats (contiguous), C's rows ldc
// apart, on this thread: each output one multiply-add chain over k, whatever M, n and ISA.
void weight_tile_product(const PackedRows& a, const float* w, int n, float* c, int ldc);
std::vector<std::string> gemm_isas(); // the vector ISAs this CPU runs it with, widest (the default) first
std::string gemm_isa();
void set_gemm_isa(const std::string& name); // for tests: each ISA's products

// One row's RMS norm, y = w * x / sqrt(mean(x^2) + eps) over D entries (activation.cpp;
// y may be x).
void rms_norm_row(const float* x, const float* w, float* y, int D, float eps);
// out = act(g) * u over n floats, kind a GatedActivation::Kind: the op's rows.
void gated_rows(int kind, const float* g, const float* u, float* out, long n);
// One (D,) head vector at one position rotated by the angles whose cos/sin are c/s: pairs
// (i, i + dims/2), or (2i, 2i + 1) when traditional; entries past `dims` pass through
// (rope.cpp; out may be x).
void rotate(const float* x, const float* c, const float* s, float* out, int D, int dims, bool traditional);

// What every op here does on the way in and every eval_cpu on the way out.

// The op's stream, which must be the CPU's.
inline mx::Stream cpu_stream(mx::StreamOrDevice s, const char* op) {
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) {
    throw std::invalid_argument(std::string("[") + op + "] runs on the CPU only");
  }
  return stream;
}

// x's elements in row-major order into dst, for x a strided view (any strides, broadcast
// included).
template <typename T>
void gather_rows(const mx::array& x, T* dst) {
  const int nd = x.ndim();
  const T* src = x.data<T>();
  if (x.size() == 0) {
    return;
  }
  if (nd == 0) {
    dst[0] = src[0];
    return;
  }
  const auto& shape = x.shape();
  const auto& strides = x.strides();
  const int64_t inner = shape[nd - 1], step = strides[nd - 1];
  std::vector<int64_t> index(nd, 0);
  int64_t at = 0; // src offset of the current row
  for (size_t done = 0; done < x.size(); done += inner) {
    for (int64_t j = 0; j < inner; ++j) {
      dst[done + j] = src[at + j * step];
    }
    for (int d = nd - 2; d >= 0; --d) { // the next row: an odometer over the outer dimensions
      at += strides[d];
      if (++index[d] < shape[d]) {
        break;
      }
      at -= strides[d] * shape[d];
      index[d] = 0;
    }
  }
}

// Each primitive's eval_cpu starts here: out allocated, the arrays registered with the
// stream's encoder, and the inputs returned as the kernels read them, row-contiguous. An
// input that is a strided view (a transpose, a slice, a broadcast) is gathered into a
// temporary by a task queued ahead of the kernel's, since its data is ready only when the
// stream gets there. Doing this here rather than with mx::contiguous when the graph is built
// saves a graph node per input: they were over half of a decode step's nodes.
struct Eval {
  mx::cpu::CommandEncoder& encoder;
  std::vector<mx::array> inputs;
};

// Queues a task on the encoder that gathers a's elements, row-contiguous, into dst (an
// allocated array of a's shape and dtype).
inline void dispatch_gather(mx::cpu::CommandEncoder& enc, const mx::array& a, mx::array& dst) {
  if (a.itemsize() == 4) {
    enc.dispatch([a, to = dst.data<uint32_t>()]() { gather_rows(a, to); });
  } else if (a.itemsize() == 2) {
    enc.dispatch([a, to = dst.data<uint16_t>()]() { gather_rows(a, to); });
  } else if (a.itemsize() == 1) {
    enc.dispatch([a, to = dst.data<uint8_t>()]() { gather_rows(a, to); });
  } else {
    throw std::invalid_argument("[mlxllm_cpu] inputs must have 4-, 2- or 1-byte elements");
  }
}

// a's elements, row-contiguous, in a temporary that a task queued on the encoder (ahead of
// the kernel's) gathers.
inline mx::array gathered(mx::cpu::CommandEncoder& enc, const mx::array& a) {
  mx::array copy(a.shape(), a.dtype(), nullptr, {});
  copy.set_data(mx::allocator::malloc(copy.nbytes()));
  enc.add_temporary(copy);
  dispatch_gather(enc, a, copy);
  return copy;
}

inline Eval begin_eval(mx::Stream s, const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(s);
  std::vector<mx::array> rows;
  rows.reserve(inputs.size());
  for (const auto& a : inputs) {
    enc.set_input_array(a);
    rows.push_back(a.flags().row_contiguous ? a : gathered(enc, a));
  }
  enc.set_output_array(out);
  return {enc, std::move(rows)};
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

class AffineGatherMatvec : public CpuPrimitive {
 public:
  AffineGatherMatvec(mx::Stream s, int bits) : CpuPrimitive(s), bits_(bits) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override { return "AffineGatherMatvec"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return bits_ == static_cast<const AffineGatherMatvec&>(other).bits_;
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
  int kind() const { return kind_; }
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

class MoeRoute : public mx::Primitive {
 public:
  enum Gating { SOFTMAX, SIGMOID, SOFTMAX_WEIGHT };
  MoeRoute(mx::Stream s, int k, int gating, bool normalize, float scale)
      : mx::Primitive(s), k_(k), gating_(gating), normalize_(normalize), scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("[MoeRoute] has no GPU implementation");
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0), k_}, {inputs[0].shape(0), k_}};
  }
  const char* name() const override { return "MoeRoute"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const MoeRoute&>(other);
    return k_ == o.k_ && gating_ == o.gating_ && normalize_ == o.normalize_ && scale_ == o.scale_;
  }

 private:
  int k_, gating_;
  bool normalize_;
  float scale_;
};

class ExpertSum : public CpuPrimitive {
 public:
  explicit ExpertSum(mx::Stream s) : CpuPrimitive(s) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0), inputs[0].shape(2)}};
  }
  const char* name() const override { return "ExpertSum"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

class RmsNorm : public CpuPrimitive {
 public:
  RmsNorm(mx::Stream s, float eps) : CpuPrimitive(s), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override { return "RmsNorm"; }
  float eps() const { return eps_; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RmsNorm&>(other).eps_;
  }

 private:
  float eps_;
};

} // namespace mlxllm_cpu
