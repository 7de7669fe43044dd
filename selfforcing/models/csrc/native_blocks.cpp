// The transformer blocks of a cached, no-grad float32 CPU forward, without Python (see native_blocks.py for why).
//
// Each step is the ATen op that CausalWanBlock.forward runs on that path (CPU inference shortcuts, CachedAttention),
// with the same arguments and in the same order, except three fused passes that compute the same functions to float
// rounding: the adaLN LayerNorm with its modulation (layer_norm_modulate), the q/k RMSNorm with the RoPE rotation
// (rms_rope_), and the feature-major FFN's bias and GELU (bias_gelu_tanh_). The forward equals the Python blocks to
// float rounding (tests/test_native_blocks.py). Change one, change the other.

#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace {

using at::Tensor;

// One block's parameters, in this order (an absent one, e.g. the gain of a norm without one: an empty tensor).
enum W {
  SST, Q_W, Q_B, K_W, K_B, V_W, V_B, O_W, O_B, NQ_G, NK_G, N2_W, N2_B,
  CQ_W, CQ_B, CO_W, CO_B, CNQ_G, F1_W, F1_B, F2_W, F2_B, N_W
};

struct Config {
  int64_t heads;
  double ln_eps, rms_eps;
  Tensor unit_gain;          // gain of the LayerNorms without one (_unit_gain)
  int64_t short_keys;        // attention over at most this many keys: explicit softmax (attention._SHORT_KEYS)
  bool cross_norm;           // norm2 is a LayerNorm (cross_attn_norm), not the identity
  bool ffn_onednn;           // FeedForward._forward_onednn instead of _forward_feature_major
};

bool present(const Tensor& t) { return t.defined() && t.numel() > 0; }

Tensor layer_norm(const Tensor& x, const Tensor& gain, const Tensor& bias, const Config& c) {  // _fp32_layer_norm
  // the unit gain only when the norm has neither gain nor bias
  const Tensor g = present(gain) ? gain : present(bias) ? Tensor() : c.unit_gain;
  return at::layer_norm(x, {x.size(-1)}, g, present(bias) ? bias : Tensor(), c.ln_eps);
}

Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t short_keys) {  // attention.attention
  if (k.size(1) <= short_keys) {  // _short_key_attention
    auto scores = at::matmul(q.transpose(1, 2), k.permute({0, 2, 3, 1})).mul_(std::pow(q.size(-1), -0.5));
    return at::matmul(at::softmax(scores, -1), v.transpose(1, 2)).transpose(1, 2);
  }
  return at::scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2);
}

Tensor linear_pointwise(const Tensor& x, const Tensor& w, const Tensor& b, const std::string& attr,
                        const std::string& algorithm) {  // torch.ops.mkldnn._linear_pointwise
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x, w, b, attr, c10::List<std::optional<at::Scalar>>(), algorithm};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// GELU(x + b) in place, tanh form: 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3))), y = x + b, one pass over the
// feature-major hidden state h [F, N] with the bias b [F] of its rows. Unfused, the bias is first copied into h
// (addmm), then the GELU takes four more passes over a tensor too big for L2 (1.2 MB for 192 tokens of the small
// preset). tanh is the rational approximation of Eigen's fast float tanh, within 3.5e-7 of tanh over all floats,
// plain arithmetic that the compiler vectorises (libm's tanhf and expf do not vectorise without -ffast-math).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))  // an AVX2 build where the CPU has AVX2, chosen at load
#endif
void bias_gelu_tanh_rows(float* h, const float* bias, int64_t rows, int64_t n) {
  constexpr float kClamp = 7.90531110763549805f;  // tanh(x) rounds to +-1 in float beyond this
  constexpr float a1 = 4.89352455891786e-03f, a3 = 6.37261928875436e-04f, a5 = 1.48572235717979e-05f,
                  a7 = 5.12229709037114e-08f, a9 = -8.60467152213735e-11f, a11 = 2.00018790482477e-13f,
                  a13 = -2.76076847742355e-16f;
  constexpr float b0 = 4.89352518554385e-03f, b2 = 2.26843463243900e-03f, b4 = 1.18534705686654e-04f,
                  b6 = 1.19825839466702e-06f;
  constexpr float k0 = 0.7978845608028654f, k1 = 0.7978845608028654f * 0.044715f;  // sqrt(2/pi), * 0.044715
  for (int64_t r = 0; r < rows; ++r) {
    float* p = h + r * n;
    const float bias_r = bias[r];
    for (int64_t i = 0; i < n; ++i) {
      const float y = p[i] + bias_r;
      float u = y * (k0 + k1 * y * y);
      u = std::max(-kClamp, std::min(u, kClamp));  // min/max, not branches: the loop vectorises
      const float u2 = u * u;
      float num = a13;
      num = u2 * num + a11;
      num = u2 * num + a9;
      num = u2 * num + a7;
      num = u2 * num + a5;
      num = u2 * num + a3;
      num = u2 * num + a1;
      float den = b6;
      den = u2 * den + b4;
      den = u2 * den + b2;
      den = u2 * den + b0;
      p[i] = 0.5f * y * (1.0f + u * num / den);
    }
  }
}

