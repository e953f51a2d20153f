// fp32 products for x86 CPUs: y = x W^T, with W packed once into panels of two vectors of output columns (16
// with AVX2 + FMA, 32 with AVX-512), [ceil(N/panel), K, panel], so that the weight of each panel is one
// contiguous stream from memory. The file is built twice (bitdance/kernels/__init__.py), once for each
// instruction set, and a process loads the build for the kernels torch runs: BITDANCE_AVX512 selects 512-bit
// vectors and row tiles of 8 rows (16 of the 32 registers accumulate) instead of 6 (12 of 16).
//
// Why not the BLAS: sampling multiplies 4-64 rows by weights that come from memory at every call (a head's
// weights are read again 26 times per AR step but do not stay in the cache in between), and MKL's packed GEMM
// left the core waiting on them. Two ways through a panel, by the number of rows:
// - fewer than kBlockedMinRows rows (1x models: 4): 2-30 FLOPs per weight element, so streaming sets the speed.
//   Each row tile of the output stays in registers over the whole K loop, and the first row tile of a panel
//   asks for the next panel's lines into the L2 (_MM_HINT_T1) while it multiplies the current one. Only that
//   tile prefetches: choosing the prefetching tile inside the inner loop cost a third of the speed.
// - more rows: the panel is cut into chunks of kChunk inputs (16 KiB of weight) that stay in the L1 while every
//   row tile multiplies them, and the lines of the chunk after are prefetched a few per row tile, one input's
//   lines every G inputs (G as large as still reaches a tile's share): the whole chunk in one tile's loop asked
//   for more lines at once than the core has buffers for, and stalled it. With the weights cold this ran
//   64-row products at 96-99% of the measured matmul peak against 80-84% for MKL, and 16-row ones at 60-64%
//   against the 50-53% of the first way (2-core Xeon, AVX2 forced; benchmarks/cold_weights.py).
// The weight may also be stored in bf16 or int8 (the storage of bitdance.models.quantized, whose per-channel
// scale the caller applies to the output): each weight is widened to fp32 in registers as it is loaded, and the
// products are fp32 as for an fp32 weight, so they equal those of the weight widened beforehand (up to the order
// of the sums). Where the weights stream from memory, 2 or 1 bytes per weight instead of 4 is what makes them
// faster. Chunks stay 16 KiB of weight and prefetching goes by the same 64 or 128 bytes of a panel ("units": one
// input of an fp32 panel, 2 of bf16, 4 of int8).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

#ifdef BITDANCE_AVX512
using Vec = __m512;
constexpr int64_t kRowTile = 8;  // 12 (24 accumulators) ran cold 16- and 64-row products 4-14% slower
#define PANEL_OP(name) name "_avx512"
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vbroadcast(const float* p) { return _mm512_set1_ps(*p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec wload(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline Vec wload(const uint16_t* p) {  // bf16: the upper half of an fp32
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
#else
using Vec = __m256;
constexpr int64_t kRowTile = 6;
#define PANEL_OP(name) name
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec wload(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline Vec wload(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
#endif
inline Vec wload(const float* p) { return vload(p); }

constexpr int64_t kLanes = sizeof(Vec) / sizeof(float);
constexpr int64_t kPanel = 2 * kLanes;
constexpr int64_t kBlockedMinRows = 16;
constexpr int64_t kUnit = kPanel * sizeof(float);  // bytes of one input of an fp32 panel: 64 or 128
constexpr int64_t kChunkUnits = 16384 / kUnit;  // a chunk: 16 KiB of one panel
template <typename T>
constexpr int64_t kChunk = 16384 / (kPanel * sizeof(T));  // inputs per chunk
template <typename T>
constexpr int64_t kPerUnit = sizeof(float) / sizeof(T);  // inputs per unit: 1 (fp32), 2 (bf16), 4 (int8)

// The cache lines of one unit of a panel (one with AVX2, two with AVX-512).
inline void prefetch_unit(const char* p) {
#pragma GCC unroll 2
  for (int64_t j = 0; j < kUnit; j += 64) _mm_prefetch(p + j, _MM_HINT_T1);
}

template <typename T>
inline const char* bytes(const T* p) { return reinterpret_cast<const char*>(p); }

// The element type a weight is stored in, for each dtype the kernel takes (bf16 as its 16 bits).
template <typename Fn>
inline auto by_storage(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kBFloat16: return fn(uint16_t());
    case at::kChar: return fn(int8_t());
    default: return fn(float());
  }
}

inline bool stored_ok(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kChar;
}

at::Tensor panel_pack(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && stored_ok(w.scalar_type()) && w.device().is_cpu(),
              "panel_pack: expected a 2-D fp32, bf16 or int8 CPU weight, got ", w.sizes(), " ", w.scalar_type());
  const int64_t N = w.size(0), K = w.size(1), NB = (N + kPanel - 1) / kPanel;
  const at::Tensor wc = w.contiguous();
  at::Tensor p = at::zeros({NB, K, kPanel}, w.options());
  by_storage(w.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    const T* s = static_cast<const T*>(wc.const_data_ptr());
    T* d = static_cast<T*>(p.mutable_data_ptr());
    at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t nb = b0; nb < b1; ++nb)
        for (int64_t n = nb * kPanel; n < std::min(N, (nb + 1) * kPanel); ++n)
          for (int64_t k = 0; k < K; ++k) d[(nb * K + k) * kPanel + n % kPanel] = s[n * K + k];
    });
  });
  return p;
}

