// fp32 operations of a Llama-family decoder layer that torch runs as many small ones: an RMS norm
// is seven tensor operations in transformers, rotary embedding about fourteen. At a decode step's
// few rows each of those costs more in dispatch than in arithmetic (BENCHMARKS.md, "The decoder's
// small operations fused").
//
// Each row is computed alone, in a fixed order, so a row's result never depends on the batch.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "avx2.h"

#include <cmath>

namespace {

// Rows per thread chunk: a step of one or a few rows runs on the calling thread, without waking
// the OpenMP team, whose barrier would cost more than the work.
int64_t grain_rows(int64_t floats_per_row) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, floats_per_row)); }

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.dim() == 2 && t.is_contiguous(), name,
              ": a contiguous 2-D fp32 CPU tensor");
}

}  // namespace

// y = x / sqrt(mean(x^2) + eps) * weight, over each row (transformers' LlamaRMSNorm in fp32).
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_rows(x, "rms_norm x");
  const int64_t rows = x.size(0), hidden = x.size(1);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == hidden,
              "rms_norm weight: fp32 [hidden]");
  torch::Tensor y = torch::empty_like(x);
  const float* in = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* out = y.data_ptr<float>();
  at::parallel_for(0, rows, grain_rows(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = in + r * hidden;
      float* target = out + r * hidden;
      __m256 sums = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 8 <= hidden; i += 8) {
        const __m256 v = _mm256_loadu_ps(row + i);
        sums = _mm256_fmadd_ps(v, v, sums);
      }
      float sum = horizontal_sum(sums);
      for (; i < hidden; ++i) sum += row[i] * row[i];
      const float inverse = 1.f / std::sqrt(sum / static_cast<float>(hidden) + static_cast<float>(eps));
      const __m256 scale = _mm256_set1_ps(inverse);
      for (i = 0; i + 8 <= hidden; i += 8)
        _mm256_storeu_ps(target + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(row + i), scale)));
      for (; i < hidden; ++i) target[i] = w[i] * (row[i] * inverse);
    }
  });
  return y;
}

// Rotates, in place, the first `heads` heads of each row of `qkv` ([rows, heads_in_row * dim]: the
// fused q|k|v projection's output, queries then keys then values), as transformers'
// apply_rotary_pos_emb does: x * cos + rotate_half(x) * sin, with rotate_half pairing dimension i
// with i + dim / 2. cos and sin are [rows, dim], one row per token's position.
void rotary_embedding_(torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads, int64_t dim) {
  check_rows(qkv, "rotary_embedding_ qkv");
  check_rows(cos, "rotary_embedding_ cos");
  check_rows(sin, "rotary_embedding_ sin");
  const int64_t rows = qkv.size(0), width = qkv.size(1), half = dim / 2;
  TORCH_CHECK(dim % 2 == 0 && heads * dim <= width, "rotary_embedding_: even dim, heads * dim within a row");
  TORCH_CHECK(cos.size(0) == rows && sin.size(0) == rows && cos.size(1) == dim && sin.size(1) == dim,
              "rotary_embedding_: cos and sin [rows, dim]");
  float* data = qkv.data_ptr<float>();
  const float* cos_data = cos.data_ptr<float>();
  const float* sin_data = sin.data_ptr<float>();
  at::parallel_for(0, rows, grain_rows(heads * dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* c = cos_data + r * dim;
      const float* s = sin_data + r * dim;
      for (int64_t h = 0; h < heads; ++h) {
        float* x = data + r * width + h * dim;
        int64_t i = 0;
        for (; i + 8 <= half; i += 8) {
          const __m256 low = _mm256_loadu_ps(x + i), high = _mm256_loadu_ps(x + half + i);
          // low' = low * cos - high * sin; high' = high * cos + low * sin
          _mm256_storeu_ps(x + i, _mm256_sub_ps(_mm256_mul_ps(low, _mm256_loadu_ps(c + i)),
                                                _mm256_mul_ps(high, _mm256_loadu_ps(s + i))));
          _mm256_storeu_ps(x + half + i, _mm256_add_ps(_mm256_mul_ps(high, _mm256_loadu_ps(c + half + i)),
                                                       _mm256_mul_ps(low, _mm256_loadu_ps(s + half + i))));
        }
        for (; i < half; ++i) {
          const float low = x[i], high = x[half + i];
          x[i] = low * c[i] - high * s[i];
          x[half + i] = high * c[half + i] + low * s[half + i];
        }
      }
    }
  });
}
