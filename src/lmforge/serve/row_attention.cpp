// Batch-invariant attention for decode rows on CPU (built on first use by model/cpu_kernels.py).
//
// Each row (one new token of a sequence) attends over exactly its own keys, slots keys[r, 0..len_r) of
// the paged cache, in key order, with a fixed summation order over head_dim. Nothing it computes depends
// on the other rows of the batch or on the padding of keys[r], so a token gets the same bits decoded
// alone, in a batch of streams, or as one of the rows that verify a speculative draft. SDPA over a padded,
// masked batch does not: its reductions are blocked by the padded width, which moves the last bits, and a
// quantised model (whose activations are rounded again in every layer) turns those into different tokens.
//
// q [rows, H, D], k and v [slots, Hkv, D] (a layer of the paged cache), keys [rows, width] (int64 slots),
// lengths [rows] (keys each row sees, 1..width) -> out [rows, H, D]. float32 throughout; scale 1/sqrt(D).
// An AVX2 + FMA path (head_dim a multiple of 8) and a portable one; either gives each row fixed bits.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;   // independent partial sums: a fixed order the compiler can vectorise

float dot(const float* a, const float* b, int64_t n) {
  float part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) part[l] += a[i + l] * b[i + l];
  for (int64_t l = 0; i < n; ++i, ++l) part[l] += a[i] * b[i];
  for (int64_t width = kLanes / 2; width > 0; width /= 2)   // pairwise, always the same tree
    for (int64_t l = 0; l < width; ++l) part[l] += part[l + width];
  return part[0];
}

// One row and one KV head: its group of query heads share each key and value read.
void attend_group(const float* q, const float* k, const float* v, const int64_t* slots, int64_t len,
                  int64_t kv_heads, int64_t group, int64_t d, int64_t kv_head, float scale, float* out) {
  std::vector<float> p(group * len), acc(group * d, 0.f);
  for (int64_t j = 0; j < len; ++j) {
    const float* kj = k + (slots[j] * kv_heads + kv_head) * d;
    for (int64_t h = 0; h < group; ++h) p[h * len + j] = dot(q + h * d, kj, d) * scale;
  }
  for (int64_t h = 0; h < group; ++h) {
    float* ph = p.data() + h * len;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < len; ++j) top = std::max(top, ph[j]);
    float total = 0.f;
    for (int64_t j = 0; j < len; ++j) total += (ph[j] = std::exp(ph[j] - top));
    for (int64_t j = 0; j < len; ++j) ph[j] /= total;
  }
  for (int64_t j = 0; j < len; ++j) {
    const float* vj = v + (slots[j] * kv_heads + kv_head) * d;
    for (int64_t h = 0; h < group; ++h) {
      const float w = p[h * len + j];
      float* a = acc.data() + h * d;
      for (int64_t i = 0; i < d; ++i) a[i] += w * vj[i];
    }
  }
  std::copy(acc.begin(), acc.end(), out);
}

#define AVX2 __attribute__((target("avx2,fma")))

// e^x for x <= 0 (softmax arguments): x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial
// (error < 2e-7 relative), times 2^n built in the exponent bits; below -87 (and -inf) gives 0.
AVX2 __m256 exp_nonpositive(__m256 x) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);     // ln2 in two parts: exact n * hi
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 poly = _mm256_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(c));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 out = _mm256_mul_ps(poly, _mm256_castsi256_ps(bits));
  return _mm256_and_ps(out, _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_GE_OQ));
}

AVX2 float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// out[0, 8N) = inv * sum_j w[j] v[slots[j]][0, 8N), in key order: N registers of the output, in registers.
template <int N>
AVX2 void weighted_sum(const float* w, const float* v, const int64_t* slots, int64_t len, int64_t stride, float inv,
                       float* out) {
  __m256 acc[N];
  for (int u = 0; u < N; ++u) acc[u] = _mm256_setzero_ps();
  for (int64_t j = 0; j < len; ++j) {
    const __m256 wj = _mm256_set1_ps(w[j]);
    const float* vj = v + slots[j] * stride;
    for (int u = 0; u < N; ++u) acc[u] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(vj + 8 * u), acc[u]);
  }
  for (int u = 0; u < N; ++u) _mm256_storeu_ps(out + 8 * u, _mm256_mul_ps(acc[u], _mm256_set1_ps(inv)));
}

