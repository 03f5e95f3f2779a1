// patchbay::dense_decode(q, k, v, scale, out)
//   One query per head against a whole, unmasked, token-major context (an encoder-decoder's
//   cross-attention for a decode row): K and V each read once, front to back, in three passes
//   (all scores, softmax in float32, then p V), with no online-softmax rescaling or block walk.
//   q, out [H, D] float32 or bfloat16 (rows contiguous); k, v [S, H, D] contiguous, q's dtype;
//   D a multiple of 16. Heads are split over torch's threads when the context is long.
//
// patchbay::cross_decode(q, kv, scale, out)
//   The same for every decode row of a step at once, each row against its own context: q, out
//   [N, H, D]; kv int64 [N, 4] holds, per row, the addresses of its K and V ([S, H, D] contiguous,
//   q's dtype; checked by the Python caller, which keeps them alive) and S. One call per layer
//   instead of one per row. Each row is computed in two halves of its context (each: K then V
//   read once, front to back, every head at once), merged at the end; the halves are shared out
//   over torch's threads, or over this thread and the kernels' helper thread when torch runs on
//   one (helper.h). A row's answer does not depend on the thread count or on the other rows
//   (it may differ from dense_decode's in the last bits: another summation order).
#include "helper.h"
#include "vec.h"

#include <vector>

