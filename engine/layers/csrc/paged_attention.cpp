// fp32 attention of decoding tokens over the paged KV cache, with AVX2 and FMA: one query token per
// sequence, each against the keys and values at its own cache slots.
//
// The indexed path it replaces gathers every sequence's keys and values into padded tensors
// (index_select) and then runs masked SDPA; here each key and value is read once, in place. A
// (sequence, KV head) pair is one work item: its query heads (grouped-query attention shares the
// KV head) are scored together against each key, so a key is loaded once for the whole group.
// A sequence's result depends only on its own query and cache: never on the others in the batch.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>

#include "avx2.h"

#include <algorithm>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = 8;

// Replaces each score by exp(score - max) and returns their sum.
inline float exponentiate(float* scores, int64_t count, float max) {
  int64_t i = 0;
  Vec sum(0.f);
  const Vec shift(max);
  for (; i + Vec::size() <= count; i += Vec::size()) {
    Vec e = (Vec::loadu(scores + i) - shift).exp_u20();
    e.store(scores + i);
    sum = sum + e;
  }
  float total = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sum);
  for (; i < count; ++i) {
    scores[i] = std::exp(scores[i] - max);
    total += scores[i];
  }
  return total;
}

struct Problem {
  const float* queries;  // [tokens, heads, dim]
  const float* keys;     // [slots, kv_heads, dim]
  const float* values;
  const int64_t* slots;    // [tokens, width]: each token's cache slots by position
  const int64_t* lengths;  // [tokens]: positions each token attends to
  float* output;           // [tokens, heads, dim]
  int64_t heads, kv_heads, group, dim, width;
  float scale;
};

// Score of one query head against one key: two lanes of sums over the head dimension, then one
// fixed horizontal sum, so the result never depends on the batch.
inline float score(const float* q, const float* k, int64_t dim) {
  __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 2 * kLanes <= dim; d += 2 * kLanes) {
    even = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), even);
    odd = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + kLanes), _mm256_loadu_ps(k + d + kLanes), odd);
  }
  if (d < dim) even = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), even);
  return horizontal_sum(_mm256_add_ps(even, odd));
}

// out += weight * value over the head dimension.
inline void accumulate(float weight, const float* value, float* out, int64_t dim) {
  const __m256 w = _mm256_set1_ps(weight);
  for (int64_t d = 0; d < dim; d += kLanes)
    _mm256_storeu_ps(out + d, _mm256_fmadd_ps(w, _mm256_loadu_ps(value + d), _mm256_loadu_ps(out + d)));
}

// Keys and values sit at scattered cache slots, which no hardware prefetcher follows: ask for the
// row kAhead positions on while this one is used.
constexpr int64_t kAhead = 8;
inline void prefetch_row(const float* row, int64_t dim) {
  for (int64_t d = 0; d < dim; d += 16) _mm_prefetch(reinterpret_cast<const char*>(row + d), _MM_HINT_T0);
}

// One token's query heads of one KV head; `scores` holds group x length floats.
void attend(const Problem& p, int64_t token, int64_t kv_head, std::vector<float>& scores) {
  const int64_t length = p.lengths[token], group = p.group, dim = p.dim;
  const int64_t* slots = p.slots + token * p.width;
  const float* q = p.queries + (token * p.heads + kv_head * group) * dim;
  scores.resize(group * length);
  for (int64_t j = 0; j < length; ++j) {
    const float* k = p.keys + (slots[j] * p.kv_heads + kv_head) * dim;
    if (j + kAhead < length) prefetch_row(p.keys + (slots[j + kAhead] * p.kv_heads + kv_head) * dim, dim);
    for (int64_t g = 0; g < group; ++g) scores[g * length + j] = score(q + g * dim, k, dim) * p.scale;
  }
  for (int64_t g = 0; g < group; ++g) {
    float* row = scores.data() + g * length;
    const float inverse = 1.f / exponentiate(row, length, *std::max_element(row, row + length));
    for (int64_t j = 0; j < length; ++j) row[j] *= inverse;
  }
  float* out = p.output + (token * p.heads + kv_head * group) * dim;
  std::fill(out, out + group * dim, 0.f);
  for (int64_t j = 0; j < length; ++j) {
    const float* v = p.values + (slots[j] * p.kv_heads + kv_head) * dim;
    if (j + kAhead < length) prefetch_row(p.values + (slots[j + kAhead] * p.kv_heads + kv_head) * dim, dim);
    for (int64_t g = 0; g < group; ++g) accumulate(scores[g * length + j], v, out + g * dim, dim);
  }
}

}  // namespace

torch::Tensor paged_decode_attention(const torch::Tensor& queries, const torch::Tensor& keys, const torch::Tensor& values,
                                     const torch::Tensor& slots, const torch::Tensor& lengths, double scale) {
  TORCH_CHECK(queries.dim() == 3 && keys.dim() == 3 && values.sizes() == keys.sizes(), "queries [tokens, heads, dim], cache [slots, kv_heads, dim]");
  for (const auto* t : {&queries, &keys, &values})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->device().is_cpu(), "contiguous fp32 CPU tensors");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous() && slots.dim() == 2 && slots.size(0) == queries.size(0), "slots [tokens, width] int64");
  TORCH_CHECK(lengths.scalar_type() == torch::kInt64 && lengths.is_contiguous() && lengths.numel() == queries.size(0), "lengths [tokens] int64");
  const int64_t heads = queries.size(1), dim = queries.size(2), kv_heads = keys.size(1);
  TORCH_CHECK(keys.size(2) == dim && dim % kLanes == 0, "head dim a multiple of 8, the same for queries and cache");
  TORCH_CHECK(heads % kv_heads == 0, "query heads a multiple of KV heads");
  const int64_t* length_data = lengths.data_ptr<int64_t>();
  for (int64_t t = 0; t < queries.size(0); ++t)
    TORCH_CHECK(length_data[t] >= 1 && length_data[t] <= slots.size(1), "lengths within 1 and the slot table's width");
  auto output = torch::empty_like(queries);
  const Problem problem{queries.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(), slots.data_ptr<int64_t>(),
                        length_data, output.data_ptr<float>(), heads, kv_heads, heads / kv_heads, dim, slots.size(1),
                        static_cast<float>(scale)};
  at::parallel_for(0, queries.size(0) * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) attend(problem, item / kv_heads, item % kv_heads, scores);
  });
  return output;
}
