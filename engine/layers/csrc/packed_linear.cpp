// fp32 y = x @ weight.T (+ bias) with AVX-512, on a weight packed once into panels.
//
// A panel is kPanel output features laid out k-major ([K][kPanel]), so one 64-byte load gives 16
// features' weights at one k and the whole panel streams front to back. Each tile of up to kTileRows
// rows keeps its kTileRows x kPanel sums in registers (24 of the 32 zmm) while it walks k once:
// per k, three weight loads and one broadcast per row feed 3 x rows FMAs. At a decode step's 32
// rows a panel (K x 48 floats) is read from memory once and reused from cache by the four tiles,
// which meanwhile bring the thread's next panel into L2, a share each.
//
// Every output is summed in one order whatever the rows, the tile or the thread (k ascending, one
// lane per output, then bias), so a row's result does not depend on the rows batched with it.
//
// Compiled for AVX-512 by function attributes only: the rest of the extension stays AVX2, and
// packed_linear refuses to run on a CPU without AVX-512F (tuned_linear.py offers it only there).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <immintrin.h>

#include <algorithm>

namespace {

constexpr int64_t kPanel = 48;  // output features per panel: three zmm vectors
constexpr int64_t kVectors = kPanel / 16;
constexpr int kTileRows = 8;

struct Problem {
  const float* x;       // [rows, K]
  const float* panels;  // [panels, K, kPanel]
  const float* bias;    // [N] or nullptr
  float* y;             // [rows, N]
  int64_t rows, in_features, out_features;
};

template <int MR>
__attribute__((target("avx512f"))) void tile(const Problem& p, int64_t panel, int64_t row, const float* next, int part,
                                              int parts) {
  const int64_t K = p.in_features;
  const float* w = p.panels + panel * K * kPanel;
  const float* x = p.x + row * K;
  __m512 acc[MR][kVectors];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = w + k * kPanel;
    const char* ahead = reinterpret_cast<const char*>(wk + 8 * kPanel);  // past the panel's end at most by 8 rows: a hint, never read
    _mm_prefetch(ahead, _MM_HINT_T0);
    _mm_prefetch(ahead + 64, _MM_HINT_T0);
    _mm_prefetch(ahead + 128, _MM_HINT_T0);
    if (next && k % parts == part) {
      const char* line = reinterpret_cast<const char*>(next + k * kPanel);
      _mm_prefetch(line, _MM_HINT_T1);
      _mm_prefetch(line + 64, _MM_HINT_T1);
      _mm_prefetch(line + 128, _MM_HINT_T1);
    }
    __m512 wv[kVectors];
    for (int v = 0; v < kVectors; ++v) wv[v] = _mm512_loadu_ps(wk + 16 * v);
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * K + k]);
      for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm512_fmadd_ps(wv[v], xv, acc[r][v]);
    }
  }
  const int64_t first = panel * kPanel;
  const int64_t features = std::min<int64_t>(kPanel, p.out_features - first);
  for (int v = 0; v < kVectors; ++v) {
    const int64_t lanes = std::min<int64_t>(16, std::max<int64_t>(0, features - 16 * v));
    if (lanes == 0) break;
    const __mmask16 mask = static_cast<__mmask16>((1u << lanes) - 1);
    const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(mask, p.bias + first + 16 * v) : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r)
      _mm512_mask_storeu_ps(p.y + (row + r) * p.out_features + first + 16 * v, mask, _mm512_add_ps(acc[r][v], bias));
  }
}

// `next`: the panel this thread reads after this one (nullptr if none), prefetched a share per
// tile into L2 so that its read from memory overlaps this panel's arithmetic.
void panel_rows(const Problem& p, int64_t panel, const float* next) {
  const int parts = static_cast<int>((p.rows + kTileRows - 1) / kTileRows);
  int part = 0;
  int64_t row = 0;
  for (; row + kTileRows <= p.rows; row += kTileRows, ++part) tile<kTileRows>(p, panel, row, next, part, parts);
  switch (p.rows - row) {
    case 1: tile<1>(p, panel, row, next, part, parts); break;
    case 2: tile<2>(p, panel, row, next, part, parts); break;
    case 3: tile<3>(p, panel, row, next, part, parts); break;
    case 4: tile<4>(p, panel, row, next, part, parts); break;
    case 5: tile<5>(p, panel, row, next, part, parts); break;
    case 6: tile<6>(p, panel, row, next, part, parts); break;
    case 7: tile<7>(p, panel, row, next, part, parts); break;
    default: break;
  }
}

}  // namespace

// weight [N, K] -> [ceil(N / 48), K, 48], the last panel padded with zeros.
torch::Tensor pack_linear_weight(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
              "pack_linear_weight: an fp32 CPU [out, in] weight");
  const int64_t N = weight.size(0), K = weight.size(1), panels = (N + kPanel - 1) / kPanel;
  torch::Tensor padded = torch::zeros({panels * kPanel, K}, weight.options());
  padded.narrow(0, 0, N).copy_(weight);
  return padded.view({panels, kPanel, K}).transpose(1, 2).contiguous();
}

torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& panels, const c10::optional<torch::Tensor>& bias,
                            int64_t out_features) {
  TORCH_CHECK(__builtin_cpu_supports("avx512f"), "packed_linear: this CPU lacks AVX-512F");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "packed_linear: x fp32 [M, K] on the CPU");
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == kPanel && panels.size(1) == x.size(1) && panels.is_contiguous() &&
                  panels.scalar_type() == at::kFloat,
              "packed_linear: panels from pack_linear_weight for x's K");
  TORCH_CHECK(out_features > 0 && out_features <= panels.size(0) * kPanel, "packed_linear: out_features within the panels");
  const torch::Tensor rows = x.contiguous();
  torch::Tensor bias_values;
  if (bias.has_value() && bias->defined()) {
    bias_values = bias->contiguous();
    TORCH_CHECK(bias_values.scalar_type() == at::kFloat && bias_values.numel() == out_features, "packed_linear: bias [N] fp32");
  }
  torch::Tensor y = torch::empty({rows.size(0), out_features}, rows.options());
  if (rows.size(0) == 0) return y;
  const Problem p{rows.data_ptr<float>(), panels.data_ptr<float>(),
                  bias_values.defined() ? bias_values.data_ptr<float>() : nullptr,
                  y.data_ptr<float>(), rows.size(0), rows.size(1), out_features};
  // Whole panels per thread: each thread streams its own contiguous share of the packed weight.
  // With one tile a panel (8 rows or fewer) the panel's own read is the pass; prefetching the next
  // one too only competes with it (BENCHMARKS.md, "An AVX-512 kernel on packed weights").
  const bool several_tiles = rows.size(0) > kTileRows;
  at::parallel_for(0, panels.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t panel = begin; panel < end; ++panel)
      panel_rows(p, panel, (several_tiles && panel + 1 < end) ? p.panels + (panel + 1) * p.in_features * kPanel : nullptr);
  });
  return y;
}
