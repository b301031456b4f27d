// lmforge's int4 x int8 matmul for x86 CPUs: AVX512-VNNI, or AVX2 where that is missing (built on first use
// by int4_cpu.py).
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
//
// The AVX2 path reads the same layout, each 64 bytes as two halves of 8 rows, with VPMADDUBSW + VPMADDWD
// in place of VPDPBUSD; both paths give bit-identical results (same integer sums, same float order).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>

#define AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,f16c,fma")))
#define AVX2 __attribute__((target("avx2,f16c,fma")))

namespace {

int64_t supported_isa() {
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("fma"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma")) return 1;
  return 0;
}

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

template <int R, bool Asym>
AVX2 void tile_avx2(const uint8_t* w, int64_t block_bytes, const int8_t* xq, const float* xd, const int32_t* xsum,
                    int64_t in, float* y, int64_t ldy) {
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int64_t blocks = in / 32;
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* wb = w + b * block_bytes;
    for (int64_t line = 0; line < block_bytes; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(wb + 4 * block_bytes + line), _MM_HINT_T0);
    // the block's 32 products per row summed in int16 lanes: a VPMADDUBSW lane is two code x activation
    // products, |.| <= 2 * 15 * 127, and 8 of them per lane stay below 2^15 (one VPMADDWD per block)
    __m256i dot[R][2];
    for (int r = 0; r < R; ++r) dot[r][0] = dot[r][1] = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * j));
      const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * j + 32));
      const __m256i lo0 = _mm256_and_si256(c0, nibble), hi0 = _mm256_and_si256(_mm256_srli_epi16(c0, 4), nibble);
      const __m256i lo1 = _mm256_and_si256(c1, nibble), hi1 = _mm256_and_si256(_mm256_srli_epi16(c1, 4), nibble);
      for (int r = 0; r < R; ++r) {
        const int32_t* xb = reinterpret_cast<const int32_t*>(xq + r * in + 32 * b);
        const __m256i x0 = _mm256_set1_epi32(xb[2 * j]), x1 = _mm256_set1_epi32(xb[2 * j + 1]);
        dot[r][0] = _mm256_add_epi16(dot[r][0], _mm256_add_epi16(_mm256_maddubs_epi16(lo0, x0), _mm256_maddubs_epi16(hi0, x1)));
        dot[r][1] = _mm256_add_epi16(dot[r][1], _mm256_add_epi16(_mm256_maddubs_epi16(lo1, x0), _mm256_maddubs_epi16(hi1, x1)));
        // keep the sums in registers: left alone, GCC reorders the integer adds, computes all the
        // products first and spills them to the stack
        asm("" : "+x"(dot[r][0]), "+x"(dot[r][1]));
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + kCodeBytes + 16 * h)));
      for (int r = 0; r < R; ++r) {
        const __m256i dot32 = _mm256_madd_epi16(dot[r][h], ones);
        const __m256 d = _mm256_set1_ps(xd[r * blocks + b]);
        if constexpr (Asym) {
          const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + kCodeBytes + 32 + 16 * h)));
          const __m256 sum = _mm256_set1_ps(static_cast<float>(xsum[r * blocks + b]));
          acc[r][h] = _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32), s, _mm256_mul_ps(m, sum)), d, acc[r][h]);
        } else {
          const __m256i centred = _mm256_sub_epi32(dot32, _mm256_set1_epi32(8 * xsum[r * blocks + b]));
          acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(centred), _mm256_mul_ps(s, d), acc[r][h]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(y + r * ldy + 8 * h, acc[r][h]);
}

// The AVX512 quantiser's arithmetic in scalar code (x * (1 / d), rounded to nearest even): the same codes.
void quantize_activations_scalar(const float* x, int64_t n_blocks, int8_t* xq, float* xd, int32_t* xsum) {
  for (int64_t i = 0; i < n_blocks; ++i) {
    const float* block = x + 32 * i;
    float amax = 0.f;
    for (int k = 0; k < 32; ++k) amax = std::max(amax, std::fabs(block[k]));
    const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    int32_t sum = 0;
    for (int k = 0; k < 32; ++k) {
      const int32_t q = static_cast<int32_t>(std::nearbyint(block[k] * inv));
      xq[32 * i + k] = static_cast<int8_t>(q);
      sum += q;
    }
    xd[i] = d;
    xsum[i] = sum;
  }
}

