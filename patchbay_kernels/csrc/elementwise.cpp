// Fused row-wise CPU kernels of patchbay_kernels (norm.py, activation.py, rotary.py), compiled
// with paged_attention.cpp on first use. Each replaces a chain of small torch ops whose per-op
// cost dominates a decode step, and rounds exactly where its torch reference rounds:
// float32 math inside, one rounding to the tensor dtype wherever the reference casts back.
//
// patchbay::rms_norm(x, weight, eps, out)
//   x [N, D] or [N, H, D] (last dim contiguous), out contiguous of x's shape.
//   float32: x * rsqrt(mean(x^2) + eps) * w; bfloat16: w * bf16(x * rsqrt(...)), as transformers.
// patchbay::add_rms_norm(x, residual, weight, eps)
//   In place, both [N, D] contiguous: residual <- x + residual (rounded to the dtype),
//   x <- rms_norm(residual).
// patchbay::silu_and_mul(x, out)
//   x [N, 2d] (rows contiguous), out [N, d] contiguous: silu(x[:, :d]) * x[:, d:], each product
//   term rounded to the dtype as F.silu(gate).mul_(up) rounds.
// patchbay::rope_qkv(qkv, positions, cos, sin, q_norm?, k_norm?, eps, k_cache, v_cache, slots, q_out, k_out?)
//   From the fused projection qkv [T, (Hq + 2 Hkv) D] (rows contiguous): optional per-head
//   RMSNorm of q and k (Qwen3), rotary embedding of q and k (rotate-half layout; cos/sin
//   [P, D/2] float32 tables indexed by positions [T] int64), q into q_out [T, Hq, D], k and v
//   written into the paged caches [num_blocks, bs, Hkv, D] at slots [T] int64, and k into
//   k_out [T, Hkv, D] when given (prefill attends to its fresh K directly).
#include "vec.h"

#include <optional>
#include <type_traits>

namespace {

using namespace patchbay;

inline float round_to(float x, float*) { return x; }
inline float round_to(float x, bf16*) {
  bf16 h;
  store(&h, x);
  return load(h);
}
// x rounded as a T would hold it
template <typename T>
inline float rnd(float x) {
  return round_to(x, static_cast<T*>(nullptr));
}

template <typename T>
inline float sum_squares(const T* x, int64_t d) {
  vf acc{};
  int64_t i = 0;
  for (; i + W <= d; i += W) {
    const vf v = loadv(x + i);
    acc += v * v;
  }
  float s = hsum(acc);
  for (; i < d; ++i) s += load(x[i]) * load(x[i]);
  return s;
}

template <typename T>
inline float inv_rms(const T* x, int64_t d, float eps) {
  return 1.0f / std::sqrt(sum_squares(x, d) / float(d) + eps);
}

// out[i] = norm(x)[i] * w[i] with the reference's rounding; out may be x.
template <typename T>
inline void norm_row(const T* x, const T* w, float inv, T* out, int64_t d) {
  int64_t i = 0;
  for (; i + W <= d; i += W) {
    if constexpr (std::is_same_v<T, float>)
      storev(out + i, loadv(x + i) * inv * loadv(w + i));
    else
      storev(out + i, loadv(w + i) * roundv<T>(loadv(x + i) * inv));
  }
  for (; i < d; ++i) {
    if constexpr (std::is_same_v<T, float>)
      out[i] = x[i] * inv * w[i];
    else
      store(out + i, load(w[i]) * rnd<T>(load(x[i]) * inv));
  }
}

// ------------------------------------------------------------------ rms_norm

template <typename T>
void rms_norm_impl(const Tensor& x, const Tensor& weight, float eps, Tensor& out) {
  const int64_t d = x.size(x.dim() - 1), inner = x.dim() == 3 ? x.size(1) : 1, n = x.numel() / d;
  const int64_t s0 = x.stride(0), s1 = x.dim() == 3 ? x.stride(1) : 0;
  const T* xp = static_cast<const T*>(x.data_ptr());
  const T* w = static_cast<const T*>(weight.data_ptr());
  T* o = static_cast<T*>(out.data_ptr());
  for_rows(n, d, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* row = xp + (r / inner) * s0 + (r % inner) * s1;
      norm_row(row, w, inv_rms(row, d, eps), o + r * d, d);
    }
  });
}