// One input k of a row tile: acc[r] += x[r, k] * W[k, panel] for the tile's RB rows.
template <int RB, typename T>
__attribute__((always_inline)) inline void fma_step(const float* x, int64_t ldx, const T* wk, Vec* lo, Vec* hi) {
  const Vec w0 = wload(wk), w1 = wload(wk + kLanes);
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r) {
    const Vec xv = vbroadcast(x + r * ldx);
    lo[r] = vfma(xv, w0, lo[r]);
    hi[r] = vfma(xv, w1, hi[r]);
  }
}

// fn(std::integral_constant<int, RB>) for a row tile of `rows` (1..kRowTile) rows: the tile's height is a
// compile-time constant, so its accumulators stay in registers.
template <int RB = static_cast<int>(kRowTile), typename Fn>
inline void by_height(int64_t rows, Fn&& fn) {
  if constexpr (RB == 1) {
    fn(std::integral_constant<int, 1>());
  } else {
    if (rows >= RB)
      fn(std::integral_constant<int, RB>());
    else
      by_height<RB - 1>(rows, fn);
  }
}

template <int RB, bool PF, typename T>
inline void tile(const float* x, int64_t K, const T* w, const T* next, float* out, int64_t ldo) {
  constexpr int64_t U = kPerUnit<T>;
  Vec lo[RB], hi[RB];
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r) lo[r] = hi[r] = vzero();
  int64_t k = 0;
  for (; k + U <= K; k += U) {
    if (PF) prefetch_unit(bytes(next + k * kPanel));
#pragma GCC unroll 4
    for (int64_t j = 0; j < U; ++j) fma_step<RB>(x + k + j, K, w + (k + j) * kPanel, lo, hi);
  }
  if (PF && k < K) prefetch_unit(bytes(next + k * kPanel));
  for (; k < K; ++k) fma_step<RB>(x + k, K, w + k * kPanel, lo, hi);
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r) {
    vstore(out + r * ldo, lo[r]);
    vstore(out + r * ldo + kLanes, hi[r]);
  }
}

// One row tile's share of a chunk: out (+)= x[:, chunk] W[chunk, panel], prefetching `lines` units from `pf`,
// one every G inputs.
template <int RB, int G, typename T>
inline void chunk_tile(const float* x, int64_t ldx, int64_t kc, const T* w, const char* pf, int64_t lines,
                       float* out, int64_t ldo, bool accumulate) {
  Vec lo[RB], hi[RB];
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r) {
    lo[r] = accumulate ? vload(out + r * ldo) : vzero();
    hi[r] = accumulate ? vload(out + r * ldo + kLanes) : vzero();
  }
  int64_t k = 0;
  for (int64_t g = 0; k + G <= kc; ++g) {
    if (g < lines) prefetch_unit(pf + g * kUnit);
#pragma GCC unroll 8
    for (int64_t j = 0; j < G; ++j, ++k) fma_step<RB>(x + k, ldx, w + k * kPanel, lo, hi);
  }
  for (; k < kc; ++k) fma_step<RB>(x + k, ldx, w + k * kPanel, lo, hi);
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r) {
    vstore(out + r * ldo, lo[r]);
    vstore(out + r * ldo + kLanes, hi[r]);
  }
}

