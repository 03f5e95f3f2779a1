// CPU kernels of patchbay_kernels/attention.py, which compiles this file on first use
// (torch.utils.cpp_extension.load, -O3 -march=native). Only torch's stable C ABI headers
// are included: they parse in seconds, where torch/extension.h takes over a minute here.
//
// patchbay::paged_decode(q, k_cache, v_cache, table, block_size, ctx_lens, scale, window, out)
//   Decode attention, one query token per sequence, K/V read in place from the paged cache
//   (no gather), online softmax in float32 (flash-decoding style), GQA groups together.
//   q, out    [B, Hq, D]               float32 or bfloat16 (q may be a strided view, out contiguous)
//   k/v_cache [num_blocks, bs, Hkv, D] contiguous, q's dtype; D a multiple of 16
//   table     [B, W] int64             block ids (block_size = bs) or slots (block_size = 1)
//   ctx_lens  [B] int64; window <= 0: none
// patchbay::write_kv(k, v, k_cache, v_cache, slots)
//   k/v [T, Hkv, D] (rows contiguous) into the caches' rows at slots [T] int64.
#include "vec.h"

#include <algorithm>
#include <atomic>
#include <vector>

namespace {

using namespace patchbay;
constexpr int64_t kChunk = 64;  // tokens per online-softmax update, a multiple of W
// The four sums of a, b, c, d's lanes, in a transposed reduction.
inline vf4 hsum4(vf a, vf b, vf c, vf d) {
#if PATCHBAY_VEC_BYTES == 64
  vf ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
          __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  vf cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
          __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  vf u = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
         __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  vf8 w = __builtin_shufflevector(u, u, 0, 1, 4, 5, 8, 9, 12, 13) + __builtin_shufflevector(u, u, 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(w, w, 0, 2, 4, 6) + __builtin_shufflevector(w, w, 1, 3, 5, 7);
#elif PATCHBAY_VEC_BYTES == 32
  vf ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) + __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
  vf cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 8, 9, 10, 11) + __builtin_shufflevector(c, d, 4, 5, 6, 7, 12, 13, 14, 15);
  vf u = __builtin_shufflevector(ab, cd, 0, 1, 4, 5, 8, 9, 12, 13) +
         __builtin_shufflevector(ab, cd, 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(u, u, 0, 2, 4, 6) + __builtin_shufflevector(u, u, 1, 3, 5, 7);
#else
  return vf4{hsum(a), hsum(b), hsum(c), hsum(d)};
#endif
}

// Rows are scattered over blocks, which the hardware prefetcher does not follow.
constexpr int64_t kAhead = 8;  // tokens
inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(static_cast<const char*>(p) + i);
}

struct Args {
  const void* q;
  const void* kc;
  const void* vc;
  void* out;
  const int64_t* table;
  const int64_t* lens;
  int64_t B, Hq, Hkv, D, q_s0, q_s1, table_s0, block_size, num_blocks, window;
  float scale;
};