void rms_norm(Tensor x, Tensor weight, double eps, Tensor out) {
  STD_TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "rms_norm: x must be [N, D] or [N, H, D]");
  const ScalarType dt = x.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::BFloat16, "rms_norm: float32 or bfloat16 only");
  STD_TORCH_CHECK(weight.scalar_type() == dt && out.scalar_type() == dt, "rms_norm: x, weight, out share a dtype");
  STD_TORCH_CHECK(x.is_cpu() && weight.is_cpu() && out.is_cpu(), "rms_norm: CPU tensors only");
  const int64_t d = x.size(x.dim() - 1);
  STD_TORCH_CHECK(x.stride(x.dim() - 1) == 1 && weight.is_contiguous() && weight.numel() == d &&
                      out.is_contiguous() && out.numel() == x.numel(),
                  "rms_norm: x rows contiguous, weight [D], out contiguous of x's size");
  if (x.numel() == 0) return;
  dt == ScalarType::Float ? rms_norm_impl<float>(x, weight, float(eps), out)
                          : rms_norm_impl<bf16>(x, weight, float(eps), out);
}

// ------------------------------------------------------------------ add_rms_norm

template <typename T>
void add_rms_norm_impl(Tensor& x, Tensor& residual, const Tensor& weight, float eps) {
  const int64_t d = x.size(1), n = x.size(0);
  T* xp = static_cast<T*>(x.data_ptr());
  T* rp = static_cast<T*>(residual.data_ptr());
  const T* w = static_cast<const T*>(weight.data_ptr());
  for_rows(n, d, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      T *xr = xp + r * d, *rr = rp + r * d;
      int64_t i = 0;
      for (; i + W <= d; i += W) storev(rr + i, loadv(xr + i) + loadv(rr + i));
      for (; i < d; ++i) store(rr + i, load(xr[i]) + load(rr[i]));
      norm_row(rr, w, inv_rms(rr, d, eps), xr, d);
    }
  });
}

void add_rms_norm(Tensor x, Tensor residual, Tensor weight, double eps) {
  STD_TORCH_CHECK(x.dim() == 2 && residual.dim() == 2, "add_rms_norm: x and residual must be [N, D]");
  const ScalarType dt = x.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::BFloat16, "add_rms_norm: float32 or bfloat16 only");
  STD_TORCH_CHECK(residual.scalar_type() == dt && weight.scalar_type() == dt,
                  "add_rms_norm: x, residual, weight share a dtype");
  STD_TORCH_CHECK(x.is_cpu() && residual.is_cpu() && weight.is_cpu(), "add_rms_norm: CPU tensors only");
  STD_TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous() &&
                      residual.size(0) == x.size(0) && residual.size(1) == x.size(1) && weight.numel() == x.size(1),
                  "add_rms_norm: x, residual contiguous [N, D], weight [D]");
  if (x.numel() == 0) return;
  dt == ScalarType::Float ? add_rms_norm_impl<float>(x, residual, weight, float(eps))
                          : add_rms_norm_impl<bf16>(x, residual, weight, float(eps));
}

// ------------------------------------------------------------------ silu_and_mul

// sigmoid(g) lanewise, from e^-|g| (never overflows)
inline vf sigmoid(vf g) {
  const vf neg = g < 0 ? g : -g;
  const vf e = exp_neg(neg);
  const vf one = vf{} + 1.0f;
  return g >= 0 ? one / (one + e) : e / (one + e);
}

inline float sigmoid(float g) {
  const float e = std::exp(-std::fabs(g));
  return g >= 0 ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

template <typename T>
void silu_and_mul_impl(const Tensor& x, Tensor& out) {
  const int64_t n = x.size(0), d = out.size(1), s0 = x.stride(0);
  const T* xp = static_cast<const T*>(x.data_ptr());
  T* o = static_cast<T*>(out.data_ptr());
  for_rows(n, 2 * d, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T *g = xp + r * s0, *u = g + d;
      T* orow = o + r * d;
      int64_t i = 0;
      for (; i + W <= d; i += W) {
        const vf gv = loadv(g + i);
        storev(orow + i, roundv<T>(gv * sigmoid(gv)) * loadv(u + i));
      }
      for (; i < d; ++i) {
        const float gi = load(g[i]);
        store(orow + i, rnd<T>(gi * sigmoid(gi)) * load(u[i]));
      }
    }
  });
}

void silu_and_mul(Tensor x, Tensor out) {
  STD_TORCH_CHECK(x.dim() == 2 && out.dim() == 2, "silu_and_mul: x [N, 2d], out [N, d]");
  const ScalarType dt = x.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::BFloat16, "silu_and_mul: float32 or bfloat16 only");
  STD_TORCH_CHECK(out.scalar_type() == dt && x.is_cpu() && out.is_cpu(), "silu_and_mul: CPU tensors of one dtype");
  STD_TORCH_CHECK(x.stride(1) == 1 && out.is_contiguous() && out.size(0) == x.size(0) && 2 * out.size(1) == x.size(1),
                  "silu_and_mul: x rows contiguous [N, 2d], out contiguous [N, d]");
  if (out.numel() == 0) return;
  dt == ScalarType::Float ? silu_and_mul_impl<float>(x, out) : silu_and_mul_impl<bf16>(x, out);
}

