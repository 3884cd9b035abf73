// fp32 y = x @ weight.T (+ bias) for a few rows of x, with AVX2 and FMA.
//
// Decoding reads every weight once per step, so the weight stream is the cost. Each tile of NB
// output features is read from memory once and reused from L1 for every group of MB rows,
// while the next tile is prefetched a share per pass so memory stays busy during later passes.
//
// Every output is summed in the same order whatever M, the tile or the thread: eight lane sums
// over k in steps of 8, a masked step for the K % 8 tail, one fixed horizontal sum, then bias.
// So a row's result does not depend on the rows batched with it.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "avx2.h"

#include <algorithm>

namespace {

// 12 accumulators, 3 weight vectors and one x vector fill the 16 ymm registers. Of the tiles
// 1x8, 2x4, 2x6, 3x4 and 4x3 (features x rows) this was the fastest at 8 rows.
constexpr int kFeaturesPerTile = 3;
constexpr int kRowsPerTile = 4;
constexpr int64_t kFloatsPerLine = 16;

struct Problem {
  const float* x;
  const float* weight;
  const float* bias;  // nullptr when there is none
  float* y;
  int64_t rows, in_features, out_features;
  __m256i tail_mask;  // lanes of the last, partial step of 8 along k
};

// Rows [row, row + MB) by features [feature, feature + NB). In this pass it prefetches the rows
// of the next tile whose index is congruent to `pass` mod `passes`. (At 8 rows, prefetching all of
// the next tile in the first pass took 1.2x as long, no software prefetch 1.45x, two tiles ahead 1.07x.)
template <int NB, int MB>
inline void tile(const Problem& p, int64_t feature, int64_t row, int pass, int passes, int next_features) {
  const int64_t K = p.in_features;
  const float* w = p.weight + feature * K;
  const float* x = p.x + row * K;
  const float* next = w + NB * K;
  __m256 acc[NB][MB];
  for (int i = 0; i < NB; ++i)
    for (int r = 0; r < MB; ++r) acc[i][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if ((k & (kFloatsPerLine - 1)) == 0)
      for (int i = pass; i < next_features; i += passes) _mm_prefetch((const char*)(next + i * K + k), _MM_HINT_T0);
    __m256 wv[NB];
    for (int i = 0; i < NB; ++i) wv[i] = _mm256_loadu_ps(w + i * K + k);
    for (int r = 0; r < MB; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * K + k);
      for (int i = 0; i < NB; ++i) acc[i][r] = _mm256_fmadd_ps(wv[i], xv, acc[i][r]);
    }
  }
  if (k < K) {
    for (int r = 0; r < MB; ++r) {
      const __m256 xv = _mm256_maskload_ps(x + r * K + k, p.tail_mask);
      for (int i = 0; i < NB; ++i)
        acc[i][r] = _mm256_fmadd_ps(_mm256_maskload_ps(w + i * K + k, p.tail_mask), xv, acc[i][r]);
    }
  }
  for (int r = 0; r < MB; ++r)
    for (int i = 0; i < NB; ++i) {
      float sum = horizontal_sum(acc[i][r]);
      if (p.bias) sum += p.bias[feature + i];
      p.y[(row + r) * p.out_features + feature + i] = sum;
    }
}

// All rows for features [feature, feature + NB), one pass per group of up to kRowsPerTile rows.
template <int NB>
void feature_tile(const Problem& p, int64_t feature, int next_features) {
  const int passes = static_cast<int>((p.rows + kRowsPerTile - 1) / kRowsPerTile);
  int pass = 0;
  int64_t row = 0;
  for (; row + kRowsPerTile <= p.rows; row += kRowsPerTile, ++pass)
    tile<NB, kRowsPerTile>(p, feature, row, pass, passes, next_features);
  switch (p.rows - row) {
    case 1:
      tile<NB, 1>(p, feature, row, pass, passes, next_features);
      break;
    case 2:
      tile<NB, 2>(p, feature, row, pass, passes, next_features);
      break;
    case 3:
      tile<NB, 3>(p, feature, row, pass, passes, next_features);
      break;
    default:
      break;
  }
}

void features(const Problem& p, int64_t begin, int64_t end) {
  int64_t feature = begin;
  for (; feature + kFeaturesPerTile <= end; feature += kFeaturesPerTile) {
    const int64_t left = end - feature - kFeaturesPerTile;
    feature_tile<kFeaturesPerTile>(p, feature, static_cast<int>(std::min<int64_t>(left, kFeaturesPerTile)));
  }
  for (; feature < end; ++feature) feature_tile<1>(p, feature, 0);
}

}  // namespace

torch::Tensor small_linear(const torch::Tensor& x, const torch::Tensor& weight,
                           const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "small_linear: x [M, K], weight [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "small_linear: fp32 only");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "small_linear: CPU tensors only");
  TORCH_CHECK(weight.is_contiguous(), "small_linear: weight must be contiguous");
  const torch::Tensor rows = x.contiguous();
  const int64_t M = rows.size(0), K = rows.size(1), N = weight.size(0);
  torch::Tensor bias_values;
  if (bias.has_value() && bias->defined()) {
    bias_values = bias->contiguous();
    TORCH_CHECK(bias_values.scalar_type() == at::kFloat && bias_values.numel() == N, "small_linear: bias [N] fp32");
  }
  torch::Tensor y = torch::empty({M, N}, rows.options());
  if (M == 0 || N == 0) return y;
  const int tail = static_cast<int>(K % 8);
  Problem p{rows.data_ptr<float>(),
            weight.data_ptr<float>(),
            bias_values.defined() ? bias_values.data_ptr<float>() : nullptr,
            y.data_ptr<float>(),
            M,
            K,
            N,
            _mm256_setr_epi32(tail > 0 ? -1 : 0, tail > 1 ? -1 : 0, tail > 2 ? -1 : 0, tail > 3 ? -1 : 0,
                              tail > 4 ? -1 : 0, tail > 5 ? -1 : 0, tail > 6 ? -1 : 0, 0)};
  // Whole tiles per thread, so each thread streams one contiguous slice of the weight.
  const int64_t tiles = (N + kFeaturesPerTile - 1) / kFeaturesPerTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    features(p, begin * kFeaturesPerTile, std::min(end * kFeaturesPerTile, N));
  });
  return y;
}