// The same as attend_group, 8 floats at a time (d a multiple of 8). Scores: four keys per pass, one
// accumulator each (a short key list is padded with key 0, whose scores are reset to -inf), so a score's bits
// depend only on q and its key. Softmax: 8 lanes of partial sums, padded with e^-inf = 0.
AVX2 void attend_group_avx2(const float* q, const float* k, const float* v, const int64_t* slots, int64_t len,
                            int64_t kv_heads, int64_t group, int64_t d, int64_t kv_head, float scale, float* out) {
  const int64_t padded = (len + 7) / 8 * 8;
  std::vector<float> p(group * padded, -std::numeric_limits<float>::infinity());
  const int64_t stride = kv_heads * d;
  for (int64_t j = 0; j < len; j += 4) {
    const float* kj[4];
    for (int u = 0; u < 4; ++u) kj[u] = k + slots[j + u < len ? j + u : 0] * stride + kv_head * d;
    for (int64_t h = 0; h < group; ++h) {
      __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t i = 0; i < d; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + h * d + i);
        for (int u = 0; u < 4; ++u) a[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kj[u] + i), a[u]);
      }
      // the four keys' sums at once: pairs of lanes, then quads, then the two halves
      const __m256 quads = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
      const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(quads), _mm256_extractf128_ps(quads, 1));
      _mm_storeu_ps(p.data() + h * padded + j, _mm_mul_ps(sums, _mm_set1_ps(scale)));
    }
  }
  for (int64_t h = 0; h < group; ++h)   // the padding keys' scores (key 0's) back to -inf
    std::fill(p.begin() + h * padded + len, p.begin() + (h + 1) * padded, -std::numeric_limits<float>::infinity());
  for (int64_t h = 0; h < group; ++h) {
    float* ph = p.data() + h * padded;
    const float top = *std::max_element(ph, ph + len);
    __m256 total = _mm256_setzero_ps();
    for (int64_t j = 0; j < padded; j += 8) {
      const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(ph + j), _mm256_set1_ps(top)));
      _mm256_storeu_ps(ph + j, e);
      total = _mm256_add_ps(total, e);
    }
    const float inv = 1.f / sum8(total);
    // each output lane sums its values in key order, whichever of these loops computes it
    int64_t i = 0;
    for (; i + 64 <= d; i += 64) weighted_sum<8>(ph, v + kv_head * d + i, slots, len, stride, inv, out + h * d + i);
    for (; i < d; i += 8) weighted_sum<1>(ph, v + kv_head * d + i, slots, len, stride, inv, out + h * d + i);
  }
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& keys,
                     const at::Tensor& lengths) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes(), "row attention: q [rows, H, D], k/v [slots, Hkv, D]");
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "row attention: q, k, v must be contiguous float32");
  const int64_t rows = q.size(0), heads = q.size(1), d = q.size(2), kv_heads = k.size(1);
  TORCH_CHECK(k.size(2) == d && heads % kv_heads == 0, "row attention: head sizes do not match");
  TORCH_CHECK(keys.scalar_type() == at::kLong && keys.dim() == 2 && keys.size(0) == rows && keys.is_contiguous() &&
              lengths.scalar_type() == at::kLong && lengths.numel() == rows && lengths.is_contiguous(),
              "row attention: keys int64 [rows, width], lengths int64 [rows]");
  const int64_t width = keys.size(1), group = heads / kv_heads, n_slots = k.size(0);
  const int64_t* lens = lengths.data_ptr<int64_t>();
  const int64_t* kx = keys.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {   // checked here, once, so the kernels read only valid slots
    TORCH_CHECK(lens[r] >= 1 && lens[r] <= width, "row attention: row ", r, " sees ", lens[r], " of ", width, " keys");
    for (int64_t j = 0; j < lens[r]; ++j) {
      const int64_t slot = kx[r * width + j];
      TORCH_CHECK(slot >= 0 && slot < n_slots, "row attention: key slot ", slot, " is outside the cache");
    }
  }
  at::Tensor out = at::empty_like(q);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const bool avx2 = d % 8 == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, g = task % kv_heads;
      const int64_t offset = (r * heads + g * group) * d;
      (avx2 ? attend_group_avx2 : attend_group)(qp + offset, kp, vp, kx + r * width, lens[r], kv_heads, group, d, g,
                                                 scale, op + offset);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(lmforge_rows, m) { m.def("attention(Tensor q, Tensor k, Tensor v, Tensor keys, Tensor lengths) -> Tensor"); }
TORCH_LIBRARY_IMPL(lmforge_rows, CPU, m) { m.impl("attention", &attention); }