// RMSNorm over each row of y [R, D] with gain g [D] (or none), then, with a RoPE table cs [N, Dh/2, 2] (or none),
// each head's consecutive pairs (a, b) of row r rotated by the angle of token r % N: (a c - b s, a s + b c). In place,
// two passes over a row (sum of squares; scale, gain and rotation) instead of seven kernels for the norm and one more
// for the rotation.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void rms_rope_rows(float* y, const float* g, const float* cs, int64_t r0, int64_t r1, int64_t d, int64_t head_dim,
                   int64_t tokens, float eps) {
  for (int64_t r = r0; r < r1; ++r) {
    float* row = y + r * d;
    float ss = 0.0f;
    for (int64_t i = 0; i < d; ++i) ss += row[i] * row[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
    if (g != nullptr)
      for (int64_t i = 0; i < d; ++i) row[i] *= inv * g[i];
    else
      for (int64_t i = 0; i < d; ++i) row[i] *= inv;
    if (cs == nullptr) continue;
    const float* t = cs + (r % tokens) * head_dim;  // [Dh/2, 2] of this token
    for (int64_t h0 = 0; h0 < d; h0 += head_dim)
      for (int64_t i = 0; i < head_dim / 2; ++i) {
        const float a = row[h0 + 2 * i], b = row[h0 + 2 * i + 1], c = t[2 * i], sn = t[2 * i + 1];
        row[h0 + 2 * i] = a * c - b * sn;
        row[h0 + 2 * i + 1] = a * sn + b * c;
      }
  }
}

// LayerNorm without gain or bias over each row of x [R, D], then h = n (1 + scale) + shift with the scale and shift
// rows [D] of the row's frame (rows_per_frame rows each); h written to out. One read of x for the moments (two
// accumulators, then the variance as E[(x - mean)^2] in a second pass over the row while it is in L1) and one write.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void layer_norm_modulate_rows(const float* x, const float* scale, const float* shift, float* out, int64_t r0,
                              int64_t r1, int64_t d, int64_t rows_per_frame, float eps) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* row = x + r * d;
    float sum = 0.0f;
    for (int64_t i = 0; i < d; ++i) sum += row[i];
    const float mean = sum / static_cast<float>(d);
    float var = 0.0f;
    for (int64_t i = 0; i < d; ++i) var += (row[i] - mean) * (row[i] - mean);
    const float rstd = 1.0f / std::sqrt(var / static_cast<float>(d) + eps);
    const int64_t f = r / rows_per_frame;
    const float* sc = scale + f * d;
    const float* sh = shift + f * d;
    float* o = out + r * d;
    for (int64_t i = 0; i < d; ++i) o[i] = (row[i] - mean) * rstd * (1.0f + sc[i]) + sh[i];
  }
}

}  // namespace

