// fp32 attention of a few queries over a KV cache, for x86 CPUs with AVX2 and FMA (bitdance.kernels).
//
// One call per layer of a compiled decode step: it writes the block's keys and values into the layer's cache
// and attends its queries over everything cached so far, with no mask (every cached position is visible: the
// dense case of bitdance.models.transformer.KVCache). Per (sequence, head) pair the cached keys are read once
// per query, then the values; the values' rows are prefetched while the keys are read, and the keys a few
// rows ahead, so that both reach the core while it computes. torch's fused CPU kernel, made for many
// queries, read a B-1x cache at 15-20 GB/s from memory; this one reads it faster than torch.sum does.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kPrefetchRows = 16;  // keys this many rows ahead (4 KiB at 64 dims); 8 and 32 measured the same

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp for x <= 0 (scores minus their maximum): range reduction by ln 2 in two parts and a degree-6 polynomial
// (the Cephes coefficients), about 1 ulp; inputs below -87.3 give ~1e-38 instead of denormals.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline void prefetch_row(const float* row, int64_t dims) {
  for (int64_t c = 0; c < dims; c += 16) _mm_prefetch(reinterpret_cast<const char*>(row + c), _MM_HINT_T0);
}

// One (sequence, head) pair: n queries (row stride qs) over L cached rows K, V [L][8 C]; output rows of stride os.
template <int C>
void attend(const float* q, int64_t qs, int64_t n, const float* K, const float* V, int64_t L, float scale,
            float* o, int64_t os, std::vector<float>& scores) {
  constexpr int64_t D = 8 * C;
  scores.resize(static_cast<size_t>(L));
  float* s = scores.data();
  for (int64_t i = 0; i < n; ++i) {
    __m256 qv[C];
    for (int c = 0; c < C; ++c) qv[c] = _mm256_mul_ps(_mm256_loadu_ps(q + i * qs + 8 * c), _mm256_set1_ps(scale));
    float top = -INFINITY;
    int64_t j = 0;
    for (; j + 2 <= L; j += 2) {  // two rows at a time: two independent chains of FMAs
      const float* k0 = K + j * D;
      prefetch_row(k0 + kPrefetchRows * D, 2 * D);
      if (i == 0) prefetch_row(V + j * D, 2 * D);
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      for (int c = 0; c < C; ++c) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(k0 + 8 * c), qv[c], a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(k0 + D + 8 * c), qv[c], a1);
      }
      s[j] = hsum(a0);
      s[j + 1] = hsum(a1);
      top = std::max(top, std::max(s[j], s[j + 1]));
    }
    for (; j < L; ++j) {
      __m256 a0 = _mm256_setzero_ps();
      for (int c = 0; c < C; ++c) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(K + j * D + 8 * c), qv[c], a0);
      s[j] = hsum(a0);
      top = std::max(top, s[j]);
    }
    const __m256 vtop = _mm256_set1_ps(top);
    __m256 total = _mm256_setzero_ps();
    for (j = 0; j + 8 <= L; j += 8) {
      __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j), vtop));
      _mm256_storeu_ps(s + j, e);
      total = _mm256_add_ps(total, e);
    }
    float sum = hsum(total);
    for (; j < L; ++j) {
      s[j] = std::exp(s[j] - top);
      sum += s[j];
    }
    __m256 acc[C];
    for (int c = 0; c < C; ++c) acc[c] = _mm256_setzero_ps();
    for (j = 0; j < L; ++j) {
      const __m256 p = _mm256_set1_ps(s[j]);
      for (int c = 0; c < C; ++c) acc[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(V + j * D + 8 * c), acc[c]);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / sum);
    for (int c = 0; c < C; ++c) _mm256_storeu_ps(o + i * os + 8 * c, _mm256_mul_ps(acc[c], inv));
  }
}

// q, k, v: (B, H, n, D), any strides; cache_k, cache_v: (layers, B, H, max_len, D), contiguous; positions: the
// block's n positions (int64, consecutive; only the first is read). Returns (B, H, n, D) laid out as q.
at::Tensor kv_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cache_k,
                        const at::Tensor& cache_v, int64_t layer, const at::Tensor& positions) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "kv_attention: q, k and v must be (batch, heads, queries, dims) of one shape");
  for (const at::Tensor* t : {&q, &k, &v, &cache_k, &cache_v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "kv_attention: fp32 CPU tensors only");
  const int64_t B = q.size(0), H = q.size(1), n = q.size(2), D = q.size(3);
  TORCH_CHECK(D == 32 || D == 64 || D == 128, "kv_attention: head dims 32, 64 or 128, got ", D);
  TORCH_CHECK(cache_k.dim() == 5 && cache_k.sizes() == cache_v.sizes() && cache_k.is_contiguous() &&
                  cache_v.is_contiguous() && cache_k.size(1) == B && cache_k.size(2) == H && cache_k.size(4) == D,
              "kv_attention: the caches must be contiguous (layers, ", B, ", ", H, ", max_len, ", D, ")");
  TORCH_CHECK(layer >= 0 && layer < cache_k.size(0), "kv_attention: layer ", layer, " out of range");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() >= 1 && positions.device().is_cpu(),
              "kv_attention: positions must be a CPU int64 tensor");
  const int64_t max_len = cache_k.size(3);
  const int64_t start = positions.contiguous().data_ptr<int64_t>()[0], end = start + n;
  TORCH_CHECK(start >= 0 && end <= max_len, "kv_attention: positions ", start, "..", end - 1,
              " outside the cache of ", max_len);

  TORCH_CHECK(q.stride(3) == 1, "kv_attention: q's last dimension must be contiguous");
  at::Tensor out = at::empty_like(q);
  TORCH_CHECK(out.stride(3) == 1, "kv_attention: q must be laid out densely");
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t pair_size = max_len * D;
  float* ck = cache_k.data_ptr<float>() + layer * B * H * pair_size;
  float* cv = cache_v.data_ptr<float>() + layer * B * H * pair_size;
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const auto qst = q.strides(), kst = k.strides(), vst = v.strides(), ost = out.strides();
  at::parallel_for(0, B * H, 1, [&](int64_t p0, int64_t p1) {
    thread_local std::vector<float> scores;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / H, h = p % H;
      float* K = ck + p * pair_size;
      float* V = cv + p * pair_size;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t d = 0; d < D; ++d) {
          K[(start + i) * D + d] = kp[b * kst[0] + h * kst[1] + i * kst[2] + d * kst[3]];
          V[(start + i) * D + d] = vp[b * vst[0] + h * vst[1] + i * vst[2] + d * vst[3]];
        }
      const float* qa = qp + b * qst[0] + h * qst[1];
      float* oa = op + b * ost[0] + h * ost[1];
      if (D == 32) attend<4>(qa, qst[2], n, K, V, end, scale, oa, ost[2], scores);
      else if (D == 64) attend<8>(qa, qst[2], n, K, V, end, scale, oa, ost[2], scores);
      else attend<16>(qa, qst[2], n, K, V, end, scale, oa, ost[2], scores);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bitdance, m) {
  m.def("kv_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) cache_k, Tensor(b!) cache_v, int layer, "
        "Tensor positions) -> Tensor");
}

TORCH_LIBRARY_IMPL(bitdance, CPU, m) { m.impl("kv_attention", &kv_attention); }