using TileFn = void (*)(const uint8_t*, int64_t, const int8_t*, const float*, const int32_t*, int64_t, float*, int64_t);
// [rows of x per pass] -> tile function; one pass over a tile's codes serves up to 4 rows
template <bool Asym>
constexpr TileFn kAvx512Tiles[5] = {nullptr, tile<1, Asym>, tile<2, Asym>, tile<3, Asym>, tile<4, Asym>};
template <bool Asym>
constexpr TileFn kAvx2Tiles[5] = {nullptr, tile_avx2<1, Asym>, tile_avx2<2, Asym>, tile_avx2<3, Asym>,
                                  tile_avx2<4, Asym>};

void run_tiles(const TileFn* tiles, const uint8_t* w, int64_t block_bytes, const int8_t* xq, const float* xd,
               const int32_t* xsum, int64_t rows, int64_t in, int64_t out, float* y) {
  const int64_t blocks = in / 32, tile_bytes = blocks * block_bytes;
  at::parallel_for(0, out / 16, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t r = 0; r < rows; r += 4) {
        const TileFn fn = tiles[std::min<int64_t>(4, rows - r)];
        fn(w + t * tile_bytes, block_bytes, xq + r * in, xd + r * blocks, xsum + r * blocks, in, y + r * out + 16 * t, out);
      }
    }
  });
}

// isa: 2 = AVX512-VNNI, 1 = AVX2 (supported_isa() says what this CPU runs)
at::Tensor mm(const at::Tensor& x, const at::Tensor& packed, int64_t out_features, bool asym, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) % 32 == 0,
              "int4 kernel: x must be float32 [rows, in] with in a multiple of 32");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && out_features % 16 == 0,
              "int4 kernel: packed must be contiguous uint8 and out_features a multiple of 16");
  const int64_t rows = x.size(0), in = x.size(1), blocks = in / 32;
  const int64_t block_bytes = kCodeBytes + (asym ? 64 : 32);
  TORCH_CHECK(packed.numel() == out_features / 16 * blocks * block_bytes, "int4 kernel: packed has the wrong size");
  TORCH_CHECK(isa >= 1 && isa <= supported_isa(), "int4 kernel: instruction set ", isa, " is not available here");
  const at::Tensor xc = x.contiguous();
  at::Tensor scratch = at::empty({rows * (in + 8 * blocks)}, x.options().dtype(at::kChar));
  int8_t* xq = scratch.data_ptr<int8_t>();
  float* xd = reinterpret_cast<float*>(xq + rows * in);
  int32_t* xsum = reinterpret_cast<int32_t*>(xd + rows * blocks);
  (isa == 2 ? quantize_activations : quantize_activations_scalar)(xc.data_ptr<float>(), rows * blocks, xq, xd, xsum);
  at::Tensor y = at::empty({rows, out_features}, x.options());
  const TileFn* tiles = isa == 2 ? (asym ? kAvx512Tiles<true> : kAvx512Tiles<false>)
                                 : (asym ? kAvx2Tiles<true> : kAvx2Tiles<false>);
  run_tiles(tiles, packed.data_ptr<uint8_t>(), block_bytes, xq, xd, xsum, rows, in, out_features, y.data_ptr<float>());
  return y;
}

}  // namespace

TORCH_LIBRARY(lmforge_int4, m) {
  m.def("mm(Tensor x, Tensor packed, int out_features, bool asym, int isa) -> Tensor");
  m.def("supported_isa() -> int", &supported_isa);
}
TORCH_LIBRARY_IMPL(lmforge_int4, CPU, m) { m.impl("mm", &mm); }