// x [B, F, T, D] float32, scale / shift [B, F, 1, D] (any strides): LayerNorm(x) (1 + scale) + shift, as
// _modulated_norm with a norm that has no gain or bias, to float rounding; a new tensor [B, F, T, D].
static Tensor layer_norm_modulate(const Tensor& x, const Tensor& scale, const Tensor& shift, double eps) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "layer_norm_modulate: x must be a float32 CPU tensor [B, F, T, D]");
  const int64_t b = x.size(0), f = x.size(1), t = x.size(2), d = x.size(3);
  TORCH_CHECK(scale.sizes() == at::IntArrayRef({b, f, 1, d}) && shift.sizes() == scale.sizes(),
              "layer_norm_modulate: scale and shift must be [B, F, 1, D]");
  auto xc = x.contiguous();
  auto sc = scale.contiguous(), sh = shift.contiguous();
  auto out = at::empty_like(xc);
  const float *px = xc.data_ptr<float>(), *ps = sc.data_ptr<float>(), *pt = sh.data_ptr<float>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, b * f * t, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(d, 1)),
                   [&](int64_t r0, int64_t r1) {
                     layer_norm_modulate_rows(px, ps, pt, po, r0, r1, d, t, static_cast<float>(eps));
                   });
  return out;
}

// y [..., D] float32 contiguous (a fresh projection): RMS-normalised over D with gain g [D] (empty: none), then, if
// cs [N, Dh/2, 2] is given (not empty), rotated per head of Dh = 2 cs.size(1) with token r % N's angles; in place.
// _rms_normed followed by apply_rope_cis, to float rounding.
static Tensor rms_rope_(Tensor y, const Tensor& gain, const Tensor& cs, double eps) {
  TORCH_CHECK(y.is_contiguous() && y.scalar_type() == at::kFloat && y.device().is_cpu(),
              "rms_rope_: y must be a contiguous float32 CPU tensor [..., D]");
  const int64_t d = y.size(-1), rows = y.numel() / std::max<int64_t>(d, 1);
  const bool rope = present(cs);
  TORCH_CHECK(!present(gain) || (gain.numel() == d && gain.is_contiguous()), "rms_rope_: gain must be [D]");
  TORCH_CHECK(!rope || (cs.dim() == 3 && cs.size(2) == 2 && cs.is_contiguous() && d % (2 * cs.size(1)) == 0 &&
                        rows % cs.size(0) == 0),
              "rms_rope_: the RoPE table must be [N, Dh/2, 2] with Dh dividing D and N dividing the rows");
  float* data = y.data_ptr<float>();
  const float* g = present(gain) ? gain.data_ptr<float>() : nullptr;
  const float* t = rope ? cs.data_ptr<float>() : nullptr;
  const int64_t head_dim = rope ? 2 * cs.size(1) : d, tokens = rope ? cs.size(0) : 1;
  at::parallel_for(0, rows, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(d, 1)),
                   [&](int64_t r0, int64_t r1) {
                     rms_rope_rows(data, g, t, r0, r1, d, head_dim, tokens, static_cast<float>(eps));
                   });
  return y;
}

// h [F, N] float32 contiguous, bias [F]: h <- GELU_tanh(h + bias[:, None]), in place; returns h.
static Tensor bias_gelu_tanh_(Tensor h, const Tensor& bias) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && h.scalar_type() == at::kFloat && h.device().is_cpu(),
              "bias_gelu_tanh_: h must be a contiguous float32 CPU matrix [F, N]");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == h.size(0) && bias.is_contiguous() && bias.scalar_type() == at::kFloat,
              "bias_gelu_tanh_: bias must be float32 [F] with F = h.size(0)");
  float* data = h.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  const int64_t n = std::max<int64_t>(h.size(1), 1);
  // torch's intra-op threads (the extension is built with -fopenmp and binds to the OpenMP runtime torch loaded)
  at::parallel_for(0, h.size(0), std::max<int64_t>(1, at::internal::GRAIN_SIZE / n), [&](int64_t r0, int64_t r1) {
    bias_gelu_tanh_rows(data + r0 * n, b + r0, r1 - r0, n);
  });
  return h;
}

// The FFN W2 GELU(W1 x + b1) + b2 of x [..., D] -> [..., D]: through oneDNN with the GELU fused into its first
// product (FeedForward._forward_onednn, the same ops), or feature-major through BLAS with the bias and GELU in one
// pass (FeedForward._forward_feature_major up to the GELU's rounding: it uses torch's sigmoid, this the rational tanh).
static Tensor feed_forward(const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
                           bool onednn) {
  const int64_t d = x.size(-1);
  if (onednn) {
    auto h = linear_pointwise(x.reshape({-1, d}), w1, b1, "gelu", "tanh");
    return linear_pointwise(h, w2, b2, "none", "").view(x.sizes());
  }
  auto h = bias_gelu_tanh_(at::mm(w1, x.reshape({-1, d}).t()), b1);  // [ffn_dim, N]
  return at::addmm(b2.unsqueeze(1), w2, h).t().view(x.sizes());
}