// One work item: sequence b, KV heads [h0, h1) with their query-head groups: R rows of
// float32 state (query, running max m, running sum l, accumulator), K and V rows read
// once each, token-major, four tokens at a time.
template <typename T>
bool attend(const Args& a, int64_t b, int64_t h0, int64_t h1, std::vector<float>& ws) {
  const int64_t D = a.D, G = a.Hq / a.Hkv, H = h1 - h0, R = H * G, row = a.Hkv * D;
  const int64_t len = a.lens[b], bs = a.block_size;
  const int64_t start = a.window > 0 ? std::max<int64_t>(0, len - a.window) : 0;
  ws.resize(R * (2 * D + kChunk + 2));
  float *qf = ws.data(), *acc = qf + R * D, *s = acc + R * D, *m = s + R * kChunk, *l = m + R;
  int64_t idx[kChunk];  // cache row offsets of the chunk's tokens
  const T* q = static_cast<const T*>(a.q) + b * a.q_s0;
  for (int64_t r = 0; r < R; ++r) {
    const T* qr = q + (h0 * G + r) * a.q_s1;
    for (int64_t i = 0; i < D; ++i) qf[r * D + i] = load(qr[i]) * a.scale;
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  std::fill(acc, acc + R * D, 0.0f);
  const int64_t* tab = a.table + b * a.table_s0;
  const T* kc = static_cast<const T*>(a.kc) + h0 * D;
  const T* vc = static_cast<const T*>(a.vc) + h0 * D;
  const int64_t span = H * D * int64_t(sizeof(T));  // bytes of one token's rows in this item
  for (int64_t t0 = start; t0 < len; t0 += kChunk) {
    const int64_t c = std::min(kChunk, len - t0), c4 = (c + 3) & ~int64_t(3);
    for (int64_t j = 0, i = t0 / bs, o = t0 % bs; j < c; ++j) {
      const int64_t blk = tab[i];
      if (blk < 0 || blk >= a.num_blocks) return false;
      idx[j] = (blk * bs + o) * row;
      if (++o == bs) o = 0, ++i;
    }
    for (int64_t j = c; j < c4; ++j) idx[j] = idx[c - 1];  // padding: weight 0 below
    for (int64_t j = 0; j < c4; j += 4) {  // scores
      for (int64_t u = j + kAhead; u < std::min(j + kAhead + 4, c); ++u) prefetch(kc + idx[u], span);
      for (int64_t h = 0; h < H; ++h) {
        const T *k0 = kc + idx[j] + h * D, *k1 = kc + idx[j + 1] + h * D;
        const T *k2 = kc + idx[j + 2] + h * D, *k3 = kc + idx[j + 3] + h * D;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = h * G + g;
          const float* qr = qf + r * D;
          vf a0{}, a1{}, a2{}, a3{};
          for (int64_t i = 0; i < D; i += W) {
            const vf x = loadv(qr + i);
            a0 += x * loadv(k0 + i), a1 += x * loadv(k1 + i), a2 += x * loadv(k2 + i), a3 += x * loadv(k3 + i);
          }
          const vf4 d = hsum4(a0, a1, a2, a3);
          std::memcpy(s + r * kChunk + j, &d, sizeof d);
        }
      }
    }
    for (int64_t r = 0; r < R; ++r) {  // online softmax: rescale what was summed by e^(old max - new max)
      float* sr = s + r * kChunk;
      std::fill(sr + c, sr + kChunk, -INFINITY);
      vf vm = loadv(sr);
      for (int64_t j = W; j < kChunk; j += W) vm = vmax(vm, loadv(sr + j));
      float mx = m[r];
      for (int64_t i = 0; i < W; ++i) mx = std::max(mx, vm[i]);
      vf sum{};
      for (int64_t j = 0; j < kChunk; j += W) {
        const vf p = exp_neg(loadv(sr + j) - mx);
        storev(sr + j, p);
        sum += p;  // the -inf padding adds e^-87 ~ 1e-38 each: nothing next to the max's 1
      }
      std::fill(sr + c, sr + c4, 0.0f);
      const float alpha = std::exp(m[r] - mx);  // 0 at the first chunk (m = -inf)
      l[r] = l[r] * alpha + hsum(sum);
      m[r] = mx;
      if (alpha != 1.0f)
        for (int64_t i = 0; i < D; ++i) acc[r * D + i] *= alpha;
    }
    for (int64_t j = 0; j < c4; j += 4) {  // acc += p V, four tokens per accumulator update
      for (int64_t u = j + kAhead; u < std::min(j + kAhead + 4, c); ++u) prefetch(vc + idx[u], span);
      for (int64_t h = 0; h < H; ++h) {
        const T *v0 = vc + idx[j] + h * D, *v1 = vc + idx[j + 1] + h * D;
        const T *v2 = vc + idx[j + 2] + h * D, *v3 = vc + idx[j + 3] + h * D;
        for (int64_t g = 0; g < G; ++g) {  // (a group's V rows come again from L1)
          const int64_t r = h * G + g;
          const float* p = s + r * kChunk + j;
          const float p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];  // not reloaded after each store
          float* ar = acc + r * D;
          for (int64_t i = 0; i < D; i += W)
            storev(ar + i, loadv(ar + i) + (p0 * loadv(v0 + i) + p1 * loadv(v1 + i)) +
                               (p2 * loadv(v2 + i) + p3 * loadv(v3 + i)));
        }
      }
    }
  }
  T* out = static_cast<T*>(a.out) + (b * a.Hq + h0 * G) * D;
  for (int64_t r = 0; r < R; ++r) {
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;  // l == 0 only for an empty context
    for (int64_t i = 0; i < D; ++i) store(out + r * D + i, acc[r * D + i] * inv);
  }
  return true;
}

