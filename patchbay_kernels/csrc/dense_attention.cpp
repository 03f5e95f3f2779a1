// patchbay::dense_decode(q, k, v, scale, out)
//   One query per head against a whole, unmasked, token-major context (an encoder-decoder's
//   cross-attention for a decode row): K and V each read once, front to back, in three passes
//   (all scores, softmax in float32, then p V), with no online-softmax rescaling or block walk.
//   q, out [H, D] float32 or bfloat16 (rows contiguous); k, v [S, H, D] contiguous, q's dtype;
//   D a multiple of 16. Heads are split over torch's threads when the context is long.
#include "vec.h"

#include <vector>

namespace {

using namespace patchbay;

template <typename T>
void heads(const T* q, const T* k, const T* v, T* out, int64_t S, int64_t H, int64_t D, float scale, int64_t h0,
           int64_t h1) {
  const int64_t n = h1 - h0, row = H * D;
  std::vector<float> ws(n * (D + D + S));
  float *qf = ws.data(), *acc = qf + n * D, *s = acc + n * D;  // s: [n, S]
  for (int64_t h = 0; h < n; ++h)
    for (int64_t i = 0; i < D; ++i) qf[h * D + i] = load(q[(h0 + h) * D + i]) * scale;
  for (int64_t t = 0; t < S; ++t) {  // scores, token-major: K rows in memory order
    const T* kt = k + t * row + h0 * D;
    for (int64_t h = 0; h < n; ++h) {
      vf a{};
      for (int64_t i = 0; i < D; i += W) a += loadv(qf + h * D + i) * loadv(kt + h * D + i);
      s[h * S + t] = hsum(a);
    }
  }
  for (int64_t h = 0; h < n; ++h) {  // softmax numerators; the sum divides at the end
    float* sh = s + h * S;
    float mx = -INFINITY;
    for (int64_t t = 0; t < S; ++t) mx = std::max(mx, sh[t]);
    float sum = 0.0f;
    int64_t t = 0;
    for (; t + W <= S; t += W) {
      const vf p = exp_neg(loadv(sh + t) - mx);
      storev(sh + t, p);
      sum += hsum(p);
    }
    for (; t < S; ++t) sum += (sh[t] = std::exp(sh[t] - mx));
    acc[h] = sum;  // (kept in acc's first slots until the p V pass, which starts from zero)
  }
  std::vector<float> sums(acc, acc + n);
  std::fill(acc, acc + n * D, 0.0f);
  for (int64_t t = 0; t < S; ++t) {  // acc += p V, V rows in memory order
    const T* vt = v + t * row + h0 * D;
    for (int64_t h = 0; h < n; ++h) {
      const float p = s[h * S + t];
      float* ah = acc + h * D;
      for (int64_t i = 0; i < D; i += W) storev(ah + i, loadv(ah + i) + p * loadv(vt + h * D + i));
    }
  }
  for (int64_t h = 0; h < n; ++h) {
    const float inv = sums[h] > 0.0f ? 1.0f / sums[h] : 0.0f;
    for (int64_t i = 0; i < D; ++i) store(out + (h0 + h) * D + i, acc[h * D + i] * inv);
  }
}

void dense_decode(Tensor q, Tensor k, Tensor v, double scale, Tensor out) {
  STD_TORCH_CHECK(q.dim() == 2 && out.dim() == 2 && k.dim() == 3 && v.dim() == 3, "dense_decode: bad ranks");
  const ScalarType dt = q.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::BFloat16, "dense_decode: float32 or bfloat16 only");
  STD_TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt && out.scalar_type() == dt,
                  "dense_decode: q, k, v and out must share a dtype");
  STD_TORCH_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu() && out.is_cpu(), "dense_decode: CPU tensors only");
  STD_TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && out.is_contiguous(),
                  "dense_decode: contiguous tensors only");
  const int64_t S = k.size(0), H = k.size(1), D = k.size(2);
  for (int64_t i = 0; i < 3; ++i) STD_TORCH_CHECK(v.size(i) == k.size(i), "dense_decode: k and v differ");
  STD_TORCH_CHECK(q.size(0) == H && q.size(1) == D && out.size(0) == H && out.size(1) == D && D % W == 0 && S > 0,
                  "dense_decode: shapes (head_dim a multiple of 16, a non-empty context)");
  const float sc = float(scale);
  for_rows(H, S * D * 2, [&](int64_t h0, int64_t h1) {
    if (dt == ScalarType::Float)
      heads<float>(static_cast<const float*>(q.data_ptr()), static_cast<const float*>(k.data_ptr()),
                   static_cast<const float*>(v.data_ptr()), static_cast<float*>(out.data_ptr()), S, H, D, sc, h0, h1);
    else
      heads<bf16>(static_cast<const bf16*>(q.data_ptr()), static_cast<const bf16*>(k.data_ptr()),
                  static_cast<const bf16*>(v.data_ptr()), static_cast<bf16*>(out.data_ptr()), S, H, D, sc, h0, h1);
  });
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(patchbay, m) {
  m.def("dense_decode(Tensor q, Tensor k, Tensor v, float scale, Tensor(a!) out) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(patchbay, CPU, m) {
  m.impl("dense_decode", TORCH_BOX(&dense_decode));
}
