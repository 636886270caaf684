// What the tokenmill CPU extension exports (bound to Python in bindings.cpp).
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>

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

// argmax.cpp
torch::Tensor argmax(const torch::Tensor& logits);

}  // namespace tokenmill