template <typename T>
void run(const Args& a) {
  // Work items (sequence, KV-head range), longest contexts first, handed out dynamically:
  // contexts differ in length, a static split would leave a thread idle.
  const int64_t threads = std::max<int64_t>(1, torch::stable::get_num_threads());
  // KV-head ranges per sequence: only as many as balancing the threads needs, as all of a
  // token's heads are one contiguous run of the cache (several items are slower on one thread).
  int64_t split = 1;
  while (split < a.Hkv && a.B * split < 2 * threads) split *= 2;
  split = std::min(split, a.Hkv);
  const int64_t per = (a.Hkv + split - 1) / split, n_items = a.B * split;
  std::vector<int64_t> order(a.B);
  for (int64_t b = 0; b < a.B; ++b) order[b] = b;
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return a.lens[x] > a.lens[y]; });
  std::atomic<int64_t> next{0};
  std::atomic<bool> bad{false};
  auto work = [&](int64_t, int64_t) {
    std::vector<float> ws;
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n_items;) {
      const int64_t b = order[i / split], h0 = (i % split) * per;
      if (h0 < a.Hkv && !attend<T>(a, b, h0, std::min(a.Hkv, h0 + per), ws)) bad = true;
    }
  };
  if (threads == 1 || n_items == 1)
    work(0, 1);
  else
    torch::stable::parallel_for(0, std::min(threads, n_items), 1, work);
  STD_TORCH_CHECK(!bad, "paged_decode: block id out of range");
}

void paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor table, int64_t block_size, Tensor ctx_lens,
                  double scale, int64_t window, Tensor out) {
  STD_TORCH_CHECK(q.dim() == 3 && out.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4 &&
                      table.dim() == 2 && ctx_lens.dim() == 1, "paged_decode: bad ranks");
  const ScalarType dt = q.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::BFloat16, "paged_decode: float32 or bfloat16 only");
  STD_TORCH_CHECK(k_cache.scalar_type() == dt && v_cache.scalar_type() == dt && out.scalar_type() == dt,
                  "paged_decode: q, caches and out must share a dtype");
  STD_TORCH_CHECK(q.is_cpu() && k_cache.is_cpu() && v_cache.is_cpu() && table.is_cpu() && ctx_lens.is_cpu() &&
                      out.is_cpu(), "paged_decode: CPU tensors only");
  STD_TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && out.is_contiguous() &&
                      ctx_lens.is_contiguous() && q.stride(2) == 1 && table.stride(1) == 1,
                  "paged_decode: caches, out, ctx_lens must be contiguous; q and table rows too");
  STD_TORCH_CHECK(ctx_lens.scalar_type() == ScalarType::Long && table.scalar_type() == ScalarType::Long,
                  "paged_decode: table and ctx_lens must be int64");
  Args a{};
  a.B = q.size(0), a.Hq = q.size(1), a.D = q.size(2), a.Hkv = k_cache.size(2);
  a.block_size = block_size;
  STD_TORCH_CHECK(a.Hkv > 0 && a.Hq % a.Hkv == 0 && k_cache.size(3) == a.D && a.D % W == 0,
                  "paged_decode: head shapes (head_dim a multiple of 16)");
  for (int64_t i = 0; i < 4; ++i) STD_TORCH_CHECK(v_cache.size(i) == k_cache.size(i), "paged_decode: k/v caches differ");
  for (int64_t i = 0; i < 3; ++i) STD_TORCH_CHECK(out.size(i) == q.size(i), "paged_decode: out shape");
  STD_TORCH_CHECK(table.size(0) == a.B && ctx_lens.size(0) == a.B, "paged_decode: batch sizes differ");
  STD_TORCH_CHECK(block_size >= 1 && (k_cache.size(0) * k_cache.size(1)) % block_size == 0,
                  "paged_decode: bad block_size");
  a.num_blocks = k_cache.size(0) * k_cache.size(1) / block_size;
  a.lens = static_cast<const int64_t*>(ctx_lens.data_ptr());
  for (int64_t b = 0; b < a.B; ++b)
    STD_TORCH_CHECK(a.lens[b] >= 0 && a.lens[b] <= table.size(1) * block_size, "paged_decode: ctx_len ",
                    a.lens[b], " exceeds the table");
  a.q = q.data_ptr(), a.kc = k_cache.data_ptr(), a.vc = v_cache.data_ptr(), a.out = out.data_ptr();
  a.table = static_cast<const int64_t*>(table.data_ptr());
  a.q_s0 = q.stride(0), a.q_s1 = q.stride(1), a.table_s0 = table.stride(0);
  a.window = window, a.scale = float(scale);
  if (a.B == 0) return;
  dt == ScalarType::Float ? run<float>(a) : run<bf16>(a);
}