// Panel w (K x 16) of the product of R >= kBlockedMinRows rows into out (leading dimension ldo), chunk by chunk
// (see the top of the file); `end`: where the weights this thread multiplies end.
template <typename T>
void chunked_panel(const float* xp, int64_t R, int64_t K, const T* w, const T* end, float* out, int64_t ldo) {
  const int64_t tiles = (R + kRowTile - 1) / kRowTile;
  for (int64_t kb = 0; kb < K; kb += kChunk<T>) {
    const int64_t kc = std::min(kChunk<T>, K - kb);
    const T* ahead = w + (kb + kc) * kPanel;  // the next chunk, in this panel or the next one
    const int64_t lines = ahead < end ? std::min<int64_t>(kChunkUnits, (bytes(end) - bytes(ahead)) / kUnit) : 0;
    const int64_t per_tile = (lines + tiles - 1) / tiles;
    for (int64_t t = 0, r = 0; r < R; r += kRowTile, ++t) {
      const int64_t first = std::min(lines, t * per_tile);
      const char* pf = bytes(ahead) + first * kUnit;
      const int64_t share = std::min(per_tile, lines - first);
      by_height(std::min(kRowTile, R - r), [&](auto rb) {
        constexpr int RB = decltype(rb)::value;
        // one input's lines every 8 inputs where that reaches the tile's share (AVX2, 64 rows: 11 tiles share
        // the chunk's 256 inputs), else every 4 (32 rows: 6 tiles) or 2 (16 rows: 3 tiles)
        auto fn = kc / 8 >= share   ? chunk_tile<RB, 8, T>
                  : kc / 4 >= share ? chunk_tile<RB, 4, T>
                                    : chunk_tile<RB, 2, T>;
        fn(xp + r * K + kb, K, kc, w + kb * kPanel, pf, share, out + r * ldo, ldo, kb > 0);
      });
    }
  }
}

// Panel w of the product of fewer rows, a row tile at a time over the whole K; the first tile prefetches `next`.
template <typename T>
void streamed_panel(const float* xp, int64_t R, int64_t K, const T* w, const T* next, float* out, int64_t ldo) {
  for (int64_t r = 0; r < R; r += kRowTile)
    by_height(std::min(kRowTile, R - r), [&](auto rb) {
      constexpr int RB = decltype(rb)::value;
      (r == 0 ? tile<RB, true, T> : tile<RB, false, T>)(xp + r * K, K, w, next, out + r * ldo, ldo);
    });
}

// Every panel of out = x W^T, the panels shared out among the threads.
template <typename T>
void panel_products(const float* xp, int64_t R, int64_t K, const T* wp, int64_t NB, int64_t n, float* op) {
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> partial;  // the last panel of a width that the panel width does not divide is written here first
    for (int64_t nb = b0; nb < b1; ++nb) {
      const T* w = wp + nb * K * kPanel;
      const int64_t cols = std::min(kPanel, n - nb * kPanel);
      float* o = op + nb * kPanel;
      int64_t ldo = n;
      if (cols < kPanel) {
        partial.resize(R * kPanel);  // every value is written before it is read
        o = partial.data();
        ldo = kPanel;
      }
      if (R >= kBlockedMinRows)
        chunked_panel(xp, R, K, w, wp + b1 * K * kPanel, o, ldo);
      else
        streamed_panel(xp, R, K, w, wp + std::min(nb + 1, b1 - 1) * K * kPanel, o, ldo);
      if (cols < kPanel)
        for (int64_t r = 0; r < R; ++r)
          for (int64_t j = 0; j < cols; ++j) op[r * n + nb * kPanel + j] = partial[r * kPanel + j];
    }
  });
}

at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.dim() >= 1,
              "panel_linear: expected an fp32 CPU input, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous() &&
                  stored_ok(packed.scalar_type()),
              "panel_linear: the weight must come from panel_pack, got ", packed.sizes());
  const int64_t K = packed.size(1), NB = packed.size(0);
  TORCH_CHECK(x.size(-1) == K && n > 0 && (n + kPanel - 1) / kPanel == NB, "panel_linear: input ", x.sizes(),
              " does not fit a packed weight ", packed.sizes(), " of ", n, " outputs");
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t R = x2.size(0);
  at::Tensor out = at::empty({R, n}, x.options());
  by_storage(packed.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    panel_products(x2.const_data_ptr<float>(), R, K, static_cast<const T*>(packed.const_data_ptr()), NB, n,
                   out.mutable_data_ptr<float>());
  });
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return out.view(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bitdance, m) {  // the namespace also holds ops defined in Python
  m.def(PANEL_OP("panel_pack") "(Tensor w) -> Tensor");
  m.def(PANEL_OP("panel_linear") "(Tensor x, Tensor packed, int n) -> Tensor");
}
TORCH_LIBRARY_IMPL(bitdance, CPU, m) {
  m.impl(PANEL_OP("panel_pack"), &panel_pack);
  m.impl(PANEL_OP("panel_linear"), &panel_linear);
}
