// The Llama decoder layers of one forward pass in one call: the same kernels, in the same order,
// as the Python loop in tokenmill/models/llama.py (so the same results, bit for bit), without
// going back to the interpreter between them.
//
// Why it pays: a decode step runs ~9 kernels per layer, and each GEMM streams megabytes of
// weights through the caches. The Python between two kernels (module calls, views, argument
// parsing) then runs with cold caches: measured on a 30-layer model at 128 decodes, the gaps
// between kernels added up to ~10 ms a step, against ~1.3 ms when the kernels were stubbed out.
// The same steps in C++ touch far less memory.
//
// Per layer, with residual the stream carried from layer to layer (the first layer takes the
// embeddings as its residual):
//   x, residual = rms_norm(x), x              (first layer)   |  fused_add_rms_norm(x, residual)
//   qkv = x @ Wqkv (+ b);  rotary_embedding(q and k heads, in place)
//   out = paged attention (writes k/v into the layer's cache)
//   x = out @ Wo (+ b);  fused_add_rms_norm(x, residual)
//   x = silu_and_mul(x @ Wgate_up (+ b)) @ Wdown (+ b)
// Each linear is either prepacked for oneDNN (tokenmill/models/layers/linear.py: called through
// the dispatcher as mkldnn::_linear_pointwise, as PackedLinear does) or a plain weight (at::linear).
#include <ATen/core/dispatch/Dispatcher.h>

#include <chrono>
#include <string_view>

#include "ops.h"

namespace tokenmill {

namespace {

using Clock = std::chrono::steady_clock;

torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& w, const std::optional<torch::Tensor>& b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<torch::Tensor(const torch::Tensor&, const torch::Tensor&,
                                            const std::optional<torch::Tensor>&, std::string_view,
                                            c10::List<std::optional<c10::Scalar>>, std::optional<std::string_view>)>();
  return op.call(x, w, b, "none", c10::List<std::optional<c10::Scalar>>(), std::string_view(""));
}

}  // namespace

torch::Tensor StackLinear::operator()(const torch::Tensor& x) const {
  return packed ? packed_linear(x, weight, bias) : at::linear(x, weight, bias);
}

DecoderStack::DecoderStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t rotary_dim,
                           double eps, double scale, int64_t window)
    : num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim), rotary_dim_(rotary_dim),
      eps_(eps), scale_(scale), window_(window) {
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0,
              "num_heads must be a positive multiple of num_kv_heads");
  TORCH_CHECK(rotary_dim > 0 && rotary_dim <= head_dim && rotary_dim % 2 == 0,
              "rotary_dim must be even and within head_dim");
}

void DecoderStack::add_layer(torch::Tensor input_norm, torch::Tensor post_attention_norm,
                             const std::vector<std::tuple<torch::Tensor, std::optional<torch::Tensor>, bool>>& linears) {
  TORCH_CHECK(linears.size() == 4, "a layer has 4 linears (qkv, o, gate_up, down), got ", linears.size());
  Layer layer{std::move(input_norm), std::move(post_attention_norm), {}};
  for (size_t i = 0; i < 4; ++i) {
    const auto& [w, b, packed] = linears[i];
    layer.linears[i] = StackLinear{w, b, packed};
  }
  layers_.push_back(std::move(layer));
}

std::tuple<torch::Tensor, torch::Tensor> DecoderStack::forward(
    torch::Tensor x, const torch::Tensor& positions, const torch::Tensor& cos, const torch::Tensor& sin,
    const std::vector<torch::Tensor>& kv_caches, const torch::Tensor& slot_mapping, const torch::Tensor& block_tables,
    const torch::Tensor& query_start_loc, const torch::Tensor& seq_lens, const torch::Tensor& work_plan,
    const torch::Tensor& prefix_plan, const std::optional<torch::Tensor>& timings) const {
  TORCH_CHECK(kv_caches.size() == layers_.size(), "one KV cache per layer: ", layers_.size(), " layers, ",
              kv_caches.size(), " caches");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be the contiguous [T, hidden] embeddings");
  double* seconds = nullptr;
  if (timings.has_value()) {
    TORCH_CHECK(timings->scalar_type() == torch::kFloat64 && timings->numel() == kNumParts && timings->is_contiguous(),
                "timings must be a contiguous float64 tensor of ", kNumParts, " seconds");
    seconds = timings->data_ptr<double>();
  }
  // Accumulates the time since the last mark into part p (only when timings are asked for).
  Clock::time_point mark = seconds ? Clock::now() : Clock::time_point{};
  auto lap = [&](Part p) {
    if (!seconds) return;
    const auto now = Clock::now();
    seconds[p] += std::chrono::duration<double>(now - mark).count();
    mark = now;
  };

  const int64_t T = x.size(0), H = num_heads_, KVH = num_kv_heads_, D = head_dim_;
  torch::Tensor residual;
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& layer = layers_[l];
    if (!residual.defined()) {
      residual = x;
      x = rms_norm(x, layer.input_norm, eps_);
    } else {
      fused_add_rms_norm(x, residual, layer.input_norm, eps_);
    }
    lap(kNorm);
    auto qkv = layer.linears[0](x).view({T, H + 2 * KVH, D});
    lap(kProjections);
    auto qk = qkv.narrow(1, 0, H + KVH);
    if (rotary_dim_ < D) qk = qk.narrow(2, 0, rotary_dim_);
    rotary_embedding(qk, positions, cos, sin);
    lap(kRope);
    auto out = tokenmill::forward(qkv.narrow(1, 0, H), qkv.narrow(1, H, KVH), qkv.narrow(1, H + KVH, KVH),
                                  kv_caches[l], slot_mapping, block_tables, query_start_loc, seq_lens, work_plan,
                                  prefix_plan, scale_, window_, 0.0, true);
    lap(kAttention);
    x = layer.linears[1](out.view({T, H * D}));
    lap(kProjections);
    fused_add_rms_norm(x, residual, layer.post_attention_norm, eps_);
    lap(kNorm);
    auto gate_up = layer.linears[2](x);
    lap(kProjections);
    auto act = silu_and_mul(gate_up);
    lap(kSiluAndMul);
    x = layer.linears[3](act);
    lap(kProjections);
  }
  return {x, residual};
}

}  // namespace tokenmill