namespace {

using namespace patchbay;

// One row's tokens [t0, t1) for its heads [h0, h1) (q, k, v: the row's q [H, D] and context
// [S, H, D]): per head the max m of the scores, the sum l of exp(s - m) and the unnormalised
// sum of exp(s - m) V (acc [h1 - h0, D]); K then V read once, front to back, in memory order.
template <typename T>
void part(const T* q, const T* k, const T* v, int64_t t0, int64_t t1, int64_t H, int64_t D, float scale, int64_t h0,
          int64_t h1, float* m, float* l, float* acc) {
  const int64_t n = t1 - t0, nh = h1 - h0, row = H * D;
  std::vector<float> ws(nh * D + nh * n);
  float *qf = ws.data(), *s = qf + nh * D;  // s: [nh, n]
  for (int64_t i = 0; i < nh * D; ++i) qf[i] = load(q[h0 * D + i]) * scale;
  for (int64_t t = 0; t < n; ++t) {
    const T* kt = k + (t0 + t) * row + h0 * D;
    for (int64_t h = 0; h < nh; ++h) {
      vf a{};
      for (int64_t i = 0; i < D; i += W) a += loadv(qf + h * D + i) * loadv(kt + h * D + i);
      s[h * n + t] = hsum(a);
    }
  }
  for (int64_t h = 0; h < nh; ++h) {
    float* sh = s + h * n;
    float mx = -INFINITY;
    for (int64_t t = 0; t < n; ++t) mx = std::max(mx, sh[t]);
    float sum = 0.0f;
    int64_t t = 0;
    for (; t + W <= n; t += W) {
      const vf p = exp_neg(loadv(sh + t) - mx);
      storev(sh + t, p);
      sum += hsum(p);
    }
    for (; t < n; ++t) sum += (sh[t] = std::exp(sh[t] - mx));
    m[h] = mx, l[h] = sum;
  }
  std::fill(acc, acc + nh * D, 0.0f);
  for (int64_t t = 0; t < n; ++t) {
    const T* vt = v + (t0 + t) * row + h0 * D;
    for (int64_t h = 0; h < nh; ++h) {
      const float p = s[h * n + t];
      float* ah = acc + h * D;
      for (int64_t i = 0; i < D; i += W) storev(ah + i, loadv(ah + i) + p * loadv(vt + h * D + i));
    }
  }
}

// dense_decode's heads [h0, h1): the whole context in one part, normalised.
template <typename T>
void heads(const T* q, const T* k, const T* v, T* out, int64_t S, int64_t H, int64_t D, float scale, int64_t h0,
           int64_t h1) {
  const int64_t nh = h1 - h0;
  std::vector<float> ws(nh * (D + 2));
  float *m = ws.data(), *l = m + nh, *acc = l + nh;
  part<T>(q, k, v, 0, S, H, D, scale, h0, h1, m, l, acc);
  for (int64_t h = 0; h < nh; ++h) {
    const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
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

void cross_decode(Tensor q, Tensor kv, double scale, Tensor out) {
  STD_TORCH_CHECK(q.dim() == 3 && out.dim() == 3 && kv.dim() == 2, "cross_decode: bad ranks");
  const ScalarType dt = q.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::BFloat16, "cross_decode: float32 or bfloat16 only");
  STD_TORCH_CHECK(out.scalar_type() == dt && kv.scalar_type() == ScalarType::Long, "cross_decode: dtypes");
  STD_TORCH_CHECK(q.is_cpu() && kv.is_cpu() && out.is_cpu() && q.is_contiguous() && out.is_contiguous() &&
                      kv.is_contiguous(), "cross_decode: contiguous CPU tensors only");
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  STD_TORCH_CHECK(kv.size(0) == N && kv.size(1) == 4 && out.size(0) == N && out.size(1) == H && out.size(2) == D &&
                      D % W == 0, "cross_decode: shapes (kv [N, 4], head_dim a multiple of 16)");
  const int64_t* rows = static_cast<const int64_t*>(kv.data_ptr());
  for (int64_t n = 0; n < N; ++n) STD_TORCH_CHECK(rows[n * 4 + 2] > 0, "cross_decode: an empty context");
  const float sc = float(scale);
  // every row in two halves of its tokens (whatever the thread count: a row's answer never depends on
  // who computed it or what else was in the step), merged at the end
  const int64_t pieces = 2 * N, stride = H * (D + 2);  // per piece: m [H], l [H], acc [H, D]
  std::vector<float> ws(pieces * stride);
  auto piece = [&](int64_t c) {
    const int64_t n = c / 2, S = rows[n * 4 + 2], half = (S + 1) / 2;
    const int64_t t0 = c % 2 == 0 ? 0 : half, t1 = c % 2 == 0 ? half : S;
    float* w = ws.data() + c * stride;
    if (t1 <= t0) {  // (a one-token context: the second half is empty)
      std::fill(w, w + H, -INFINITY), std::fill(w + H, w + 2 * H + H * D, 0.0f);
      return;
    }
    if (dt == ScalarType::Float)
      part<float>(static_cast<const float*>(q.data_ptr()) + n * H * D, reinterpret_cast<const float*>(rows[n * 4]),
                  reinterpret_cast<const float*>(rows[n * 4 + 1]), t0, t1, H, D, sc, 0, H, w, w + H, w + 2 * H);
    else
      part<bf16>(static_cast<const bf16*>(q.data_ptr()) + n * H * D, reinterpret_cast<const bf16*>(rows[n * 4]),
                 reinterpret_cast<const bf16*>(rows[n * 4 + 1]), t0, t1, H, D, sc, 0, H, w, w + H, w + 2 * H);
  };
  const int64_t threads = torch::stable::get_num_threads();
  if (helper_available(threads)) {
    with_helper(pieces, piece);
  } else if (threads == 1) {
    for (int64_t c = 0; c < pieces; ++c) piece(c);
  } else {
    torch::stable::parallel_for(0, pieces, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) piece(c);
    });
  }
  for (int64_t n = 0; n < N; ++n) {
    const float *a = ws.data() + 2 * n * stride, *b = a + stride;
    for (int64_t h = 0; h < H; ++h) {
      const float mx = std::max(a[h], b[h]);
      const float fa = std::exp(a[h] - mx), fb = b[h] == -INFINITY ? 0.0f : std::exp(b[h] - mx);
      const float l = a[H + h] * fa + b[H + h] * fb, inv = l > 0.0f ? 1.0f / l : 0.0f;
      const float *xa = a + 2 * H + h * D, *xb = b + 2 * H + h * D;
      const int64_t o = (n * H + h) * D;
      for (int64_t i = 0; i < D; ++i) {
        const float y = (xa[i] * fa + xb[i] * fb) * inv;
        dt == ScalarType::Float ? store(static_cast<float*>(out.data_ptr()) + o + i, y)
                                : store(static_cast<bf16*>(out.data_ptr()) + o + i, y);
      }
    }
  }
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(patchbay, m) {
  m.def("dense_decode(Tensor q, Tensor k, Tensor v, float scale, Tensor(a!) out) -> ()");
  m.def("cross_decode(Tensor q, Tensor kv, float scale, Tensor(a!) out) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(patchbay, CPU, m) {
  m.impl("dense_decode", TORCH_BOX(&dense_decode));
  m.impl("cross_decode", TORCH_BOX(&cross_decode));
}
