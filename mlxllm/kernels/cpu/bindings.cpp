#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "ops.h"
#include "pool.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_cpu, m) {
  m.doc() = "mlxllm's CPU kernels as MLX primitives (see mlxllm/kernels/cpu/).";
  m.def("affine_matvec", &mlxllm_cpu::affine_matvec, "x"_a, "w"_a, "scales"_a, "biases"_a, "bits"_a,
        nb::kw_only(), "stream"_a = nb::none());
  m.def("affine_gather_matvec", &mlxllm_cpu::affine_gather_matvec, "x"_a, "w"_a, "scales"_a, "biases"_a,
        "indices"_a, "bits"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("affine_dequantize", &mlxllm_cpu::affine_dequantize, "w"_a, "scales"_a, "biases"_a, "bits"_a,
        nb::kw_only(), "stream"_a = nb::none());
  m.def("masked_softmax", &mlxllm_cpu::masked_softmax, "scores"_a, "scale"_a, "queries"_a, "causal"_a,
        "mask"_a = nb::none(), nb::kw_only(), "stream"_a = nb::none());
  m.def("attention", &mlxllm_cpu::attention, "q"_a, "k"_a, "v"_a, "scale"_a, "causal"_a, "mask"_a = nb::none(),
        nb::kw_only(), "stream"_a = nb::none());
  m.def("attention_step", &mlxllm_cpu::attention_step, "projections"_a, "n_heads"_a, "keys"_a, "values"_a, "slot"_a,
        "scale"_a, "causal"_a, "mask"_a = nb::none(), "cos"_a = nb::none(), "sin"_a = nb::none(),
        "traditional"_a = false, "q_norm"_a = nb::none(), "k_norm"_a = nb::none(), "eps"_a = 1e-6f, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("gated_activation", &mlxllm_cpu::gated_activation, "gate"_a, "up"_a.none(), "kind"_a, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("rms_norm", &mlxllm_cpu::rms_norm, "x"_a, "weight"_a, "eps"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("expert_sum", &mlxllm_cpu::expert_sum, "y"_a, "weights"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("moe_route", &mlxllm_cpu::moe_route, "logits"_a, "k"_a, "gating"_a, "normalize"_a, "scale"_a,
        "bias"_a = nb::none(), nb::kw_only(), "stream"_a = nb::none());
  m.def("rope", &mlxllm_cpu::rope, "x"_a, "cos"_a, "sin"_a, "traditional"_a, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("gguf_matmul", &mlxllm_cpu::gguf_matmul, "x"_a, "w"_a, "qtype"_a, "table"_a, "activations"_a = "float",
        nb::kw_only(), "stream"_a = nb::none());
  m.def("gguf_gather_matmul", &mlxllm_cpu::gguf_gather_matmul, "x"_a, "w"_a, "qtype"_a, "table"_a, "indices"_a,
        "activations"_a = "float", nb::kw_only(), "stream"_a = nb::none());
  m.def("residual_add", &mlxllm_cpu::residual_add, "x"_a, "y"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("gguf_dequantize", &mlxllm_cpu::gguf_dequantize, "w"_a, "qtype"_a, "in_features"_a, "table"_a,
        nb::kw_only(), "stream"_a = nb::none());
  m.def("gguf_has_kernel", &mlxllm_cpu::gguf_has_kernel, "qtype"_a);
  m.def("gguf_integer_dots", &mlxllm_cpu::gguf_integer_dots, "qtype"_a);
  m.def("gguf_int16_dots", &mlxllm_cpu::gguf_int16_dots, "qtype"_a);
  m.def("gguf_float_kernel", &mlxllm_cpu::gguf_float_kernel, "qtype"_a);
  m.def("gguf_use_simd", &mlxllm_cpu::gguf_use_simd, "on"_a);
  m.def("gemm_isas", &mlxllm_cpu::gemm_isas);
  m.def("gemm_isa", &mlxllm_cpu::gemm_isa);
  m.def("set_gemm_isa", &mlxllm_cpu::set_gemm_isa, "name"_a);
  m.def("matmul", &mlxllm_cpu::matmul, "a"_a, "b"_a, "transpose_b"_a = false, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("bind_blas", &mlxllm_cpu::bind_blas, "path"_a, "prefix"_a = "");
  m.def("blas_library", &mlxllm_cpu::blas_library);
  m.def("set_blas_threads", &mlxllm_cpu::set_blas_threads, "n"_a);
  // The MLX this was compiled against: its C++ ABI is the only one this module works with.
  m.attr("mlx_version") = MLXLLM_MLX_VERSION;
  m.def("num_threads", &mlxllm_cpu::num_threads);
  m.def("set_num_threads", &mlxllm_cpu::set_num_threads, "n"_a);
}
