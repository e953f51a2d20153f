// fp32 products of few rows for AVX2 + FMA CPUs: y = x W^T, with W packed once into panels of 16 output
// columns, [ceil(N/16), K, 16], so that the weight of each panel is one contiguous stream from memory.
//
// Why not the BLAS: at 4-16 rows a product does 8-32 FLOPs per weight element, so its speed is that of the
// weight streaming in from memory, and MKL's packed GEMM left the core waiting on it. Here each 6 x 16 block
// of the output stays in 12 ymm accumulators over the whole K loop, and the first row tile of a panel asks
// for the next panel's lines into the L2 (_MM_HINT_T1) while it multiplies the current one. Only that tile
// prefetches: choosing the prefetching tile inside the inner loop cost a third of the speed.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kPanel = 16;
constexpr int64_t kRowTile = 6;

at::Tensor panel_pack(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.device().is_cpu(),
              "panel_pack: expected a 2-D fp32 CPU weight, got ", w.sizes(), " ", w.scalar_type());
  const int64_t N = w.size(0), K = w.size(1), NB = (N + kPanel - 1) / kPanel;
  const at::Tensor wc = w.contiguous();
  at::Tensor p = at::zeros({NB, K, kPanel}, w.options());
  const float* s = wc.const_data_ptr<float>();
  float* d = p.mutable_data_ptr<float>();
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb)
      for (int64_t n = nb * kPanel; n < std::min(N, (nb + 1) * kPanel); ++n)
        for (int64_t k = 0; k < K; ++k) d[(nb * K + k) * kPanel + n % kPanel] = s[n * K + k];
  });
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
    const __m256 w0 = _mm256_loadu_ps(w + k * kPanel), w1 = _mm256_loadu_ps(w + k * kPanel + 8);
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * K + k);
      lo[r] = _mm256_fmadd_ps(xv, w0, lo[r]);
      hi[r] = _mm256_fmadd_ps(xv, w1, hi[r]);
    }
  }
  if (cols == kPanel) {
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      _mm256_storeu_ps(out + r * ldo, lo[r]);
      _mm256_storeu_ps(out + r * ldo + 8, hi[r]);
    }
    return;
  }
  alignas(32) float buf[RB][kPanel];  // the last panel of a width that 16 does not divide
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
    _mm256_store_ps(buf[r], lo[r]);
    _mm256_store_ps(buf[r] + 8, hi[r]);
  }
  for (int r = 0; r < RB; ++r)
    for (int64_t j = 0; j < cols; ++j) out[r * ldo + j] = buf[r][j];
}

template <bool PF>
void row_tile(int64_t rows, const float* x, int64_t K, const float* w, const float* next, float* out,
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

at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.dim() >= 1,
              "panel_linear: expected an fp32 CPU input, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous() &&
                  packed.scalar_type() == at::kFloat,
              "panel_linear: the weight must come from panel_pack, got ", packed.sizes());
  const int64_t K = packed.size(1), NB = packed.size(0);
  TORCH_CHECK(x.size(-1) == K && n > 0 && (n + kPanel - 1) / kPanel == NB, "panel_linear: input ", x.sizes(),
              " does not fit a packed weight ", packed.sizes(), " of ", n, " outputs");
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t R = x2.size(0);
  at::Tensor out = at::empty({R, n}, x.options());
  const float* xp = x2.const_data_ptr<float>();
  const float* wp = packed.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb) {
      const float* w = wp + nb * K * kPanel;
      const float* next = wp + std::min(nb + 1, b1 - 1) * K * kPanel;
      const int64_t cols = std::min(kPanel, n - nb * kPanel);
      for (int64_t r = 0; r < R; r += kRowTile) {
        const int64_t rows = std::min(kRowTile, R - r);
        (r == 0 ? row_tile<true> : row_tile<false>)(rows, xp + r * K, K, w, next, op + r * n + nb * kPanel, n,
                                                     cols);
      }
    }
  });
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return out.view(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bitdance, m) {  // the namespace also holds ops defined in Python
  m.def("panel_pack(Tensor w) -> Tensor");
  m.def("panel_linear(Tensor x, Tensor packed, int n) -> Tensor");
}
TORCH_LIBRARY_IMPL(bitdance, CPU, m) {
  m.impl("panel_pack", &panel_pack);
  m.impl("panel_linear", &panel_linear);
}
