// The engine's CPU kernels as one extension module (layers/kernels.py builds it).
#include <torch/extension.h>

torch::Tensor small_linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias);
torch::Tensor paged_decode_attention(const torch::Tensor& queries, const torch::Tensor& keys, const torch::Tensor& values,
                                     const torch::Tensor& slots, const torch::Tensor& lengths, double scale);
torch::Tensor pack_linear_weight(const torch::Tensor& weight);
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& panels, const c10::optional<torch::Tensor>& bias,
                            int64_t out_features);
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
void rotary_embedding_(torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads, int64_t dim);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("small_linear", &small_linear, "fp32 x @ weight.T + bias for a few rows", py::arg("x"), py::arg("weight"),
        py::arg("bias") = py::none());
  m.def("paged_decode_attention", &paged_decode_attention,
        "fp32 attention of one query token per sequence over its cache slots", py::arg("queries"), py::arg("keys"),
        py::arg("values"), py::arg("slots"), py::arg("lengths"), py::arg("scale"));
  m.def("pack_linear_weight", &pack_linear_weight, "an [out, in] weight as packed_linear's panels", py::arg("weight"));
  m.def("packed_linear", &packed_linear, "fp32 x @ weight.T + bias with AVX-512 on a packed weight", py::arg("x"),
        py::arg("panels"), py::arg("bias") = py::none(), py::arg("out_features"));
  m.def("rms_norm", &rms_norm, "fp32 RMS norm of each row, times the weight", py::arg("x"), py::arg("weight"),
        py::arg("eps"));
  m.def("rotary_embedding_", &rotary_embedding_, "fp32 rotary embedding of a fused q|k|v row's first heads, in place",
        py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("heads"), py::arg("dim"));
}