namespace {

struct Chunk {  // one chunk's part of a ChunkPlan
  Tensor slots;       // the token slots it writes
  int64_t visible;    // the filled prefix of the buffer it reads once written
  Tensor read_index;  // or the slots it reads (gathered)
};

struct Cache {  // KVCache.write / KVCache.view
  Tensor k, v;  // [L, B, H, C*T, Dh]
  void write(int64_t layer, const Chunk& chunk, const Tensor& k_new, const Tensor& v_new) const {
    k[layer].index_copy_(2, chunk.slots, k_new.transpose(1, 2));
    v[layer].index_copy_(2, chunk.slots, v_new.transpose(1, 2));
  }
  std::pair<Tensor, Tensor> view(int64_t layer, const Chunk& chunk) const {
    if (present(chunk.read_index))
      return {k[layer].index_select(2, chunk.read_index).transpose(1, 2),
              v[layer].index_select(2, chunk.read_index).transpose(1, 2)};
    return {k[layer].slice(2, 0, chunk.visible).transpose(1, 2), v[layer].slice(2, 0, chunk.visible).transpose(1, 2)};
  }
};

}  // namespace

// tokens [B, F*T, D] (F frames: a fused finished chunk's first, if any, then the chunk's), e [B, F, 6, D],
// rope [F*T, Dh/2, 2]; weights: N_W per block; cross_k / cross_v: each block's text K/V [B, L, H, Dh].
// Returns the output tokens [B, F'*T, D] (F' without the finished chunk), or an undefined tensor for kv_only.
static Tensor run_blocks(Tensor x, Tensor e, Tensor rope, std::vector<Tensor> weights, std::vector<Tensor> cross_k,
                         std::vector<Tensor> cross_v, Tensor cache_k, Tensor cache_v, Tensor slots, int64_t visible,
                         Tensor read_index, Tensor pending_slots, int64_t pending_visible, Tensor pending_read_index,
                         int64_t tokens_per_frame, bool kv_only, int64_t heads, double ln_eps, double rms_eps,
                         Tensor unit_gain, int64_t short_keys, bool cross_norm, bool ffn_onednn) {
  TORCH_CHECK(weights.size() % N_W == 0, "weights: expected ", N_W, " tensors per block, got ", weights.size());
  const int64_t layers = static_cast<int64_t>(weights.size()) / N_W;
  TORCH_CHECK(cross_k.size() == static_cast<size_t>(layers) && cross_v.size() == cross_k.size(),
              "one cross-attention K/V per block");
  TORCH_CHECK(x.dim() == 3 && x.size(1) % tokens_per_frame == 0, "tokens must be [B, F*T, D]");
  at::NoGradGuard no_grad;
  const Config c{heads, ln_eps, rms_eps, unit_gain, short_keys, cross_norm, ffn_onednn};
  const Cache cache{cache_k, cache_v};
  const Chunk chunk{slots, visible, read_index};
  const bool fused = present(pending_slots);
  const Chunk pending{pending_slots, pending_visible, pending_read_index};
  const int64_t b = x.size(0), d = x.size(2), t = tokens_per_frame;
  int64_t nf = x.size(1) / t;
  for (int64_t layer = 0; layer < layers; ++layer) {  // CausalWanBlock.forward
    const Tensor* w = weights.data() + layer * N_W;
    const bool last = layer == layers - 1;
    const int64_t n = x.size(1);
    auto m = (w[SST].unsqueeze(0) + e).unsqueeze(3).unbind(2);  // each [B, F, 1, D]
    Tensor shift = m[0], scale = m[1], gate = m[2], c_shift = m[3], c_scale = m[4], c_gate = m[5];
    auto xf = x.view({b, nf, t, d});
    auto h = layer_norm_modulate(xf, scale, shift, c.ln_eps).view({b, n, d});
    // q and k normalised and rotated in one fused pass each (rms_rope_); v as it is
    auto k = rms_rope_(at::linear(h, w[K_W], w[K_B]), w[NK_G], rope, c.rms_eps).unflatten(2, {c.heads, -1});
    auto v = at::linear(h, w[V_W], w[V_B]).unflatten(2, {c.heads, -1});
    if (kv_only && last) {  // a cache pass's last block: its K/V only
      cache.write(layer, chunk, k, v);
      return Tensor();
    }
    // ---- self-attention over the cache (CachedAttention.attend)
    auto q = rms_rope_(at::linear(h, w[Q_W], w[Q_B]), w[NQ_G], rope, c.rms_eps).unflatten(2, {c.heads, -1});
    auto attend_one = [&](const Chunk& ch, const Tensor& qq, const Tensor& kk, const Tensor& vv, bool queries) {
      cache.write(layer, ch, kk, vv);
      if (!queries) return Tensor();
      auto kv = cache.view(layer, ch);
      return attention(qq, kv.first, kv.second, c.short_keys);
    };
    Tensor a;
    if (!fused) {
      a = attend_one(chunk, q, k, v, true);
    } else {  // the finished chunk's K/V and queries first, then the chunk's (whose write may evict what it read)
      const int64_t np = pending_slots.numel();
      auto first = attend_one(pending, q.narrow(1, 0, np), k.narrow(1, 0, np), v.narrow(1, 0, np), !last);
      auto rest = attend_one(chunk, q.narrow(1, np, n - np), k.narrow(1, np, n - np), v.narrow(1, np, n - np), true);
      a = first.defined() ? at::cat({first, rest}, 1) : rest;
    }
    a = at::linear(a.flatten(2), w[O_W], w[O_B]);
    const int64_t drop = nf - a.size(1) / t;  // frames of a finished chunk that only wrote their K/V
    if (drop) {
      xf = xf.narrow(1, drop, nf - drop);
      nf -= drop;
      gate = gate.narrow(1, drop, nf);
      c_shift = c_shift.narrow(1, drop, nf);
      c_scale = c_scale.narrow(1, drop, nf);
      c_gate = c_gate.narrow(1, drop, nf);
    }
    const int64_t nn = nf * t;
    xf = at::addcmul(xf, a.view({b, nf, t, d}), gate);
    // ---- cross-attention to the cached text K/V (WanAttention.cross_attention)
    auto h2 = (c.cross_norm ? layer_norm(xf, w[N2_W], w[N2_B], c) : xf).view({b, nn, d});
    auto cq = rms_rope_(at::linear(h2, w[CQ_W], w[CQ_B]), w[CNQ_G], Tensor(), c.rms_eps).unflatten(2, {c.heads, -1});
    auto ca = attention(cq, cross_k[layer], cross_v[layer], c.short_keys);
    xf.add_(at::linear(ca.flatten(2), w[CO_W], w[CO_B]).view({b, nf, t, d}));
    // ---- feed-forward
    xf.addcmul_(feed_forward(layer_norm_modulate(xf, c_scale, c_shift, c.ln_eps), w[F1_W], w[F1_B], w[F2_W], w[F2_B],
                             c.ffn_onednn), c_gate);
    x = xf.view({b, nn, d});
  }
  return x;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("run_blocks", &run_blocks, "the transformer blocks of a cached no-grad CPU forward",
        py::call_guard<py::gil_scoped_release>());
  m.def("feed_forward", &feed_forward, "the blocks' FFN: x, w1, b1, w2, b2, onednn",
        py::call_guard<py::gil_scoped_release>());
  m.def("layer_norm_modulate", &layer_norm_modulate, "LayerNorm(x) * (1 + scale) + shift, per frame",
        py::call_guard<py::gil_scoped_release>());
  m.def("rms_rope_", &rms_rope_, "y [..., D] <- RoPE(RMSNorm(y) * gain) in place (empty gain / table: none)",
        py::call_guard<py::gil_scoped_release>());
  m.def("bias_gelu_tanh_", &bias_gelu_tanh_, "h [F, N] <- GELU_tanh(h + bias[:, None]) in place",
        py::call_guard<py::gil_scoped_release>());
}
