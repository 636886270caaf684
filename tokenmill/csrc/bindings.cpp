// The Python module of tokenmill's CPU kernels (built by tokenmill/models/layers/cpu_ops.py).
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace tokenmill;
  m.doc() = "tokenmill's CPU kernels: paged attention and the decoder layer's fused elementwise steps";
  m.def("plan", &plan, "work items of one attention step: (items, shared-prefix items)",
        py::arg("query_start_loc"), py::arg("seq_lens"), py::arg("block_tables"), py::arg("num_kv_heads"),
        py::arg("group"), py::arg("block_size"), py::arg("min_shared_tokens") = 0, py::arg("sdpa_min_chunk") = 0);
  m.def("forward", &forward, "write k/v into the paged cache, then attend", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("kv_cache"), py::arg("slot_mapping"), py::arg("block_tables"),
        py::arg("query_start_loc"), py::arg("seq_lens"), py::arg("work_plan"), py::arg("prefix_plan"), py::arg("scale"),
        py::arg("window") = 0, py::arg("softcap") = 0.0, py::arg("simd") = true);
  m.def("vector_lanes", &vector_lanes, "float32 lanes of the vector type the kernels were compiled with");
  m.def("rms_norm", &rms_norm, "RMSNorm of each row (float32 statistics)", py::arg("x"), py::arg("weight"),
        py::arg("eps"));
  m.def("fused_add_rms_norm", &fused_add_rms_norm, "residual += x; x = rms_norm(residual), in place",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("silu_and_mul", &silu_and_mul, "silu(first half) * second half of each row", py::arg("gate_up"));
  m.def("argmax", &argmax, "index of each row's maximum (first on ties, NaN wins), int64", py::arg("logits"));
  py::class_<DecoderStack>(m, "DecoderStack", "a model's Llama decoder layers, run in one call")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, double, double, int64_t>(), py::arg("num_heads"),
           py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("rotary_dim"), py::arg("eps"), py::arg("scale"),
           py::arg("window") = 0)
      .def("add_layer", &DecoderStack::add_layer, "append a layer: its two norms' weights and its 4 linears",
           py::arg("input_norm"), py::arg("post_attention_norm"), py::arg("linears"))
      .def("forward", &DecoderStack::forward, "every layer over a flat batch: (hidden, residual)", py::arg("x"),
           py::arg("positions"), py::arg("cos"), py::arg("sin"), py::arg("kv_caches"), py::arg("slot_mapping"),
           py::arg("block_tables"), py::arg("query_start_loc"), py::arg("seq_lens"), py::arg("work_plan"),
           py::arg("prefix_plan"), py::arg("timings") = py::none(),
           py::call_guard<py::gil_scoped_release>());
  m.def("rotary_embedding", &rotary_embedding, "rotate-half RoPE in place from cos/sin tables", py::arg("x"),
        py::arg("positions"), py::arg("cos"), py::arg("sin"));
}
