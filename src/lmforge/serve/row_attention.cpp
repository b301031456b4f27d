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
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>
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
                  int64_t n_slots, int64_t kv_heads, int64_t group, int64_t d, int64_t kv_head, float scale,
                  float* out) {
  std::vector<float> p(group * len), acc(group * d, 0.f);
  for (int64_t j = 0; j < len; ++j) {
    const int64_t slot = slots[j];
    TORCH_CHECK(slot >= 0 && slot < n_slots, "row attention: key slot ", slot, " is outside the cache");
    const float* kj = k + (slot * kv_heads + kv_head) * d;
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
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(lens[r] >= 1 && lens[r] <= width, "row attention: row ", r, " sees ", lens[r], " of ", width, " keys");
  at::Tensor out = at::empty_like(q);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const int64_t* kx = keys.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, g = task % kv_heads;
      const int64_t offset = (r * heads + g * group) * d;
      attend_group(qp + offset, kp, vp, kx + r * width, lens[r], n_slots, kv_heads, group, d, g, scale, op + offset);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(lmforge_rows, m) { m.def("attention(Tensor q, Tensor k, Tensor v, Tensor keys, Tensor lengths) -> Tensor"); }
TORCH_LIBRARY_IMPL(lmforge_rows, CPU, m) { m.impl("attention", &attention); }
