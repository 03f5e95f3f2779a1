// Shared by the C++ kernels of patchbay_kernels (compiled together, see patchbay_kernels/cpp.py):
// torch's stable C ABI headers, and 16-float vectors in GCC/clang vector extensions with the
// float32 / bfloat16 loads and stores every kernel uses. Everything here is inline.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace patchbay {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;
using bf16 = uint16_t;  // raw bits; float32 is the top half

// Float vectors in GCC/clang vector extensions, one register of the widest ISA compiled for
// (-march=native): 16 floats with AVX-512, 8 with AVX2, 4 otherwise. Not wider: GCC keeps a generic
// vector wider than the machine's registers in memory (a 64-byte vector on an AVX2 machine goes
// through the stack and general registers at every operation: the kernels ran 3-4x slower there).
#if defined(__AVX512F__)
#define PATCHBAY_VEC_BYTES 64
#elif defined(__AVX__)
#define PATCHBAY_VEC_BYTES 32
#else
#define PATCHBAY_VEC_BYTES 16
#endif
typedef float vf __attribute__((vector_size(PATCHBAY_VEC_BYTES)));
typedef int32_t vi __attribute__((vector_size(PATCHBAY_VEC_BYTES)));
typedef uint32_t vu __attribute__((vector_size(PATCHBAY_VEC_BYTES)));
typedef uint16_t vh __attribute__((vector_size(PATCHBAY_VEC_BYTES / 2)));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
constexpr int64_t W = PATCHBAY_VEC_BYTES / 4;  // floats per vf (head dims are multiples of 16: of every W)

inline float load(float x) { return x; }
inline float load(bf16 x) {
  uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf loadv(const bf16* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}
inline void storev(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline void store(float* p, float x) { *p = x; }
inline void store(bf16* p, float x) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &x, 4);
  *p = std::isnan(x) ? bf16(0x7fc0) : bf16((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// float32 -> bfloat16 bits, lanewise, rounded to nearest even (NaN -> 0x7fc0), as torch rounds.
inline vu bf16_bits(vf v) {
  vu u;
  std::memcpy(&u, &v, sizeof u);
  const vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return v != v ? vu{} + 0x7fc0u : r;
}
inline void storev(bf16* p, vf v) {
  const vh h = __builtin_convertvector(bf16_bits(v), vh);
  std::memcpy(p, &h, sizeof h);
}
// v rounded as a T holds it (float32: unchanged)
template <typename T>
inline vf roundv(vf v) {
  if constexpr (sizeof(T) == sizeof(bf16)) return (vf)(bf16_bits(v) << 16);
  return v;
}

inline float hsum(vf v) {
#if PATCHBAY_VEC_BYTES == 64
  vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
          __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
#elif PATCHBAY_VEC_BYTES == 32
  vf4 b = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
#else
  vf4 b = v;
#endif
  return (b[0] + b[2]) + (b[1] + b[3]);
}

inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// e^x for x <= 0, lanewise (Cephes expf: Cody-Waite reduction, degree-5 polynomial, ~1 ulp).
inline vf exp_neg(vf x) {
  const vf magic = vf{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  x = vmax(x, vf{} - 87.0f);
  vf t = x * 1.44269504088896341f + magic;
  vf n = t - magic;
  vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = 1.9875691500e-4f + vf{};
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * (vf)(((vi)t - 0x4B400000 + 127) << 23);
}

// Run fn(begin, end) over rows [0, n), on torch's threads when the work (n * row_cost
// elements) is large enough to pay for waking them.
template <typename F>
void for_rows(int64_t n, int64_t row_cost, const F& fn) {
  constexpr int64_t kMinWork = 1 << 15;
  const int64_t threads = std::max<int64_t>(1, torch::stable::get_num_threads());
  if (threads == 1 || n < 2 || n * row_cost < 2 * kMinWork) {
    fn(int64_t(0), n);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, row_cost));
  torch::stable::parallel_for(0, n, grain, fn);
}

}  // namespace patchbay