// ------------------------------------------------------------------ rope_qkv

struct Rope {
  const void* qkv;
  const int64_t* pos;
  const int64_t* slots;
  const float* cos;
  const float* sin;
  const void* qn;  // nullptr: no q/k norm
  const void* kn;
  void* kc;
  void* vc;
  void* q_out;
  void* k_out;  // nullptr: not wanted
  int64_t T, Hq, Hkv, D, s0;
  float eps;
};

// One head row: optional RMSNorm (rounded to T), then rotate-half with this position's
// cos/sin in float32, rounded once into dst.
template <typename T>
inline void rotate_row(const T* src, const T* norm_w, float eps, const float* c, const float* s, int64_t D,
                       float* tmp, T* dst) {
  const int64_t half = D / 2;
  int64_t i = 0;
  if (norm_w != nullptr) {
    const float inv = inv_rms(src, D, eps);
    for (; i + W <= D; i += W) {
      if constexpr (std::is_same_v<T, float>)
        storev(tmp + i, loadv(src + i) * inv * loadv(norm_w + i));
      else
        storev(tmp + i, roundv<T>(loadv(norm_w + i) * roundv<T>(loadv(src + i) * inv)));
    }
    for (; i < D; ++i) {
      if constexpr (std::is_same_v<T, float>)
        tmp[i] = src[i] * inv * norm_w[i];
      else
        tmp[i] = rnd<T>(load(norm_w[i]) * rnd<T>(load(src[i]) * inv));
    }
  } else {
    for (; i + W <= D; i += W) storev(tmp + i, loadv(src + i));
    for (; i < D; ++i) tmp[i] = load(src[i]);
  }
  i = 0;
  for (; i + W <= half; i += W) {
    const vf x1 = loadv(tmp + i), x2 = loadv(tmp + half + i), cv = loadv(c + i), sv = loadv(s + i);
    storev(dst + i, x1 * cv - x2 * sv);
    storev(dst + half + i, x2 * cv + x1 * sv);
  }
  for (; i < half; ++i) {
    const float x1 = tmp[i], x2 = tmp[half + i];
    store(dst + i, x1 * c[i] - x2 * s[i]);
    store(dst + half + i, x2 * c[i] + x1 * s[i]);
  }
}

template <typename T>
void rope_impl(const Rope& a) {
  const int64_t D = a.D, half = D / 2, row = a.Hkv * D;
  for_rows(a.T, (a.Hq + 2 * a.Hkv) * D, [&](int64_t b, int64_t e) {
    float tmp[1024];  // head_dim <= 1024, checked by the caller
    for (int64_t t = b; t < e; ++t) {
      const T* src = static_cast<const T*>(a.qkv) + t * a.s0;
      const float* c = a.cos + a.pos[t] * half;
      const float* s = a.sin + a.pos[t] * half;
      T* q = static_cast<T*>(a.q_out) + t * a.Hq * D;
      for (int64_t h = 0; h < a.Hq; ++h)
        rotate_row(src + h * D, static_cast<const T*>(a.qn), a.eps, c, s, D, tmp, q + h * D);
      T* kc = static_cast<T*>(a.kc) + a.slots[t] * row;
      T* vc = static_cast<T*>(a.vc) + a.slots[t] * row;
      const T* ks = src + a.Hq * D;
      for (int64_t h = 0; h < a.Hkv; ++h)
        rotate_row(ks + h * D, static_cast<const T*>(a.kn), a.eps, c, s, D, tmp, kc + h * D);
      std::memcpy(vc, ks + row, row * sizeof(T));
      if (a.k_out != nullptr) std::memcpy(static_cast<T*>(a.k_out) + t * row, kc, row * sizeof(T));
    }
  });
}

