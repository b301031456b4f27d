// lmforge's int4 x int8 matmul for x86 CPUs with AVX512-VNNI (built on first use by int4_cpu.py).
//
// y = x w^T with w = s (q - z) per (output row, 32-input block), q 4-bit codes. Each row of x is
// quantised to int8 per 32-input block (xq = round(x / d), d = max|x| / 127), so a block's dot product
// is integer: sum_i q_i xq_i, one VPDPBUSD (unsigned byte x signed byte -> int32) per 4 inputs of 16
// output rows. Then y += d * (s * dot + m * sum_i xq_i), with m = -s z: symmetric weights (z = 8)
// store only s, asymmetric ones also m. Memory-bound at decode, so the layout is one sequential stream:
//
//   packed [out / 16, in / 32, block]: per tile of 16 output rows and 32-input block, 4 x 64 bytes of
//   codes (byte 4r + i of the j-th 64: low nibble q[r, 8j + i], high nibble q[r, 8j + 4 + i]), then the
//   16 rows' fp16 scales s (32 bytes), then (asymmetric only) their fp16 m (32 bytes).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cstdint>

#define AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,f16c,fma")))

namespace {

constexpr int64_t kCodeBytes = 256;   // 16 rows x 32 inputs x 4 bits

// R rows of x against one tile of 16 output rows: y[r, 0:16].
template <int R, bool Asym>
AVX512_VNNI void tile(const uint8_t* w, int64_t block_bytes, const int8_t* xq, const float* xd, const int32_t* xsum,
                      int64_t in, float* y, int64_t ldy) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const int64_t blocks = in / 32;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* wb = w + b * block_bytes;
    for (int64_t line = 0; line < block_bytes; line += 64)   // the next blocks, while this one computes
      _mm_prefetch(reinterpret_cast<const char*>(wb + 4 * block_bytes + line), _MM_HINT_T0);
    __m512i lo_dot[R], hi_dot[R];   // two independent accumulation chains per row
    for (int r = 0; r < R; ++r) lo_dot[r] = hi_dot[r] = _mm512_setzero_si512();
    for (int j = 0; j < 4; ++j) {
      const __m512i codes = _mm512_loadu_si512(wb + 64 * j);
      const __m512i lo = _mm512_and_si512(codes, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(codes, 4), nibble);
      for (int r = 0; r < R; ++r) {
        const int32_t* xb = reinterpret_cast<const int32_t*>(xq + r * in + 32 * b);
        lo_dot[r] = _mm512_dpbusd_epi32(lo_dot[r], lo, _mm512_set1_epi32(xb[2 * j]));
        hi_dot[r] = _mm512_dpbusd_epi32(hi_dot[r], hi, _mm512_set1_epi32(xb[2 * j + 1]));
      }
    }
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + kCodeBytes)));
    for (int r = 0; r < R; ++r) {
      __m512i dot = _mm512_add_epi32(lo_dot[r], hi_dot[r]);
      const __m512 d = _mm512_set1_ps(xd[r * blocks + b]);
      if constexpr (Asym) {
        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + kCodeBytes + 32)));
        const __m512 sum = _mm512_set1_ps(static_cast<float>(xsum[r * blocks + b]));
        acc[r] = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, _mm512_mul_ps(m, sum)), d, acc[r]);
      } else {   // z = 8: sum (q - 8) xq, exactly, in integers
        dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(8 * xsum[r * blocks + b]));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s, d), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * ldy, acc[r]);
}

// Rows of x (float32, n_blocks x 32 values in all) -> int8 codes, per-block scales and code sums.
AVX512_VNNI void quantize_activations(const float* x, int64_t n_blocks, int8_t* xq, float* xd, int32_t* xsum) {
  for (int64_t i = 0; i < n_blocks; ++i) {
    const __m512 v0 = _mm512_loadu_ps(x + 32 * i), v1 = _mm512_loadu_ps(x + 32 * i + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float d = amax / 127.f;
    const __m512 inv = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + 32 * i), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + 32 * i + 16), _mm512_cvtepi32_epi8(q1));
    xd[i] = d;
    xsum[i] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  }
}

template <bool Asym>
void run_tiles(const uint8_t* w, int64_t block_bytes, const int8_t* xq, const float* xd, const int32_t* xsum,
               int64_t rows, int64_t in, int64_t out, float* y) {
  const int64_t blocks = in / 32, tile_bytes = blocks * block_bytes;
  at::parallel_for(0, out / 16, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* wt = w + t * tile_bytes;
      auto call = [&](auto rows_here, int64_t r) {
        tile<decltype(rows_here)::value, Asym>(wt, block_bytes, xq + r * in, xd + r * blocks, xsum + r * blocks, in,
                                               y + r * out + 16 * t, out);
      };
      int64_t r = 0;   // four rows of x per pass over the tile's codes
      for (; r + 4 <= rows; r += 4) call(std::integral_constant<int, 4>{}, r);
      switch (rows - r) {
        case 3: call(std::integral_constant<int, 3>{}, r); break;
        case 2: call(std::integral_constant<int, 2>{}, r); break;
        case 1: call(std::integral_constant<int, 1>{}, r); break;
      }
    }
  });
}

at::Tensor mm(const at::Tensor& x, const at::Tensor& packed, int64_t out_features, bool asym) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) % 32 == 0,
              "int4 kernel: x must be float32 [rows, in] with in a multiple of 32");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && out_features % 16 == 0,
              "int4 kernel: packed must be contiguous uint8 and out_features a multiple of 16");
  const int64_t rows = x.size(0), in = x.size(1), blocks = in / 32;
  const int64_t block_bytes = kCodeBytes + (asym ? 64 : 32);
  TORCH_CHECK(packed.numel() == out_features / 16 * blocks * block_bytes, "int4 kernel: packed has the wrong size");
  const at::Tensor xc = x.contiguous();
  at::Tensor scratch = at::empty({rows * (in + 8 * blocks)}, x.options().dtype(at::kChar));
  int8_t* xq = scratch.data_ptr<int8_t>();
  float* xd = reinterpret_cast<float*>(xq + rows * in);
  int32_t* xsum = reinterpret_cast<int32_t*>(xd + rows * blocks);
  quantize_activations(xc.data_ptr<float>(), rows * blocks, xq, xd, xsum);
  at::Tensor y = at::empty({rows, out_features}, x.options());
  if (asym)
    run_tiles<true>(packed.data_ptr<uint8_t>(), block_bytes, xq, xd, xsum, rows, in, out_features, y.data_ptr<float>());
  else
    run_tiles<false>(packed.data_ptr<uint8_t>(), block_bytes, xq, xd, xsum, rows, in, out_features, y.data_ptr<float>());
  return y;
}

bool supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("fma");
}

}  // namespace

TORCH_LIBRARY(lmforge_int4, m) {
  m.def("mm(Tensor x, Tensor packed, int out_features, bool asym) -> Tensor");
  m.def("supported() -> bool", &supported);
}
TORCH_LIBRARY_IMPL(lmforge_int4, CPU, m) { m.impl("mm", &mm); }
