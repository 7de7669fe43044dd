// The transformer blocks of a cached, no-grad float32 CPU forward, without Python (see native_blocks.py for why).
//
// Each step is the ATen op that CausalWanBlock.forward runs on that path (CPU inference shortcuts, CachedAttention),
// with the same arguments and in the same order, so the result is the Python blocks' bit for bit
// (tests/test_native_blocks.py). Change one, change the other.

#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

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
  double ln_eps, rms_eps, gelu_value;
  Tensor unit_gain, gelu_k;  // gain of the LayerNorms without one (_unit_gain); k = 2 sqrt(2 / pi) (_gelu_k)
  int64_t short_keys;        // attention over at most this many keys: explicit softmax (attention._SHORT_KEYS)
  bool cross_norm;           // norm2 is a LayerNorm (cross_attn_norm), not the identity
  bool ffn_onednn;           // FeedForward._forward_onednn instead of _forward_feature_major
};

bool present(const Tensor& t) { return t.defined() && t.numel() > 0; }

Tensor rms_normed(Tensor y, const Tensor& gain, double eps) {  // _rms_normed (in place on a fresh projection)
  auto inv = at::linalg_vector_norm(y, 2, at::IntArrayRef{-1}, /*keepdim=*/true)
                 .square_().div_(y.size(-1)).add_(eps).rsqrt_();
  y.mul_(inv);
  return present(gain) ? y.mul_(gain) : y;
}

Tensor apply_rope_cis(const Tensor& x, const Tensor& cs) {  // apply_rope_cis: x [B, N, H, Dh], cs [N, Dh/2, 2]
  auto xc = at::view_as_complex(x.unflatten(-1, {-1, 2}));
  return at::view_as_real(xc * at::view_as_complex(cs).unsqueeze(0).unsqueeze(2)).flatten(-2);
}

Tensor layer_norm(const Tensor& x, const Tensor& gain, const Tensor& bias, const Config& c) {  // _fp32_layer_norm
  // the unit gain only when the norm has neither gain nor bias
  const Tensor g = present(gain) ? gain : present(bias) ? Tensor() : c.unit_gain;
  return at::layer_norm(x, {x.size(-1)}, g, present(bias) ? bias : Tensor(), c.ln_eps);
}

Tensor modulated_norm(const Tensor& x, const Config& c, const Tensor& scale, const Tensor& shift) {  // _modulated_norm
  auto h = layer_norm(x, Tensor(), Tensor(), c);
  return at::addcmul_out(h, shift, h, scale + 1);
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

Tensor feed_forward(const Tensor& x, const Tensor* w, const Config& c) {  // FeedForward._forward_cpu_inference
  const int64_t d = x.size(-1);
  if (c.ffn_onednn) {  // _forward_onednn
    auto h = linear_pointwise(x.reshape({-1, d}), w[F1_W], w[F1_B], "gelu", "tanh");
    return linear_pointwise(h, w[F2_W], w[F2_B], "none", "").view(x.sizes());
  }
  // _forward_feature_major, with gelu_tanh_
  auto h = at::addmm(w[F1_B].unsqueeze(1), w[F1_W], x.reshape({-1, d}).t());
  auto z = at::addcmul(c.gelu_k, h, h, c.gelu_value);
  h.mul_(z.mul_(h).sigmoid_());
  return at::addmm(w[F2_B].unsqueeze(1), w[F2_W], h).t().view(x.sizes());
}

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
                         double gelu_value, Tensor unit_gain, Tensor gelu_k, int64_t short_keys, bool cross_norm,
                         bool ffn_onednn) {
  TORCH_CHECK(weights.size() % N_W == 0, "weights: expected ", N_W, " tensors per block, got ", weights.size());
  const int64_t layers = static_cast<int64_t>(weights.size()) / N_W;
  TORCH_CHECK(cross_k.size() == static_cast<size_t>(layers) && cross_v.size() == cross_k.size(),
              "one cross-attention K/V per block");
  TORCH_CHECK(x.dim() == 3 && x.size(1) % tokens_per_frame == 0, "tokens must be [B, F*T, D]");
  at::NoGradGuard no_grad;
  const Config c{heads, ln_eps, rms_eps, gelu_value, unit_gain, gelu_k, short_keys, cross_norm, ffn_onednn};
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
    auto h = modulated_norm(xf, c, scale, shift).view({b, n, d});
    auto k = rms_normed(at::linear(h, w[K_W], w[K_B]), w[NK_G], c.rms_eps).unflatten(2, {c.heads, -1});
    auto v = at::linear(h, w[V_W], w[V_B]).unflatten(2, {c.heads, -1});
    if (kv_only && last) {  // a cache pass's last block: its K/V only
      cache.write(layer, chunk, apply_rope_cis(k, rope), v);
      return Tensor();
    }
    // ---- self-attention over the cache (CachedAttention.attend)
    auto q = rms_normed(at::linear(h, w[Q_W], w[Q_B]), w[NQ_G], c.rms_eps).unflatten(2, {c.heads, -1});
    q = apply_rope_cis(q, rope);
    k = apply_rope_cis(k, rope);
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
    auto cq = rms_normed(at::linear(h2, w[CQ_W], w[CQ_B]), w[CNQ_G], c.rms_eps).unflatten(2, {c.heads, -1});
    auto ca = attention(cq, cross_k[layer], cross_v[layer], c.short_keys);
    xf.add_(at::linear(ca.flatten(2), w[CO_W], w[CO_B]).view({b, nf, t, d}));
    // ---- feed-forward
    xf.addcmul_(feed_forward(modulated_norm(xf, c, c_scale, c_shift), w, c), c_gate);
    x = xf.view({b, nn, d});
  }
  return x;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("run_blocks", &run_blocks, "the transformer blocks of a cached no-grad CPU forward",
        py::call_guard<py::gil_scoped_release>());
}
