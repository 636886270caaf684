// What the tokenmill CPU extension exports (bound to Python in bindings.cpp).
#pragma once

#include <torch/extension.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace tokenmill {

// paged_attention.cpp
std::tuple<torch::Tensor, torch::Tensor> plan(const torch::Tensor& query_start_loc, const torch::Tensor& seq_lens,
                                              const torch::Tensor& block_tables, int64_t num_kv_heads, int64_t group,
                                              int64_t block_size, int64_t min_shared_tokens, int64_t sdpa_min_chunk);
torch::Tensor forward(const torch::Tensor& q, const std::optional<torch::Tensor>& k,
                      const std::optional<torch::Tensor>& v, torch::Tensor kv_cache,
                      const std::optional<torch::Tensor>& slot_mapping, const torch::Tensor& block_tables,
                      const torch::Tensor& query_start_loc, const torch::Tensor& seq_lens,
                      const torch::Tensor& work_plan, const torch::Tensor& prefix_plan, double scale,
                      int64_t window, double softcap, bool simd);
int64_t vector_lanes();

// fused_ops.cpp
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
void fused_add_rms_norm(torch::Tensor& x, torch::Tensor& residual, const torch::Tensor& weight, double eps);
torch::Tensor silu_and_mul(const torch::Tensor& gate_up);
void rotary_embedding(torch::Tensor& x, const torch::Tensor& positions, const torch::Tensor& cos,
                      const torch::Tensor& sin);

// decoder_stack.cpp
// One linear of a layer: a weight prepacked for oneDNN (packed) or a plain [out, in] weight.
struct StackLinear {
  torch::Tensor weight;
  std::optional<torch::Tensor> bias;
  bool packed = false;
  torch::Tensor operator()(const torch::Tensor& x) const;
};

// The Llama decoder layers of a model, run in one call (the weights are held, not copied).
class DecoderStack {
 public:
  // The parts forward() times into `timings` (seconds, added to), in this order.
  enum Part { kNorm, kProjections, kRope, kAttention, kSiluAndMul, kNumParts };

  DecoderStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t rotary_dim, double eps,
               double scale, int64_t window);
  // linears: (weight, bias, packed) of qkv_proj, o_proj, gate_up_proj, down_proj.
  void add_layer(torch::Tensor input_norm, torch::Tensor post_attention_norm,
                 const std::vector<std::tuple<torch::Tensor, std::optional<torch::Tensor>, bool>>& linears);
  // x: the embeddings [T, hidden]; returns (the last layer's MLP output, the residual stream before it).
  std::tuple<torch::Tensor, torch::Tensor> forward(
      torch::Tensor x, const torch::Tensor& positions, const torch::Tensor& cos, const torch::Tensor& sin,
      const std::vector<torch::Tensor>& kv_caches, const torch::Tensor& slot_mapping,
      const torch::Tensor& block_tables, const torch::Tensor& query_start_loc, const torch::Tensor& seq_lens,
      const torch::Tensor& work_plan, const torch::Tensor& prefix_plan,
      const std::optional<torch::Tensor>& timings) const;

 private:
  struct Layer {
    torch::Tensor input_norm, post_attention_norm;
    std::array<StackLinear, 4> linears;
  };
  int64_t num_heads_, num_kv_heads_, head_dim_, rotary_dim_;
  double eps_, scale_;
  int64_t window_;
  std::vector<Layer> layers_;
};

// argmax.cpp
torch::Tensor argmax(const torch::Tensor& logits);

}  // namespace tokenmill