// k_cache/v_cache rows at slots[t] = k/v[t]: index_copy_ without its per-call machinery.
void write_kv(Tensor k, Tensor v, Tensor k_cache, Tensor v_cache, Tensor slots) {
  STD_TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4 && slots.dim() == 1,
                  "write_kv: bad ranks");
  STD_TORCH_CHECK(k.is_cpu() && v.is_cpu() && k_cache.is_cpu() && v_cache.is_cpu() && slots.is_cpu(),
                  "write_kv: CPU tensors only");
  const ScalarType dt = k_cache.scalar_type();
  STD_TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt && v_cache.scalar_type() == dt,
                  "write_kv: k, v and the caches must share a dtype");
  STD_TORCH_CHECK(slots.scalar_type() == ScalarType::Long && slots.is_contiguous(), "write_kv: slots: int64");
  STD_TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k.stride(2) == 1 && v.stride(2) == 1,
                  "write_kv: caches must be contiguous, k and v rows too");
  const int64_t T = slots.size(0), H = k_cache.size(2), D = k_cache.size(3), es = int64_t(k.element_size());
  for (int64_t i = 0; i < 4; ++i) STD_TORCH_CHECK(v_cache.size(i) == k_cache.size(i), "write_kv: k/v caches differ");
  for (int64_t i = 0; i < 3; ++i)
    STD_TORCH_CHECK(k.size(i) == (i ? k_cache.size(i + 1) : T) && v.size(i) == k.size(i), "write_kv: k/v shapes");
  const int64_t n_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* sl = static_cast<const int64_t*>(slots.data_ptr());
  for (int64_t t = 0; t < T; ++t) STD_TORCH_CHECK(sl[t] >= 0 && sl[t] < n_slots, "write_kv: slot ", sl[t], " out of range");
  char *kc = static_cast<char*>(k_cache.data_ptr()), *vc = static_cast<char*>(v_cache.data_ptr());
  const char *kp = static_cast<const char*>(k.data_ptr()), *vp = static_cast<const char*>(v.data_ptr());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      std::memcpy(kc + ((sl[t] * H + h) * D) * es, kp + (t * k.stride(0) + h * k.stride(1)) * es, D * es);
      std::memcpy(vc + ((sl[t] * H + h) * D) * es, vp + (t * v.stride(0) + h * v.stride(1)) * es, D * es);
    }
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(patchbay, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor table, int block_size, Tensor ctx_lens, "
        "float scale, int window, Tensor(a!) out) -> ()");
  m.def("write_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(patchbay, CPU, m) {
  m.impl("paged_decode", TORCH_BOX(&paged_decode));
  m.impl("write_kv", TORCH_BOX(&write_kv));
}