void rope_qkv(Tensor qkv, Tensor positions, Tensor cos, Tensor sin, std::optional<Tensor> q_norm,
              std::optional<Tensor> k_norm, double eps, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor q_out,
              std::optional<Tensor> k_out) {
  STD_TORCH_CHECK(qkv.dim() == 2 && positions.dim() == 1 && cos.dim() == 2 && sin.dim() == 2 && k_cache.dim() == 4 &&
                      v_cache.dim() == 4 && slots.dim() == 1 && q_out.dim() == 3,
                  "rope_qkv: bad ranks");
  const ScalarType dt = qkv.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::BFloat16, "rope_qkv: float32 or bfloat16 only");
  STD_TORCH_CHECK(k_cache.scalar_type() == dt && v_cache.scalar_type() == dt && q_out.scalar_type() == dt,
                  "rope_qkv: qkv, caches and q_out share a dtype");
  STD_TORCH_CHECK(cos.scalar_type() == ScalarType::Float && sin.scalar_type() == ScalarType::Float,
                  "rope_qkv: cos/sin tables are float32");
  STD_TORCH_CHECK(positions.scalar_type() == ScalarType::Long && slots.scalar_type() == ScalarType::Long,
                  "rope_qkv: positions and slots are int64");
  STD_TORCH_CHECK(qkv.is_cpu() && positions.is_cpu() && cos.is_cpu() && sin.is_cpu() && k_cache.is_cpu() &&
                      v_cache.is_cpu() && slots.is_cpu() && q_out.is_cpu(),
                  "rope_qkv: CPU tensors only");
  Rope a{};
  a.T = qkv.size(0), a.Hq = q_out.size(1), a.Hkv = k_cache.size(2), a.D = k_cache.size(3);
  const int64_t D = a.D;
  STD_TORCH_CHECK(D % 2 == 0 && D <= 1024 && a.Hkv > 0, "rope_qkv: head_dim even and at most 1024");
  for (int64_t i = 0; i < 4; ++i) STD_TORCH_CHECK(v_cache.size(i) == k_cache.size(i), "rope_qkv: k/v caches differ");
  STD_TORCH_CHECK(qkv.size(1) == (a.Hq + 2 * a.Hkv) * D && qkv.stride(1) == 1, "rope_qkv: qkv [T, (Hq + 2 Hkv) D]");
  STD_TORCH_CHECK(q_out.is_contiguous() && q_out.size(0) == a.T && q_out.size(2) == D, "rope_qkv: q_out [T, Hq, D]");
  STD_TORCH_CHECK(positions.is_contiguous() && slots.is_contiguous() && positions.size(0) == a.T &&
                      slots.size(0) == a.T,
                  "rope_qkv: positions and slots [T]");
  STD_TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(1) == D / 2 && sin.size(1) == D / 2 &&
                      sin.size(0) == cos.size(0),
                  "rope_qkv: cos/sin [P, D / 2]");
  STD_TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "rope_qkv: caches must be contiguous");
  STD_TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "rope_qkv: q_norm and k_norm come together");
  if (q_norm.has_value()) {
    STD_TORCH_CHECK(q_norm->scalar_type() == dt && k_norm->scalar_type() == dt && q_norm->is_contiguous() &&
                        k_norm->is_contiguous() && q_norm->numel() == D && k_norm->numel() == D,
                    "rope_qkv: q_norm / k_norm [D] of qkv's dtype");
    a.qn = q_norm->data_ptr(), a.kn = k_norm->data_ptr();
  }
  if (k_out.has_value()) {
    STD_TORCH_CHECK(k_out->scalar_type() == dt && k_out->is_contiguous() && k_out->numel() == a.T * a.Hkv * D,
                    "rope_qkv: k_out [T, Hkv, D] contiguous");
    a.k_out = k_out->data_ptr();
  }
  a.pos = static_cast<const int64_t*>(positions.data_ptr());
  a.slots = static_cast<const int64_t*>(slots.data_ptr());
  const int64_t n_pos = cos.size(0), n_slots = k_cache.size(0) * k_cache.size(1);
  for (int64_t t = 0; t < a.T; ++t) {
    STD_TORCH_CHECK(a.pos[t] >= 0 && a.pos[t] < n_pos, "rope_qkv: position ", a.pos[t], " outside the rotary table");
    STD_TORCH_CHECK(a.slots[t] >= 0 && a.slots[t] < n_slots, "rope_qkv: slot ", a.slots[t], " out of range");
  }
  a.qkv = qkv.data_ptr(), a.s0 = qkv.stride(0);
  a.cos = static_cast<const float*>(cos.data_ptr()), a.sin = static_cast<const float*>(sin.data_ptr());
  a.kc = k_cache.data_ptr(), a.vc = v_cache.data_ptr(), a.q_out = q_out.data_ptr();
  a.eps = float(eps);
  if (a.T == 0) return;
  dt == ScalarType::Float ? rope_impl<float>(a) : rope_impl<bf16>(a);
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(patchbay, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");
  m.def("add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("silu_and_mul(Tensor x, Tensor(a!) out) -> ()");
  m.def("rope_qkv(Tensor qkv, Tensor positions, Tensor cos, Tensor sin, Tensor? q_norm, Tensor? k_norm, float eps, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, Tensor(c!) q_out, Tensor(d!)? k_out) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(patchbay, CPU, m) {
  m.impl("rms_norm", TORCH_BOX(&rms_norm));
  m.impl("add_rms_norm", TORCH_BOX(&add_rms_norm));
  m.impl("silu_and_mul", TORCH_BOX(&silu_and_mul));
  m.impl("rope_qkv", TORCH_BOX(&rope_qkv));
}
