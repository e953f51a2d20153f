// A hand-written fp32 AVX2 product for few rows (issue 13's experiment, not used by bitdance): y = x W^T with
// W packed in panels of 16 output columns, [ceil(N/16), K, 16], so that each panel is one contiguous stream.
// Each 6 x 16 block of the output lives in 12 ymm accumulators over the whole K loop. With `prefetch`, the
// first row tile of a panel also asks for the next panel's lines, into the L2 (_MM_HINT_T1): while a cold
// weight is multiplied, the next part of it is already on its way.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>
#include <immintrin.h>

namespace {

constexpr int64_t kPanel = 16;

torch::Tensor panel_pack(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat, "panel_pack: a 2-D fp32 weight, got ", w.sizes());
  const int64_t N = w.size(0), K = w.size(1), NB = (N + kPanel - 1) / kPanel;
  auto wc = w.contiguous();
  auto p = torch::zeros({NB, K, kPanel}, w.options());
  const float* s = wc.data_ptr<float>();
  float* d = p.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) d[((n / kPanel) * K + k) * kPanel + n % kPanel] = s[n * K + k];
  return p;
}

template <int RB, bool PF>
inline void tile(const float* x, int64_t K, const float* w, const float* next, float* out, int64_t ldo,
                 int64_t cols) {
  __m256 lo[RB], hi[RB];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if (PF) _mm_prefetch(reinterpret_cast<const char*>(next + k * kPanel), _MM_HINT_T1);
    const __m256 w0 = _mm256_load_ps(w + k * kPanel), w1 = _mm256_load_ps(w + k * kPanel + 8);
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * K + k);
      lo[r] = _mm256_fmadd_ps(xv, w0, lo[r]);
      hi[r] = _mm256_fmadd_ps(xv, w1, hi[r]);
    }
  }
  alignas(32) float buf[RB][kPanel];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
    _mm256_store_ps(buf[r], lo[r]);
    _mm256_store_ps(buf[r] + 8, hi[r]);
  }
  for (int r = 0; r < RB; ++r)
    for (int64_t j = 0; j < cols; ++j) out[r * ldo + j] = buf[r][j];
}

template <bool PF>
void rows_tile(int64_t rows, const float* x, int64_t K, const float* w, const float* next, float* out,
               int64_t ldo, int64_t cols) {
  switch (rows) {
    case 6: tile<6, PF>(x, K, w, next, out, ldo, cols); break;
    case 5: tile<5, PF>(x, K, w, next, out, ldo, cols); break;
    case 4: tile<4, PF>(x, K, w, next, out, ldo, cols); break;
    case 3: tile<3, PF>(x, K, w, next, out, ldo, cols); break;
    case 2: tile<2, PF>(x, K, w, next, out, ldo, cols); break;
    default: tile<1, PF>(x, K, w, next, out, ldo, cols); break;
  }
}

torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t n, bool prefetch) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && packed.dim() == 3 && packed.size(2) == kPanel,
              "panel_linear: fp32 input and a weight from panel_pack");
  const int64_t K = packed.size(1), NB = packed.size(0);
  TORCH_CHECK(x.size(-1) == K && (n + kPanel - 1) / kPanel == NB, "panel_linear: input ", x.sizes(),
              " does not fit the packed weight ", packed.sizes(), " of ", n, " outputs");
  auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t R = x2.size(0);
  auto out = torch::empty({R, n}, x.options());
  const float* xp = x2.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb) {
      const float* w = wp + nb * K * kPanel;
      const float* next = wp + std::min(nb + 1, b1 - 1) * K * kPanel;
      const int64_t cols = std::min<int64_t>(kPanel, n - nb * kPanel);
      float* o = op + nb * kPanel;
      for (int64_t r = 0; r < R; r += 6) {
        const int64_t rows = std::min<int64_t>(6, R - r);
        // only the first row tile prefetches: a test in the inner loop of every tile cost a third of the speed
        (prefetch && r == 0 ? rows_tile<true> : rows_tile<false>)(rows, xp + r * K, K, w, next, o + r * n, n, cols);
      }
    }
  });
  auto shape = x.sizes().vec();
  shape.back() = n;
  return out.view(shape);
}

}  // namespace

TORCH_LIBRARY(bitdance_bench, m) {
  m.def("panel_pack(Tensor w) -> Tensor");
  m.def("panel_linear(Tensor x, Tensor packed, int n, bool prefetch) -> Tensor");
}
TORCH_LIBRARY_IMPL(bitdance_bench, CPU, m) {
  m.impl("panel_pack", &panel_pack);
  m.impl("panel_linear", &panel_linear);
}
