// A no-grad float32 CPU forward without Python (see native_blocks.py for why), against a KV cache or without one:
// run_forward does the patch embedding, the blocks (run_blocks) and the output head.
//
// run_blocks computes what CausalWanBlock.forward computes on that path (CPU inference shortcuts; CachedAttention, or
// FullAttention unmasked or with a key prefix per query), in the same order. The FFN's products go through the same
// BLAS / oneDNN calls; three things have kernels of their own, AVX2 register tiles where the CPU has them (else
// torch's op): the self-attention over the cached window (window_attention; SDPA past 2048 keys), the attention over
// a few text tokens (short_attention), and the attention projections of small models (linear_t, on transposed weight
// copies). What lies between the products is fused into
// one pass over the rows each time, the same functions to float rounding:
//   - the adaLN LayerNorm with its modulation, read from the table and e where it is used (modulated_norm);
//   - each projection's bias with whatever reads its output first: the q/k RMSNorm and RoPE rotation (rms_rope_), the
//     cache write of v (write_kv), the residual updates;
//   - each residual update with the norm that follows it (gate_residual_norm, residual_modulated_norm_,
//     gate_residual_ffn_), and the feature-major FFN's bias with its GELU (bias_gelu_tanh_).
// The forward equals the Python blocks to float rounding (tests/test_native_blocks.py). Change one, change the other.

#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace {

using at::Tensor;

// Wall time per stage of run_forward, for benchmarks/profile_chunk.py (torch.profiler does not see the fused kernels
// and register-tile products, which are not torch ops). Off unless profile_sections(true): then each stage adds its
// wall time (the thread that runs the forward measures; the stages run one after another).
enum Stage {
  S_PATCH, S_NORM1, S_QKV, S_QK_NORM_ROPE, S_CACHE_WRITE, S_SELF_ATTN, S_CAT, S_OUT_PROJ, S_RESIDUAL1, S_CROSS_Q,
  S_CROSS_ATTN, S_CROSS_OUT, S_RESIDUAL2, S_FFN_UP, S_GELU, S_FFN_DOWN, S_RESIDUAL3, S_HEAD, N_STAGES
};
const char* const kStageNames[N_STAGES] = {
    "patch embedding", "norm1 + modulation", "q/k/v projections", "q/k RMSNorm + RoPE", "cache write",
    "self-attention", "concat (fused cache pass)", "output projection", "residual + cross norm", "cross q projection",
    "cross-attention", "cross output projection", "residual + FFN norm", "FFN up", "FFN bias + GELU", "FFN down",
    "FFN residual", "head"};
std::atomic<bool> g_profile{false};
std::array<double, N_STAGES> g_stage_seconds{};

struct StageTimer {
  Stage stage;
  bool on;
  std::chrono::steady_clock::time_point t0;
  explicit StageTimer(Stage s) : stage(s), on(g_profile.load(std::memory_order_relaxed)) {
    if (on) t0 = std::chrono::steady_clock::now();
  }
  ~StageTimer() {
    if (on) g_stage_seconds[stage] += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
};

// One block's parameters, in this order (an absent one, e.g. the gain of a norm without one: an empty tensor).
// The *_T are the attention projections' weights transposed to [in, out] (for linear_t; empty: at::mm runs).
enum W {
  SST, Q_W, Q_B, K_W, K_B, V_W, V_B, O_W, O_B, NQ_G, NK_G, N2_W, N2_B,
  CQ_W, CQ_B, CO_W, CO_B, CNQ_G, F1_W, F1_B, F2_W, F2_B, Q_T, K_T, V_T, O_T, CQ_T, CO_T, N_W
};

bool present(const Tensor& t) { return t.defined() && t.numel() > 0; }

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

// Row r of y [R, D] (row stride ld): plus the bias b [D] (or none), RMS-normalised with gain g [D] (or none), then,
// with a RoPE table cs [N, Dh/2, 2] (or none), each head's consecutive pairs (a, b) rotated by the angle of token
// r % N: (a c - b s, a s + b c). In place, two passes over a row (bias and sum of squares; scale, gain and rotation)
// instead of the bias copy of addmm, seven kernels for the norm and one more for the rotation.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void rms_rope_rows(float* y, int64_t ld, const float* bias, const float* g, const float* cs, int64_t r0, int64_t r1,
                   int64_t d, int64_t head_dim, int64_t tokens, float eps) {
  for (int64_t r = r0; r < r1; ++r) {
    float* row = y + r * ld;
    if (bias != nullptr)
      for (int64_t i = 0; i < d; ++i) row[i] += bias[i];
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
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

// The adaLN vectors of one block: vector j in {shift, scale, gate, c_shift, c_scale, c_gate} of frame f of batch b is
// table[j] + e[b, f0 + f, j] (CausalWanBlock.forward: scale_shift_table + e), read where it is used instead of
// materialised as six strided [B, F, 1, D] tensors per block. e [B, frames, 6, D] and table [6, D] contiguous.
// The output head's two, {shift, scale}, are table[j] + temb[b, f0 + f] with temb [B, frames, D] (per_frame = 1).
struct Mod {
  const float* table;
  const float* e;
  int64_t frames, d, f0;
  int64_t per_frame = 6;  // vectors of e per frame: 6, or 1 shared by every j (the head)
  const float* t(int j) const { return table + j * d; }
  const float* em(int64_t b, int64_t f, int j) const {
    return e + ((b * frames + f0 + f) * per_frame + (per_frame == 1 ? 0 : j)) * d;
  }
};

// Mean and 1 / std of a row of d floats (LayerNorm's biased variance, as E[(x - mean)^2] in a second pass over the row
// while it is in L1).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
std::pair<float, float> row_moments(const float* row, int64_t d, float eps) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < d; ++i) sum += row[i];
  const float mean = sum / static_cast<float>(d);
  float var = 0.0f;
#pragma omp simd reduction(+ : var)
  for (int64_t i = 0; i < d; ++i) var += (row[i] - mean) * (row[i] - mean);
  return {mean, 1.0f / std::sqrt(var / static_cast<float>(d) + eps)};
}

// out row = LayerNorm(x row) (1 + scale) + shift with the shift / scale vectors j, j + 1 of the row's frame (x, out:
// rows of [B, F, T, D], contiguous).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void modulated_norm_rows(const float* x, float* out, const Mod& m, int j, int64_t r0, int64_t r1, int64_t t,
                         int64_t nf, float eps) {
  const int64_t d = m.d;
  const float *tsh = m.t(j), *tsc = m.t(j + 1);
  for (int64_t r = r0; r < r1; ++r) {
    const float* row = x + r * d;
    const auto [mean, rstd] = row_moments(row, d, eps);
    const int64_t b = r / (nf * t), f = (r / t) % nf;
    const float *esh = m.em(b, f, j), *esc = m.em(b, f, j + 1);
    float* o = out + r * d;
    for (int64_t i = 0; i < d; ++i) o[i] = (row[i] - mean) * rstd * (1.0f + (tsc[i] + esc[i])) + (tsh[i] + esh[i]);
  }
}

// After the self-attention: y = x + (a + ob) gate (the gate of the row's frame, vector 2), then h = LayerNorm(y) w + nb
// (the cross-attention norm; none if w is null: h unused). x rows: frame `drop + f` of [B, drop + nf, T, D]; a, y, h:
// rows of [B, nf, T, D].
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void gate_residual_norm_rows(const float* x, const float* a, const float* ob, float* y, float* h, const float* w,
                             const float* nb, const Mod& m, int64_t drop, int64_t r0, int64_t r1, int64_t t,
                             int64_t nf, float eps) {
  const int64_t d = m.d;
  const float* tg = m.t(2);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / (nf * t), f = (r / t) % nf;
    const float* xr = x + (r + (b + 1) * drop * t) * d;  // skip the dropped frames of this and every earlier batch
    const float *ar = a + r * d, *eg = m.em(b, f, 2);
    float* yr = y + r * d;
    if (ob != nullptr)
      for (int64_t i = 0; i < d; ++i) yr[i] = xr[i] + (ar[i] + ob[i]) * (tg[i] + eg[i]);
    else
      for (int64_t i = 0; i < d; ++i) yr[i] = xr[i] + ar[i] * (tg[i] + eg[i]);
    if (h == nullptr) continue;
    const auto [mean, rstd] = row_moments(yr, d, eps);
    float* hr = h + r * d;
    if (w != nullptr && nb != nullptr)
      for (int64_t i = 0; i < d; ++i) hr[i] = (yr[i] - mean) * rstd * w[i] + nb[i];
    else if (w != nullptr)
      for (int64_t i = 0; i < d; ++i) hr[i] = (yr[i] - mean) * rstd * w[i];
    else if (nb != nullptr)
      for (int64_t i = 0; i < d; ++i) hr[i] = (yr[i] - mean) * rstd + nb[i];
    else
      for (int64_t i = 0; i < d; ++i) hr[i] = (yr[i] - mean) * rstd;
  }
}

// After the cross-attention: y += c + cb in place, then h = LayerNorm(y) (1 + c_scale) + c_shift (vectors 3, 4).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void residual_modulated_norm_rows(float* y, const float* c, const float* cb, float* h, const Mod& m, int64_t r0,
                                  int64_t r1, int64_t t, int64_t nf, float eps) {
  const int64_t d = m.d;
  const float *tsh = m.t(3), *tsc = m.t(4);
  for (int64_t r = r0; r < r1; ++r) {
    float* yr = y + r * d;
    const float* cr = c + r * d;
    if (cb != nullptr)
      for (int64_t i = 0; i < d; ++i) yr[i] += cr[i] + cb[i];
    else
      for (int64_t i = 0; i < d; ++i) yr[i] += cr[i];
    const auto [mean, rstd] = row_moments(yr, d, eps);
    const int64_t b = r / (nf * t), f = (r / t) % nf;
    const float *esh = m.em(b, f, 3), *esc = m.em(b, f, 4);
    float* hr = h + r * d;
    for (int64_t i = 0; i < d; ++i) hr[i] = (yr[i] - mean) * rstd * (1.0f + (tsc[i] + esc[i])) + (tsh[i] + esh[i]);
  }
}

// After the FFN: y += (f + fb) c_gate (vector 5), f row-major [R, D] (with its bias: fb null) or feature-major [D, R]
// (ld: its row stride), read in tiles of 16 tokens so that both sides stay in L1.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void gate_residual_ffn_rows(float* y, const float* f, bool feature_major, int64_t ld, const float* fb, const Mod& m,
                            int64_t r0, int64_t r1, int64_t t, int64_t nf) {
  const int64_t d = m.d;
  const float* tg = m.t(5);
  constexpr int64_t kTile = 16;
  float tile[kTile * 512];
  for (int64_t s = r0; s < r1; s += kTile) {
    const int64_t e = std::min(s + kTile, r1);
    for (int64_t i0 = 0; i0 < d; i0 += 512) {
      const int64_t i1 = std::min(i0 + 512, d), w = i1 - i0;
      const float* src;
      int64_t src_ld;
      if (feature_major) {  // transpose the [w, e - s] block into tile [e - s, w], bias added
        for (int64_t i = i0; i < i1; ++i) {
          const float* fr = f + i * ld + s;
          const float bi = fb != nullptr ? fb[i] : 0.0f;
          for (int64_t r = 0; r < e - s; ++r) tile[r * w + (i - i0)] = fr[r] + bi;
        }
        src = tile;
        src_ld = w;
      } else {
        src = f + s * ld + i0;
        src_ld = ld;
      }
      for (int64_t r = s; r < e; ++r) {
        const int64_t b = r / (nf * t), fr = (r / t) % nf;
        const float *eg = m.em(b, fr, 5) + i0, *tgr = tg + i0, *sr = src + (r - s) * src_ld;
        float* yr = y + r * d + i0;
        for (int64_t i = 0; i < w; ++i) yr[i] += sr[i] * (tgr[i] + eg[i]);
      }
    }
  }
}

// exp(x) for x <= 0 (a softmax's shifted scores): Cephes' expf, 2^n times a degree-6 polynomial of the remainder,
// within 2 ulp; plain arithmetic that the compiler vectorises (libm's expf does not, without -ffast-math).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.3f);  // exp underflows to (almost) 0 below; keeps 2^n a normal float
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln 2, ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// softmax(q k^T / sqrt(Dh)) v for query rows [i0, i1) of head h of batch b, q [B, N, H, Dh] against k, v [B, L, H, Dh]
// with L <= 64 (a prompt's text tokens), into out [B, N, H, Dh] contiguous. kt [Dh, Lp]: this head's keys transposed,
// zero-padded to Lp = L rounded up to 16; Dh a multiple of 16. The explicit-softmax path of attention.attention (two
// batched matmuls and a softmax) to float rounding; there each of those kernels costs more to launch than to run.
//
// Portable form: four queries at a time against 16 keys, and 16 features of the weighted value sum at a time.
void short_attention_rows(const float* q, const int64_t* qs, const float* kt, const float* v, const int64_t* vs,
                          float* out, int64_t b, int64_t h, int64_t i0, int64_t i1, int64_t n, int64_t heads,
                          int64_t dh, int64_t l, int64_t lp, float scale) {
  constexpr int R = 4, K = 16;
  float s[R][64];
  for (int64_t i = i0; i < i1; i += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, i1 - i));
    const float* qr[R];
    for (int r = 0; r < R; ++r) qr[r] = q + b * qs[0] + (i + std::min(r, rows - 1)) * qs[1] + h * qs[2];
    for (int64_t j0 = 0; j0 < lp; j0 += K) {
      float acc[R][K] = {};
      for (int64_t c = 0; c < dh; ++c)
        for (int r = 0; r < R; ++r)
          for (int j = 0; j < K; ++j) acc[r][j] += qr[r][c] * kt[c * lp + j0 + j];
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < K; ++j) s[r][j0 + j] = acc[r][j] * scale;
    }
    float inv[R];
    for (int r = 0; r < R; ++r) {
      float mx = -INFINITY;
      for (int64_t j = 0; j < l; ++j) mx = std::max(mx, s[r][j]);
      float sum = 0.0f;
      for (int64_t j = 0; j < l; ++j) {
        s[r][j] = exp_nonpositive(s[r][j] - mx);
        sum += s[r][j];
      }
      inv[r] = 1.0f / sum;
    }
    for (int64_t c0 = 0; c0 < dh; c0 += K) {
      float acc[R][K] = {};
      for (int64_t j = 0; j < l; ++j) {
        const float* vr = v + b * vs[0] + j * vs[1] + h * vs[2] + c0;
        for (int r = 0; r < R; ++r)
          for (int c = 0; c < K; ++c) acc[r][c] += s[r][j] * vr[c];
      }
      for (int r = 0; r < rows; ++r) {
        float* o = out + ((b * n + i + r) * heads + h) * dh + c0;
        for (int c = 0; c < K; ++c) o[c] = acc[r][c] * inv[r];
      }
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

// exp_nonpositive on eight lanes.
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// The register tile of every AVX2 product here: acc[r] (16 floats, two vectors) = sum over c < kdim of
// a[r * a_rs + c * a_cs] * b[c * ldb .. c * ldb + 16), for r < R. Per step of c, two vector loads of b and R
// broadcasts of a feed 2R independent FMAs, with nothing packed: a's rows (or columns, a_cs != 1) are read where they
// lie. R = 4 or 6 keeps the accumulators, b's two vectors and a broadcast within the 16 vector registers.
template <int R>
__attribute__((target("avx2,fma"), always_inline)) inline void fma_tile_r16(const float* a, int64_t a_rs, int64_t a_cs,
                                                                            const float* b, int64_t ldb, int64_t kdim,
                                                                            __m256 (*acc)[2]) {
  __m256 t[R][2];
  for (int r = 0; r < R; ++r) t[r][0] = t[r][1] = _mm256_setzero_ps();
  for (int64_t c = 0; c < kdim; ++c, a += a_cs, b += ldb) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 ab = _mm256_broadcast_ss(a + r * a_rs);
      t[r][0] = _mm256_fmadd_ps(ab, b0, t[r][0]);
      t[r][1] = _mm256_fmadd_ps(ab, b1, t[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    acc[r][0] = t[r][0];
    acc[r][1] = t[r][1];
  }
}

// acc[r] * scale stored to y + r * ldy (16 floats), for r < rows.
__attribute__((target("avx2,fma"), always_inline)) inline void store_tile_r16(const __m256 (*acc)[2], int rows,
                                                                              const float* scale, float* y,
                                                                              int64_t ldy) {
  for (int r = 0; r < rows; ++r) {
    const __m256 s = _mm256_set1_ps(scale[r]);
    _mm256_storeu_ps(y + r * ldy, _mm256_mul_ps(acc[r][0], s));
    _mm256_storeu_ps(y + r * ldy + 8, _mm256_mul_ps(acc[r][1], s));
  }
}

// short_attention_rows with AVX2 tiles: per four queries, the scores of 16 keys in eight accumulators (two vectors of
// keys per Dh step, one broadcast query element per row), the softmax eight lanes at a time, then 16 features of the
// value sum in eight accumulators (one broadcast probability per row and key). Same arithmetic as the portable form.
__attribute__((target("avx2,fma"))) void short_attention_rows_avx2(
    const float* q, const int64_t* qs, const float* kt, const float* v, const int64_t* vs, float* out, int64_t b,
    int64_t h, int64_t i0, int64_t i1, int64_t n, int64_t heads, int64_t dh, int64_t l, int64_t lp, float scale) {
  constexpr int R = 4;
  alignas(32) float s[R][64];
  for (int64_t i = i0; i < i1; i += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, i1 - i));
    const float* qr = q + b * qs[0] + i * qs[1] + h * qs[2];
    float unit[R];
    std::fill(unit, unit + R, scale);
    for (int64_t j0 = 0; j0 < lp; j0 += 16) {  // scores of 16 keys: the R queries' rows against kt's columns
      __m256 acc[R][2];
      if (rows == R) {
        fma_tile_r16<R>(qr, qs[1], 1, kt + j0, lp, dh, acc);
      } else {  // a partial group: one query at a time (the rows past it do not exist)
        for (int r = 0; r < rows; ++r) fma_tile_r16<1>(qr + r * qs[1], 0, 1, kt + j0, lp, dh, acc + r);
      }
      store_tile_r16(acc, rows, unit, s[0] + j0, 64);
    }
    float inv[R];
    const int64_t l8 = l / 8 * 8;
    for (int r = 0; r < R; ++r) {
      float mx = -INFINITY;
      for (int64_t j = 0; j < l; ++j) mx = std::max(mx, s[r][j]);
      const __m256 vmx = _mm256_set1_ps(mx);
      __m256 vsum = _mm256_setzero_ps();
      for (int64_t j = 0; j < l8; j += 8) {
        const __m256 p = exp_nonpositive8(_mm256_sub_ps(_mm256_load_ps(s[r] + j), vmx));
        _mm256_store_ps(s[r] + j, p);
        vsum = _mm256_add_ps(vsum, p);
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, vsum);
      float sum = 0.0f;
      for (int j = 0; j < 8; ++j) sum += lanes[j];
      for (int64_t j = l8; j < l; ++j) {
        s[r][j] = exp_nonpositive(s[r][j] - mx);
        sum += s[r][j];
      }
      inv[r] = 1.0f / sum;
    }
    for (int64_t c0 = 0; c0 < dh; c0 += 16) {  // 16 output features: the R rows of probabilities against V's rows
      __m256 acc[R][2];
      fma_tile_r16<R>(s[0], 64, 1, v + b * vs[0] + h * vs[2] + c0, vs[1], l, acc);  // rows past `rows`: not stored
      store_tile_r16(acc, rows, inv, out + ((b * n + i) * heads + h) * dh + c0, heads * dh);
    }
  }
}

// gate_residual_ffn_rows for a feature-major f [D, R] with AVX2: 8 tokens x 8 features at a time, the 8 x 8 block
// transposed in registers (unpack / shuffle / lane permute), the bias row added and the gate applied per token row.
// Rows [r0, r1) with r1 - r0 and D multiples of 8 (the caller handles the rest with the portable form).
__attribute__((target("avx2,fma"))) void gate_residual_ffn_fm_avx2(float* y, const float* f, int64_t ld,
                                                                  const float* fb, const Mod& m, int64_t r0,
                                                                  int64_t r1, int64_t t, int64_t nf) {
  const int64_t d = m.d;
  const float* tg = m.t(5);
  for (int64_t r = r0; r < r1; r += 8) {
    const float* eg[8];
    for (int k = 0; k < 8; ++k) eg[k] = m.em((r + k) / (nf * t), ((r + k) / t) % nf, 5);
    for (int64_t i = 0; i < d; i += 8) {
      __m256 row[8];
      for (int k = 0; k < 8; ++k) row[k] = _mm256_loadu_ps(f + (i + k) * ld + r);  // feature i + k, tokens r..r+7
      const __m256 t0 = _mm256_unpacklo_ps(row[0], row[1]), t1 = _mm256_unpackhi_ps(row[0], row[1]);
      const __m256 t2 = _mm256_unpacklo_ps(row[2], row[3]), t3 = _mm256_unpackhi_ps(row[2], row[3]);
      const __m256 t4 = _mm256_unpacklo_ps(row[4], row[5]), t5 = _mm256_unpackhi_ps(row[4], row[5]);
      const __m256 t6 = _mm256_unpacklo_ps(row[6], row[7]), t7 = _mm256_unpackhi_ps(row[6], row[7]);
      const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      const __m256 col[8] = {  // token r + k, features i..i+7
          _mm256_permute2f128_ps(s0, s4, 0x20), _mm256_permute2f128_ps(s1, s5, 0x20),
          _mm256_permute2f128_ps(s2, s6, 0x20), _mm256_permute2f128_ps(s3, s7, 0x20),
          _mm256_permute2f128_ps(s0, s4, 0x31), _mm256_permute2f128_ps(s1, s5, 0x31),
          _mm256_permute2f128_ps(s2, s6, 0x31), _mm256_permute2f128_ps(s3, s7, 0x31)};
      const __m256 bias = fb != nullptr ? _mm256_loadu_ps(fb + i) : _mm256_setzero_ps();
      const __m256 tgi = _mm256_loadu_ps(tg + i);
      for (int k = 0; k < 8; ++k) {
        float* yr = y + (r + k) * d + i;
        const __m256 gate = _mm256_add_ps(tgi, _mm256_loadu_ps(eg[k] + i));
        _mm256_storeu_ps(yr, _mm256_fmadd_ps(_mm256_add_ps(col[k], bias), gate, _mm256_loadu_ps(yr)));
      }
    }
  }
}

// Attention of a block of up to 48 queries of one head over a cached window of m keys (m * 48 floats of scores fit
// in L2), for q [B, N, H, Dh], k, v [B, M, H, Dh] (any strides with unit stride along Dh, Dh a multiple of 16) into
// out [B, N, H, Dh] contiguous. The scores are computed transposed, S^T = K (scale q)^T [m, 48], so that both products
// run as register tiles of 6 x 16 with no packing and no transpose of the cache: S^T as 6 keys (broadcast elements of
// K's rows) x 16 queries (vectors of the transposed query block qt [Dh, 48]), the softmax down each column with eight
// queries per vector (no horizontal reductions), and O = P V as 6 queries (broadcast probabilities) x 16 features
// (vectors of V's rows). On this project's 2-core VM 1.15-1.2x faster than torch's CPU flash attention for the small
// preset's chunk against its window (benchmarks/results; tests/test_native_blocks.py checks it against SDPA).
constexpr int kWindowQueries = 48, kWindowTile = 6;
static_assert(kWindowQueries % kWindowTile == 0 && kWindowQueries % 16 == 0, "whole tiles per query block");

// Queries [i0, i0 + qn) (qn <= 48) of head h of batch b; qt [Dh, 48] and st [m, 48] scratch.
__attribute__((target("avx2,fma"))) void window_attention_block_avx2(
    const float* q, const int64_t* qs, const float* k, const int64_t* ks, const float* v, const int64_t* vs, float* out,
    int64_t b, int64_t h, int64_t i0, int64_t qn, int64_t n, int64_t heads, int64_t dh, int64_t m, float scale,
    float* qt, float* st) {
  constexpr int QB = kWindowQueries, R = kWindowTile;
  for (int64_t i = 0; i < QB; ++i) {  // qt = scale q^T, zero columns past qn
    const float* qr = q + b * qs[0] + (i0 + std::min(i, qn - 1)) * qs[1] + h * qs[2];
    const float s = i < qn ? scale : 0.0f;
    for (int64_t c = 0; c < dh; ++c) qt[c * QB + i] = qr[c] * s;
  }
  const float* kb = k + b * ks[0] + h * ks[2];
  const float* vb = v + b * vs[0] + h * vs[2];
  int64_t j = 0;
  float ones[R];
  std::fill(ones, ones + R, 1.0f);
  __m256 acc[R][2];
  for (; j + R <= m; j += R)  // S^T rows j..j+R: R keys' rows against 16 columns of qt at a time
    for (int c0 = 0; c0 < QB; c0 += 16) {
      fma_tile_r16<R>(kb + j * ks[1], ks[1], 1, qt + c0, QB, dh, acc);
      store_tile_r16(acc, R, ones, st + j * QB + c0, QB);
    }
  for (; j < m; ++j)
    for (int c0 = 0; c0 < QB; c0 += 16) {
      fma_tile_r16<1>(kb + j * ks[1], 0, 1, qt + c0, QB, dh, acc);
      store_tile_r16(acc, 1, ones, st + j * QB + c0, QB);
    }
  constexpr int NV = QB / 8;
  __m256 mx[NV], sum[NV];
  for (int u = 0; u < NV; ++u) {
    mx[u] = _mm256_set1_ps(-INFINITY);
    sum[u] = _mm256_setzero_ps();
  }
  for (int64_t jj = 0; jj < m; ++jj)
    for (int u = 0; u < NV; ++u) mx[u] = _mm256_max_ps(mx[u], _mm256_loadu_ps(st + jj * QB + 8 * u));
  for (int64_t jj = 0; jj < m; ++jj)
    for (int u = 0; u < NV; ++u) {
      const __m256 p = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(st + jj * QB + 8 * u), mx[u]));
      _mm256_storeu_ps(st + jj * QB + 8 * u, p);
      sum[u] = _mm256_add_ps(sum[u], p);
    }
  alignas(32) float inv[QB];
  for (int u = 0; u < NV; ++u) _mm256_store_ps(inv + 8 * u, _mm256_div_ps(_mm256_set1_ps(1.0f), sum[u]));
  for (int64_t i = 0; i < qn; i += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, qn - i));
    for (int64_t c0 = 0; c0 < dh; c0 += 16) {  // R queries (columns of P^T) against 16 features of V's rows
      fma_tile_r16<R>(st + i, 1, QB, vb + c0, vs[1], m, acc);  // rows past qn read padding columns (i + R <= QB)
      store_tile_r16(acc, rows, inv + i, out + ((b * n + i0 + i) * heads + h) * dh + c0, heads * dh);
    }
  }
}

// y [M, N] = x [M, K] wt [K, N] (both contiguous, N a multiple of 16) for output panels [p0, p1) of 16 columns:
// per panel, 6 rows x 16 columns at a time in twelve accumulators, broadcasting x's elements against two vectors of
// wt's row, so that the panel of wt (K x 16) stays in L1 while the rows of x stream by. For the attention projections
// of chunk-sized inputs (K = D, a few hundred rows) 1.1-1.2x faster than MKL's sgemm on this project's 2-core VM,
// which packs both operands on every call (benchmarks: README, Performance).
__attribute__((target("avx2,fma"))) void linear_t_panels_avx2(const float* x, const float* wt, float* y, int64_t m,
                                                              int64_t n, int64_t k, int64_t p0, int64_t p1) {
  constexpr int R = 6;
  float ones[R];
  std::fill(ones, ones + R, 1.0f);
  __m256 acc[R][2];
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t o = p * 16;
    int64_t i = 0;
    for (; i + R <= m; i += R) {
      fma_tile_r16<R>(x + i * k, k, 1, wt + o, n, k, acc);
      store_tile_r16(acc, R, ones, y + i * n + o, n);
    }
    for (; i < m; ++i) {
      fma_tile_r16<1>(x + i * k, 0, 1, wt + o, n, k, acc);
      store_tile_r16(acc, 1, ones, y + i * n + o, n);
    }
  }
}

bool cpu_has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#else
bool cpu_has_avx2_fma() { return false; }
#endif

}  // namespace

static void check_float_cpu(const Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), what, " must be a float32 CPU tensor");
}

static const float* ptr_or_null(const Tensor& t) { return present(t) ? t.data_ptr<float>() : nullptr; }

static int64_t grain(int64_t d) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(d, 1)); }

// table [1, 6, D] or [6, D] (a block's scale_shift_table), e [B, F, 6, D] contiguous float32; frames from f0 on.
static Mod make_mod(const Tensor& table, const Tensor& e, int64_t f0) {
  TORCH_CHECK(e.dim() == 4 && e.size(2) == 6 && e.is_contiguous(), "e must be a contiguous [B, F, 6, D] tensor");
  check_float_cpu(e, "e");
  TORCH_CHECK(table.numel() == 6 * e.size(3) && table.is_contiguous(), "the scale_shift_table must be [1, 6, D]");
  check_float_cpu(table, "the scale_shift_table");
  TORCH_CHECK(f0 >= 0 && f0 <= e.size(1), "frame offset out of range");
  return Mod{table.data_ptr<float>(), e.data_ptr<float>(), e.size(1), e.size(3), f0};
}

// x [B, F, T, D] float32 contiguous, frames f0 .. f0 + F of e [B, F', 6, D]: LayerNorm(x) (1 + scale) + shift with
// shift = table[j] + e[:, :, j], scale = table[j + 1] + e[:, :, j + 1] (j = 0 before the self-attention, 3 before the
// FFN): _modulated_norm with a norm without gain or bias, to float rounding; a new tensor [B, F, T, D].
static Tensor modulated_norm(const Tensor& x, const Tensor& table, const Tensor& e, int64_t j, int64_t f0,
                             double eps) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "modulated_norm: x must be a contiguous [B, F, T, D] tensor");
  check_float_cpu(x, "modulated_norm: x");
  TORCH_CHECK(j == 0 || j == 3, "modulated_norm: j must be 0 (norm1) or 3 (norm3)");
  const Mod m = make_mod(table, e, f0);
  TORCH_CHECK(e.size(0) == x.size(0) && x.size(1) <= e.size(1) - f0 && x.size(3) == m.d,
              "modulated_norm: x [B, F, T, D] must match e [B, >= F + f0, 6, D]");
  auto out = at::empty_like(x);
  const int64_t t = x.size(2), nf = x.size(1);
  const float* px = x.data_ptr<float>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, x.numel() / m.d, grain(m.d), [&](int64_t r0, int64_t r1) {
    modulated_norm_rows(px, po, m, static_cast<int>(j), r0, r1, t, nf, static_cast<float>(eps));
  });
  return out;
}

// The self-attention's residual and the cross-attention's norm: y = x[:, drop:] + (a + ob) gate, h = LayerNorm(y) w +
// nb if `norm` (else h is y). x [B, drop + F, T, D] contiguous (its first `drop` frames, a finished chunk's, only
// wrote their K/V), a [B, F*T, D] contiguous (the output projection without its bias ob [D]), gate = table[2] +
// e[:, drop + f, 2]. Returns (y, h), new tensors [B, F, T, D].
static std::vector<Tensor> gate_residual_norm(const Tensor& x, const Tensor& a, const Tensor& ob, const Tensor& table,
                                              const Tensor& e, int64_t drop, bool norm, const Tensor& w,
                                              const Tensor& nb, double eps) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && drop >= 0 && drop < x.size(1),
              "gate_residual_norm: x must be a contiguous [B, drop + F, T, D] tensor");
  check_float_cpu(x, "gate_residual_norm: x");
  check_float_cpu(a, "gate_residual_norm: a");
  const Mod m = make_mod(table, e, drop);
  const int64_t b = x.size(0), nf = x.size(1) - drop, t = x.size(2), d = x.size(3);
  TORCH_CHECK(a.is_contiguous() && a.numel() == b * nf * t * d && d == m.d && e.size(0) == b && x.size(1) <= e.size(1),
              "gate_residual_norm: a must be a contiguous [B, F*T, D] tensor, e [B, >= drop + F, 6, D]");
  TORCH_CHECK(!present(ob) || ob.numel() == d, "gate_residual_norm: the bias must be [D]");
  auto y = at::empty({b, nf, t, d}, x.options());
  auto h = norm ? at::empty_like(y) : y;
  const float *px = x.data_ptr<float>(), *pa = a.data_ptr<float>(), *pb = ptr_or_null(ob);
  const float *pw = ptr_or_null(w), *pn = ptr_or_null(nb);
  float *py = y.data_ptr<float>(), *ph = norm ? h.data_ptr<float>() : nullptr;
  at::parallel_for(0, b * nf * t, grain(d), [&](int64_t r0, int64_t r1) {
    gate_residual_norm_rows(px, pa, pb, py, ph, pw, pn, m, drop, r0, r1, t, nf, static_cast<float>(eps));
  });
  return {y, h};
}

// The cross-attention's residual and the FFN's norm: y += c + cb in place, then h = LayerNorm(y) (1 + c_scale) +
// c_shift (vectors 3, 4 of frames f0 ..). y [B, F, T, D], c [B, F*T, D] contiguous (cross-attention output projection
// without its bias cb). Returns h, a new tensor [B, F, T, D].
static Tensor residual_modulated_norm_(Tensor y, const Tensor& c, const Tensor& cb, const Tensor& table,
                                       const Tensor& e, int64_t f0, double eps) {
  TORCH_CHECK(y.dim() == 4 && y.is_contiguous() && c.is_contiguous() && c.numel() == y.numel(),
              "residual_modulated_norm_: y [B, F, T, D] and c [B, F*T, D] must be contiguous and of one size");
  check_float_cpu(y, "residual_modulated_norm_: y");
  check_float_cpu(c, "residual_modulated_norm_: c");
  const Mod m = make_mod(table, e, f0);
  TORCH_CHECK(y.size(3) == m.d && e.size(0) == y.size(0) && y.size(1) <= e.size(1) - f0,
              "residual_modulated_norm_: y [B, F, T, D] must match e [B, >= F + f0, 6, D]");
  TORCH_CHECK(!present(cb) || cb.numel() == m.d, "residual_modulated_norm_: the bias must be [D]");
  auto h = at::empty_like(y);
  const int64_t t = y.size(2), nf = y.size(1);
  float *py = y.data_ptr<float>(), *ph = h.data_ptr<float>();
  const float *pc = c.data_ptr<float>(), *pb = ptr_or_null(cb);
  at::parallel_for(0, y.numel() / m.d, grain(m.d), [&](int64_t r0, int64_t r1) {
    residual_modulated_norm_rows(py, pc, pb, ph, m, r0, r1, t, nf, static_cast<float>(eps));
  });
  return h;
}

// The FFN's residual: y += (f + fb) c_gate in place (vector 5 of frames f0 ..), y [B, F, T, D] contiguous, f the FFN
// output as [B*F*T, D] (row-major, its bias included: fb empty) or feature-major [D, B*F*T] (fb its bias [D]).
static Tensor gate_residual_ffn_(Tensor y, const Tensor& f, bool feature_major, const Tensor& fb, const Tensor& table,
                                 const Tensor& e, int64_t f0) {
  TORCH_CHECK(y.dim() == 4 && y.is_contiguous(), "gate_residual_ffn_: y must be a contiguous [B, F, T, D] tensor");
  check_float_cpu(y, "gate_residual_ffn_: y");
  check_float_cpu(f, "gate_residual_ffn_: f");
  const Mod m = make_mod(table, e, f0);
  const int64_t rows = y.numel() / y.size(3), d = y.size(3);
  TORCH_CHECK(f.dim() == 2 && f.stride(1) == 1 &&
                  (feature_major ? f.size(0) == d && f.size(1) == rows : f.size(0) == rows && f.size(1) == d),
              "gate_residual_ffn_: f must be [rows, D] (or [D, rows] feature-major) with unit column stride");
  TORCH_CHECK(d == m.d && e.size(0) == y.size(0) && y.size(1) <= e.size(1) - f0,
              "gate_residual_ffn_: y [B, F, T, D] must match e [B, >= F + f0, 6, D]");
  TORCH_CHECK(!present(fb) || fb.numel() == d, "gate_residual_ffn_: the bias must be [D]");
  TORCH_CHECK(feature_major || !present(fb),
              "gate_residual_ffn_: a row-major f carries its bias already (oneDNN adds it); pass an empty fb");
  const int64_t t = y.size(2), nf = y.size(1), ld = f.stride(0);
  float* py = y.data_ptr<float>();
  const float *pf = f.data_ptr<float>(), *pb = ptr_or_null(fb);
  const bool avx2 = feature_major && d % 8 == 0 && cpu_has_avx2_fma();
  at::parallel_for(0, rows, grain(d), [&](int64_t r0, int64_t r1) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (avx2) {
      const int64_t r8 = r0 + (r1 - r0) / 8 * 8;
      gate_residual_ffn_fm_avx2(py, pf, ld, pb, m, r0, r8, t, nf);
      r0 = r8;
    }
#endif
    gate_residual_ffn_rows(py, pf, feature_major, ld, pb, m, r0, r1, t, nf);
  });
  return y;
}

// softmax(q k^T / sqrt(Dh)) v, q [B, N, H, Dh], k, v [B, L, H, Dh] (unit stride along Dh), L <= 64: a new contiguous
// [B, N, H, Dh] (attention._short_key_attention to float rounding). AVX2 tiles where the CPU has them, unless
// `portable` (for tests of the portable form).
static Tensor short_attention(const Tensor& q, const Tensor& k, const Tensor& v, bool portable) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(2) == k.size(2) && q.size(3) == k.size(3) && k.size(1) >= 1 && k.size(1) <= 64,
              "short_attention: q [B, N, H, Dh] and k, v [B, L, H, Dh] with 1 <= L <= 64");
  TORCH_CHECK(q.size(3) % 16 == 0, "short_attention: Dh must be a multiple of 16");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "short_attention: Dh must have unit stride");
  check_float_cpu(q, "short_attention: q");
  check_float_cpu(k, "short_attention: k");
  check_float_cpu(v, "short_attention: v");
  const int64_t b = q.size(0), n = q.size(1), heads = q.size(2), dh = q.size(3), l = k.size(1);
  const int64_t lp = (l + 15) / 16 * 16;
  auto out = at::empty({b, n, heads, dh}, q.options());
  const int64_t qs[3] = {q.stride(0), q.stride(1), q.stride(2)}, ks[3] = {k.stride(0), k.stride(1), k.stride(2)},
                vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  const float *pq = q.data_ptr<float>(), *pk = k.data_ptr<float>(), *pv = v.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const float scale = static_cast<float>(std::pow(static_cast<double>(dh), -0.5));
  constexpr int64_t kRows = 16;  // queries per task
  const bool avx2 = !portable && cpu_has_avx2_fma();
  const int64_t blocks = (n + kRows - 1) / kRows;
  at::parallel_for(0, b * heads * blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> kt(dh * lp, 0.0f);  // the head's keys as [Dh, Lp], zero-padded, built once per head
    int64_t built = -1;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bh = task / blocks, i0 = (task % blocks) * kRows, bi = bh / heads, h = bh % heads;
      if (bh != built) {
        for (int64_t j = 0; j < l; ++j) {
          const float* kr = pk + bi * ks[0] + j * ks[1] + h * ks[2];
          for (int64_t c = 0; c < dh; ++c) kt[c * lp + j] = kr[c];
        }
        built = bh;
      }
      const int64_t i1 = std::min(i0 + kRows, n);
#if defined(__x86_64__) && defined(__GNUC__)
      if (avx2) {
        short_attention_rows_avx2(pq, qs, kt.data(), pv, vs, po, bi, h, i0, i1, n, heads, dh, l, lp, scale);
        continue;
      }
#endif
      short_attention_rows(pq, qs, kt.data(), pv, vs, po, bi, h, i0, i1, n, heads, dh, l, lp, scale);
    }
  });
  return out;
}

// x [M, K] @ w^T without bias, w [N, K]: through linear_t_panels_avx2 with wt = w^T [K, N] contiguous where it
// applies (AVX2, N a multiple of 16, wt given), else at::mm. The result is contiguous [M, N] either way.
static Tensor linear_t(const Tensor& x, const Tensor& w, const Tensor& wt) {
  const bool own = present(wt) && cpu_has_avx2_fma() && x.dim() == 2 && wt.dim() == 2 && x.size(1) == wt.size(0) &&
                   wt.size(1) % 16 == 0 && wt.is_contiguous() && x.scalar_type() == at::kFloat &&
                   wt.scalar_type() == at::kFloat;
  if (!own) return at::mm(x, w.t());
  auto xc = x.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1), n = wt.size(1);
  auto y = at::empty({m, n}, x.options());
#if defined(__x86_64__) && defined(__GNUC__)
  const float *px = xc.data_ptr<float>(), *pw = wt.data_ptr<float>();
  float* py = y.data_ptr<float>();
  at::parallel_for(0, n / 16, 1, [&](int64_t p0, int64_t p1) { linear_t_panels_avx2(px, pw, py, m, n, k, p0, p1); });
#endif
  return y;
}

// softmax(q k^T / sqrt(Dh)) v for q [B, N, H, Dh] against a window k, v [B, M, H, Dh] (unit stride along Dh): a new
// contiguous [B, N, H, Dh]. With key_ends [N] (int64; empty: none) query i attends only to keys [0, key_ends[i]): the
// block-causal attention of a cache-less forward, where each query sees a prefix of the sequence.
// window_attention_block_avx2 where it applies (AVX2, Dh a multiple of 16, M <= 2048 so that a block's scores stay in
// L2), its query blocks cut where key_ends changes, else torch's SDPA (with the prefix mask), unless `sdpa` (tests).
static Tensor window_attention(const Tensor& q, const Tensor& k, const Tensor& v, bool sdpa, const Tensor& key_ends) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(2) == k.size(2) && q.size(3) == k.size(3) && k.size(1) >= 1,
              "window_attention: q [B, N, H, Dh] and k, v [B, M, H, Dh]");
  const int64_t b = q.size(0), n = q.size(1), heads = q.size(2), dh = q.size(3), m = k.size(1);
  const bool prefix = present(key_ends);
  if (prefix) {
    TORCH_CHECK(key_ends.dim() == 1 && key_ends.size(0) == n && key_ends.scalar_type() == at::kLong &&
                    key_ends.device().is_cpu(),
                "window_attention: key_ends must be an int64 CPU tensor [N] = [", n, "]");
    TORCH_CHECK(n == 0 || (key_ends.min().item<int64_t>() >= 1 && key_ends.max().item<int64_t>() <= m),
                "window_attention: every key_ends entry must lie in [1, M] = [1, ", m, "]");
  }
  const bool own = !sdpa && cpu_has_avx2_fma() && dh % 16 == 0 && m <= 2048 && q.stride(3) == 1 &&
                   k.stride(3) == 1 && v.stride(3) == 1 && q.scalar_type() == at::kFloat &&
                   k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat;
  if (!own) {
    std::optional<Tensor> mask;
    if (prefix) mask = at::arange(m, key_ends.options()).unsqueeze(0) < key_ends.unsqueeze(1);  // [N, M]
    return at::scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        .transpose(1, 2);
  }
  auto out = at::empty({b, n, heads, dh}, q.options());
#if defined(__x86_64__) && defined(__GNUC__)
  // the query blocks: at most kWindowQueries queries that share one key range
  std::vector<std::array<int64_t, 3>> blocks;  // {i0, queries, keys}
  const Tensor ends_c = prefix ? key_ends.contiguous() : Tensor();
  const int64_t* ends = prefix ? ends_c.data_ptr<int64_t>() : nullptr;
  for (int64_t i0 = 0; i0 < n;) {
    const int64_t keys = prefix ? ends[i0] : m;
    int64_t i1 = i0 + 1;
    while (i1 < n && i1 - i0 < kWindowQueries && (!prefix || ends[i1] == keys)) ++i1;
    blocks.push_back({i0, i1 - i0, keys});
    i0 = i1;
  }
  const int64_t qs[3] = {q.stride(0), q.stride(1), q.stride(2)}, ks[3] = {k.stride(0), k.stride(1), k.stride(2)},
                vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  const float *pq = q.data_ptr<float>(), *pk = k.data_ptr<float>(), *pv = v.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const float scale = static_cast<float>(std::pow(static_cast<double>(dh), -0.5));
  const int64_t nb = static_cast<int64_t>(blocks.size());
  at::parallel_for(0, b * heads * nb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qt(dh * kWindowQueries), st(m * kWindowQueries);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bh = task / nb;
      const auto& blk = blocks[task % nb];
      window_attention_block_avx2(pq, qs, pk, ks, pv, vs, po, bh / heads, bh % heads, blk[0], blk[1], n, heads, dh,
                                  blk[2], scale, qt.data(), st.data());
    }
  });
#endif
  return out;
}

// y [..., D] float32 contiguous (a fresh projection, without its bias): y + bias (empty: none), RMS-normalised over D
// with gain g [D] (empty: none), then, if cs [N, Dh/2, 2] is given (not empty), rotated per head of Dh = 2 cs.size(1)
// with token r % N's angles; in place. The bias of linear, _rms_normed and apply_rope_cis, to float rounding.
static Tensor rms_rope_(Tensor y, const Tensor& bias, const Tensor& gain, const Tensor& cs, double eps) {
  TORCH_CHECK(y.is_contiguous() && y.scalar_type() == at::kFloat && y.device().is_cpu(),
              "rms_rope_: y must be a contiguous float32 CPU tensor [..., D]");
  const int64_t d = y.size(-1), rows = y.numel() / std::max<int64_t>(d, 1);
  const bool rope = present(cs);
  TORCH_CHECK(!present(bias) || (bias.numel() == d && bias.is_contiguous()), "rms_rope_: bias must be [D]");
  TORCH_CHECK(!present(gain) || (gain.numel() == d && gain.is_contiguous()), "rms_rope_: gain must be [D]");
  TORCH_CHECK(!rope || (cs.dim() == 3 && cs.size(2) == 2 && cs.is_contiguous() && d % (2 * cs.size(1)) == 0 &&
                        rows % cs.size(0) == 0),
              "rms_rope_: the RoPE table must be [N, Dh/2, 2] with Dh dividing D and N dividing the rows");
  float* data = y.data_ptr<float>();
  const float *b = ptr_or_null(bias), *g = ptr_or_null(gain), *t = rope ? cs.data_ptr<float>() : nullptr;
  const int64_t head_dim = rope ? 2 * cs.size(1) : d, tokens = rope ? cs.size(0) : 1;
  at::parallel_for(0, rows, grain(d), [&](int64_t r0, int64_t r1) {
    rms_rope_rows(data, d, b, g, t, r0, r1, d, head_dim, tokens, static_cast<float>(eps));
  });
  return y;
}

// The chunk's K/V into their cache slots: cache_k[layer, b, h, slots[i]] = k[b, i, h] and the same for v plus its
// bias vb [H*Dh] (empty: none). cache_k, cache_v [L, B, H, S, Dh] contiguous; k, v [B, n, H, Dh] with heads and Dh
// packed in each row. KVCache.write (index_copy_ of the transposed K and V) in one pass.
static void write_kv(const Tensor& cache_k, const Tensor& cache_v, int64_t layer, const Tensor& slots, const Tensor& k,
                     const Tensor& v, const Tensor& vb) {
  TORCH_CHECK(cache_k.dim() == 5 && cache_k.is_contiguous() && cache_v.sizes() == cache_k.sizes() &&
                  cache_v.is_contiguous(), "write_kv: the cache must be contiguous [L, B, H, S, Dh] K and V");
  check_float_cpu(cache_k, "write_kv: the cache");
  check_float_cpu(cache_v, "write_kv: the cache");
  const int64_t b = cache_k.size(1), heads = cache_k.size(2), s = cache_k.size(3), dh = cache_k.size(4);
  const int64_t n = slots.numel();
  TORCH_CHECK(layer >= 0 && layer < cache_k.size(0), "write_kv: layer out of range");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.is_contiguous(),
              "write_kv: slots must be a contiguous int64 vector");
  for (const Tensor* t : {&k, &v})
    TORCH_CHECK(t->dim() == 4 && t->size(0) == b && t->size(1) == n && t->size(2) == heads && t->size(3) == dh &&
                    t->stride(3) == 1 && t->stride(2) == dh && t->scalar_type() == at::kFloat,
                "write_kv: k and v must be float32 [B, n, H, Dh] with packed heads, n = the number of slots");
  TORCH_CHECK(!present(vb) || vb.numel() == heads * dh, "write_kv: the value bias must be [H*Dh]");
  const int64_t* ps = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(ps[i] >= 0 && ps[i] < s, "write_kv: slot ", ps[i], " out of range");
  float *pck = cache_k.data_ptr<float>() + layer * b * heads * s * dh, *pcv = cache_v.data_ptr<float>() + layer * b * heads * s * dh;
  const float *pk = k.data_ptr<float>(), *pv = v.data_ptr<float>(), *pb = ptr_or_null(vb);
  at::parallel_for(0, b * n, grain(2 * heads * dh), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bi = r / n, i = r % n;
      const float *kr = pk + bi * k.stride(0) + i * k.stride(1), *vr = pv + bi * v.stride(0) + i * v.stride(1);
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t off = ((bi * heads + h) * s + ps[i]) * dh;
        std::memcpy(pck + off, kr + h * dh, dh * sizeof(float));
        float* dst = pcv + off;
        const float* src = vr + h * dh;
        if (pb != nullptr)
          for (int64_t c = 0; c < dh; ++c) dst[c] = src[c] + pb[h * dh + c];
        else
          std::memcpy(dst, src, dh * sizeof(float));
      }
    }
  });
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

// The FFN W2 GELU(W1 x + b1) (+ b2) of x [..., D], as the blocks consume it: through oneDNN with the GELU fused into
// its first product (FeedForward._forward_onednn, the same ops): [N, D] with b2 added; or feature-major through BLAS
// with the bias and GELU in one pass (FeedForward._forward_feature_major up to the GELU's rounding: it uses torch's
// sigmoid, this the rational tanh): [D, N] without b2, which the residual update adds (gate_residual_ffn_).
static Tensor feed_forward_raw(const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
                               bool onednn) {
  const int64_t d = x.size(-1);
  Tensor h;
  if (onednn) {
    {
      StageTimer st(S_FFN_UP);  // with its GELU
      h = linear_pointwise(x.reshape({-1, d}), w1, b1, "gelu", "tanh");
    }
    StageTimer st(S_FFN_DOWN);
    return linear_pointwise(h, w2, b2, "none", "");
  }
  {
    StageTimer st(S_FFN_UP);
    h = at::mm(w1, x.reshape({-1, d}).t());  // [ffn_dim, N]
  }
  {
    StageTimer st(S_GELU);
    bias_gelu_tanh_(h, b1);
  }
  StageTimer st(S_FFN_DOWN);
  return at::mm(w2, h);  // [D, N]
}

// The whole FFN of x [..., D] -> [..., D] (for the kernel choice and tests): feed_forward_raw, b2 added and
// transposed back if feature-major.
static Tensor feed_forward(const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
                           bool onednn) {
  auto f = feed_forward_raw(x, w1, b1, w2, b2, onednn);
  return (onednn ? f : f.t().add(b2)).reshape(x.sizes());
}

namespace {

struct Chunk {  // one chunk's part of a ChunkPlan
  Tensor slots;       // the token slots it writes
  int64_t visible;    // the filled prefix of the buffer it reads once written
  Tensor read_index;  // or the slots it reads (gathered)
};

struct Cache {  // KVCache.write / KVCache.view
  Tensor k, v;  // [L, B, H, C*T, Dh]
  void write(int64_t layer, const Chunk& chunk, const Tensor& k_new, const Tensor& v_new, const Tensor& v_bias) const {
    write_kv(k, v, layer, chunk.slots, k_new, v_new, v_bias);
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
// Without cache_k (empty) the forward is cache-less: each block attends to the sequence's own K/V, to all of them or,
// with key_ends [F*T], query i to keys [0, key_ends[i]) (block-causal); no finished chunk, no kv_only.
//
// CausalWanBlock.forward on this path, with the elementwise work between the products fused: each projection's bias
// goes into the pass that reads its output (the q/k norm, the cache write of v, the residual updates), and each
// residual update into the norm that follows it, so that the residual stream is read and written once per update.
static Tensor run_blocks(Tensor x, Tensor e, Tensor rope, std::vector<Tensor> weights, std::vector<Tensor> cross_k,
                         std::vector<Tensor> cross_v, Tensor cache_k, Tensor cache_v, Tensor slots, int64_t visible,
                         Tensor read_index, Tensor pending_slots, int64_t pending_visible, Tensor pending_read_index,
                         int64_t tokens_per_frame, bool kv_only, int64_t heads, double ln_eps, double rms_eps,
                         int64_t short_keys, bool cross_norm, bool ffn_onednn, Tensor key_ends) {
  TORCH_CHECK(weights.size() % N_W == 0, "weights: expected ", N_W, " tensors per block, got ", weights.size());
  const int64_t layers = static_cast<int64_t>(weights.size()) / N_W;
  TORCH_CHECK(cross_k.size() == static_cast<size_t>(layers) && cross_v.size() == cross_k.size(),
              "one cross-attention K/V per block");
  TORCH_CHECK(x.dim() == 3 && x.size(1) % tokens_per_frame == 0, "tokens must be [B, F*T, D]");
  TORCH_CHECK(e.dim() == 4 && e.size(0) == x.size(0) && e.size(1) * tokens_per_frame == x.size(1),
              "e must be [B, F, 6, D] for tokens [B, F*T, D]");
  at::NoGradGuard no_grad;
  const bool cached = present(cache_k);  // else a cache-less forward: each block attends to its own K/V
  TORCH_CHECK(cached || (!present(pending_slots) && !kv_only),
              "a forward without a KV cache has no finished chunk to fuse and no cache pass");
  TORCH_CHECK(cached || !present(key_ends) || key_ends.numel() == x.size(1),
              "key_ends: one key count per token");
  const Cache cache{cache_k, cache_v};
  const Chunk chunk{slots, visible, read_index};
  const bool fused = present(pending_slots);
  const Chunk pending{pending_slots, pending_visible, pending_read_index};
  const int64_t b = x.size(0), d = x.size(2), t = tokens_per_frame, nf0 = x.size(1) / t;
  x = x.contiguous();
  e = e.contiguous();
  auto proj = [](const Tensor& h, const Tensor& w, const Tensor& wt) { return linear_t(h, w, wt); };  // no bias
  auto attention = [&](const Tensor& q, const Tensor& k, const Tensor& v) {  // attention.attention
    if (k.size(1) <= short_keys) return short_attention(q, k, v, false);
    return window_attention(q, k, v, false, Tensor());
  };
  int64_t nf = nf0;
  for (int64_t layer = 0; layer < layers; ++layer) {  // CausalWanBlock.forward
    const Tensor* w = weights.data() + layer * N_W;
    const bool last = layer == layers - 1;
    const int64_t n = nf * t;
    const Tensor& table = w[SST];
    // ---- self-attention over the cache (CachedAttention.attend)
    Tensor h, q, k, v;
    {
      StageTimer st(S_NORM1);
      h = modulated_norm(x.view({b, nf, t, d}), table, e, 0, 0, ln_eps).view({b * n, d});
    }
    {
      StageTimer st(S_QKV);
      k = proj(h, w[K_W], w[K_T]);
      v = proj(h, w[V_W], w[V_T]).view({b, n, heads, -1});  // its bias goes in with the cache write
      if (!(kv_only && last)) q = proj(h, w[Q_W], w[Q_T]);
    }
    {
      StageTimer st(S_QK_NORM_ROPE);
      k = rms_rope_(k, w[K_B], w[NK_G], rope, rms_eps).view({b, n, heads, -1});
      if (q.defined()) q = rms_rope_(q, w[Q_B], w[NQ_G], rope, rms_eps).view({b, n, heads, -1});
    }
    auto attend_one = [&](const Chunk& ch, const Tensor& qq, const Tensor& kk, const Tensor& vv, bool queries) {
      if (!cached) {  // FullAttention: the sequence's own K/V, v with its bias, under the prefix mask if any
        StageTimer st(S_SELF_ATTN);
        const auto vb = present(w[V_B]) ? vv + w[V_B].view({heads, -1}) : vv;
        if (!present(key_ends)) return attention(qq, kk, vb);
        return window_attention(qq, kk, vb, false, key_ends);
      }
      {
        StageTimer st(S_CACHE_WRITE);
        cache.write(layer, ch, kk, vv, w[V_B]);
      }
      if (!queries) return Tensor();
      StageTimer st(S_SELF_ATTN);
      auto kv = cache.view(layer, ch);
      return attention(qq, kv.first, kv.second);
    };
    if (kv_only && last) {  // a cache pass's last block: its K/V only
      attend_one(chunk, q, k, v, false);
      return Tensor();
    }
    Tensor a;
    if (!fused) {
      a = attend_one(chunk, q, k, v, true);
    } else {  // the finished chunk's K/V and queries first, then the chunk's (whose write may evict what it read)
      const int64_t np = pending_slots.numel();
      auto first = attend_one(pending, q.narrow(1, 0, np), k.narrow(1, 0, np), v.narrow(1, 0, np), !last);
      auto rest = attend_one(chunk, q.narrow(1, np, n - np), k.narrow(1, np, n - np), v.narrow(1, np, n - np), true);
      StageTimer st(S_CAT);
      a = first.defined() ? at::cat({first, rest}, 1) : rest;
    }
    const int64_t drop = nf - a.size(1) / t;  // frames of a finished chunk that only wrote their K/V
    nf -= drop;
    const int64_t nn = nf * t;
    const int64_t f0 = nf0 - nf;  // the modulation of this block's remaining frames
    Tensor ao, y, h2, cq, ca, co, h3, f;
    {
      StageTimer st(S_OUT_PROJ);
      ao = proj(a.reshape({b * nn, d}), w[O_W], w[O_T]);
    }
    {
      StageTimer st(S_RESIDUAL1);
      auto yh = gate_residual_norm(x.view({b, nf + drop, t, d}), ao, w[O_B], table, e, drop, cross_norm, w[N2_W],
                                   w[N2_B], ln_eps);
      y = yh[0];
      h2 = yh[1];
    }
    // ---- cross-attention to the cached text K/V (WanAttention.cross_attention)
    {
      StageTimer st(S_CROSS_Q);
      cq = rms_rope_(proj(h2.view({b * nn, d}), w[CQ_W], w[CQ_T]), w[CQ_B], w[CNQ_G], Tensor(), rms_eps)
               .view({b, nn, heads, -1});
    }
    {
      StageTimer st(S_CROSS_ATTN);
      ca = attention(cq, cross_k[layer], cross_v[layer]);
    }
    {
      StageTimer st(S_CROSS_OUT);
      co = proj(ca.reshape({b * nn, d}), w[CO_W], w[CO_T]);
    }
    {
      StageTimer st(S_RESIDUAL2);
      h3 = residual_modulated_norm_(y, co, w[CO_B], table, e, f0, ln_eps);
    }
    // ---- feed-forward
    f = feed_forward_raw(h3, w[F1_W], w[F1_B], w[F2_W], w[F2_B], ffn_onednn);
    {
      StageTimer st(S_RESIDUAL3);
      gate_residual_ffn_(y, f, !ffn_onednn, ffn_onednn ? Tensor() : w[F2_B], table, e, f0);
    }
    x = y.view({b, nn, d});
  }
  return x;
}

// The Conv3d patch embedding as one matmul (CausalWanModel._patchify): latents [B, F, C, H, W] -> [B, F*h*w, D] with
// w [D, C*ph*pw] (the conv weight flattened) and its bias.
static Tensor patchify(const Tensor& x, const Tensor& w, const Tensor& bias, int64_t ph, int64_t pw) {
  TORCH_CHECK(x.dim() == 5 && x.size(3) % ph == 0 && x.size(4) % pw == 0,
              "latents must be [B, F, C, H, W] with H, W divisible by the patch size");
  const int64_t b = x.size(0), f = x.size(1), c = x.size(2), h = x.size(3) / ph, wd = x.size(4) / pw;
  auto t = x.reshape({b, f, c, h, ph, wd, pw}).permute({0, 1, 3, 5, 2, 4, 6}).reshape({b * f * h * wd, c * ph * pw});
  return at::addmm(bias, t, w.t()).view({b, f * h * wd, -1});
}

// A whole no-grad forward (CausalWanModel.forward on the native path): the patch embedding of the latents
// (a finished chunk's first, if fused, then the chunk's) plus the absolute embeddings if any, the blocks
// (run_blocks), and, unless kv_only, the output head: LayerNorm(x) (1 + scale) + shift with {shift, scale} =
// head_table + temb of the chunk's frames, the output projection, and the unpatchify. temb [B, F, D] of all frames;
// returns v [B, F', C_out, H, W] (undefined for kv_only).
static Tensor run_forward(std::vector<Tensor> latents, Tensor patch_w, Tensor patch_b, int64_t ph, int64_t pw,
                          Tensor positions, Tensor e, Tensor temb, Tensor rope, std::vector<Tensor> weights,
                          std::vector<Tensor> cross_k, std::vector<Tensor> cross_v, Tensor cache_k, Tensor cache_v,
                          Tensor slots, int64_t visible, Tensor read_index, Tensor pending_slots,
                          int64_t pending_visible, Tensor pending_read_index,
                          bool kv_only, int64_t heads, double ln_eps, double rms_eps, int64_t short_keys,
                          bool cross_norm, bool ffn_onednn, Tensor head_table, Tensor proj_w, Tensor proj_b,
                          double head_eps, Tensor key_ends) {
  TORCH_CHECK(!latents.empty() && latents.size() <= 2, "one or two latent chunks (a finished one first)");
  at::NoGradGuard no_grad;
  const auto& x = latents.back();
  TORCH_CHECK(x.dim() == 5, "latents must be [B, F, C, H, W]");
  const int64_t b = x.size(0), nf = x.size(1), hh = x.size(3), ww = x.size(4), t = (hh / ph) * (ww / pw);
  Tensor tokens;
  {
    StageTimer st(S_PATCH);
    std::vector<Tensor> parts;
    for (const auto& l : latents) parts.push_back(patchify(l, patch_w, patch_b, ph, pw));
    tokens = parts.size() == 1 ? parts[0] : at::cat(parts, 1);
    if (positions.numel()) {  // added to the tokens: [N, D] (absolute embeddings) or [B, N, D] (a caption layout)
      TORCH_CHECK((positions.dim() == 2 || (positions.dim() == 3 && positions.size(0) == tokens.size(0))) &&
                      positions.size(-2) == tokens.size(1) && positions.size(-1) == tokens.size(2),
                  "positions must be [N, D] or [B, N, D] for the ", tokens.size(1), " tokens");
      tokens.add_(positions);
    }
  }
  auto out = run_blocks(tokens, e, rope, std::move(weights), std::move(cross_k), std::move(cross_v), cache_k, cache_v,
                        slots, visible, read_index, pending_slots, pending_visible, pending_read_index, t, kv_only,
                        heads, ln_eps, rms_eps, short_keys, cross_norm, ffn_onednn, key_ends);
  if (kv_only) return Tensor();
  TORCH_CHECK(out.size(1) == nf * t, "the blocks returned ", out.size(1), " tokens for ", nf, " frames");
  TORCH_CHECK(temb.dim() == 3 && temb.size(0) == b && temb.size(2) == out.size(2) && temb.size(1) >= nf &&
                  temb.is_contiguous() && temb.scalar_type() == at::kFloat,
              "temb must be a contiguous float32 [B, F, D] tensor");
  TORCH_CHECK(head_table.numel() == 2 * out.size(2) && head_table.is_contiguous(), "the head's table must be [1, 2, D]");
  StageTimer st(S_HEAD);
  const int64_t d = out.size(2);
  Mod m{head_table.data_ptr<float>(), temb.data_ptr<float>(), temb.size(1), d, temb.size(1) - nf, 1};
  auto h = at::empty({b * nf * t, d}, out.options());
  const float* px = out.data_ptr<float>();
  float* po = h.data_ptr<float>();
  at::parallel_for(0, b * nf * t, grain(d), [&](int64_t r0, int64_t r1) {
    modulated_norm_rows(px, po, m, 0, r0, r1, t, nf, static_cast<float>(head_eps));
  });
  auto v = at::addmm(proj_b, h, proj_w.t());  // [B*F*h*w, ph*pw*C]
  return v.view({b, nf, hh / ph, ww / pw, ph, pw, -1}).permute({0, 1, 6, 2, 4, 3, 5}).reshape({b, nf, -1, hh, ww});
}

// run_forward with its arguments read by name from one Python object (selfforcing.accel.cpu.native.NativeForward):
// every attribute is read while the GIL is held, then the forward runs with it released.
static Tensor run_forward_args(const py::object& a) {
  auto tensor = [&](const char* name) { return a.attr(name).cast<Tensor>(); };
  auto tensors = [&](const char* name) { return a.attr(name).cast<std::vector<Tensor>>(); };
  auto integer = [&](const char* name) { return a.attr(name).cast<int64_t>(); };
  auto real = [&](const char* name) { return a.attr(name).cast<double>(); };
  auto flag = [&](const char* name) { return a.attr(name).cast<bool>(); };
  auto latents = tensors("latents"), weights = tensors("weights"), text_k = tensors("text_k"),
       text_v = tensors("text_v");
  auto patch_w = tensor("patch_weight"), patch_b = tensor("patch_bias"), positions = tensor("positions"),
       e = tensor("e"), temb = tensor("temb"),
       rope = tensor("rope"), cache_k = tensor("cache_k"), cache_v = tensor("cache_v"), slots = tensor("slots"),
       read_index = tensor("read_index"), pending_slots = tensor("pending_slots"),
       pending_read_index = tensor("pending_read_index"), head_table = tensor("head_table"),
       proj_w = tensor("proj_weight"), proj_b = tensor("proj_bias"), key_ends = tensor("key_ends");
  const int64_t ph = integer("patch_h"), pw = integer("patch_w"), visible = integer("visible"),
                pending_visible = integer("pending_visible"), heads = integer("heads"),
                short_keys = integer("short_keys");
  const double ln_eps = real("ln_eps"), rms_eps = real("rms_eps"), head_eps = real("head_eps");
  const bool kv_only = flag("kv_only"), cross_norm = flag("cross_norm"), ffn_onednn = flag("ffn_onednn");
  py::gil_scoped_release release;
  return run_forward(std::move(latents), patch_w, patch_b, ph, pw, positions, e, temb, rope, std::move(weights),
                     std::move(text_k), std::move(text_v), cache_k, cache_v, slots, visible, read_index, pending_slots,
                     pending_visible, pending_read_index, kv_only, heads, ln_eps, rms_eps, short_keys, cross_norm,
                     ffn_onednn, head_table, proj_w, proj_b, head_eps, key_ends);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using py::arg;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  // tensors per block in run_forward's weights (enum W): Python's flat list must follow it (tests check the two agree)
  m.attr("weights_per_block") = py::int_(static_cast<int>(N_W));
  m.def("profile_sections", [](bool on) { g_profile.store(on, std::memory_order_relaxed); },
        "time run_forward's stages from now on (true) or stop (false)");
  m.def("section_seconds", [](bool reset) {
          py::dict out;
          for (int s = 0; s < N_STAGES; ++s) {
            out[kStageNames[s]] = g_stage_seconds[s];
            if (reset) g_stage_seconds[s] = 0.0;
          }
          return out;
        }, "wall seconds per stage of run_forward since the last reset", arg("reset") = false);
  m.def("run_forward", &run_forward_args,
        "a no-grad CPU forward (cached, or cache-less with a prefix mask): patch embedding, blocks, head; its "
        "arguments are the attributes of one object (NativeForward)", arg("args"));
  m.def("feed_forward", &feed_forward, "the blocks' FFN: x, w1, b1, w2, b2, onednn", nogil);
  m.def("modulated_norm", &modulated_norm, "LayerNorm(x) (1 + scale) + shift from a block's table and e", nogil,
        arg("x"), arg("table"), arg("e"), arg("j"), arg("f0"), arg("eps"));
  m.def("gate_residual_norm", &gate_residual_norm, "(y, h): y = x[:, drop:] + (a + ob) gate, h = LayerNorm(y) w + nb",
        nogil, arg("x"), arg("a"), arg("ob"), arg("table"), arg("e"), arg("drop"), arg("norm"), arg("w"), arg("nb"),
        arg("eps"));
  m.def("residual_modulated_norm_", &residual_modulated_norm_,
        "y += c + cb in place; returns LayerNorm(y) (1 + c_scale) + c_shift", nogil, arg("y"), arg("c"), arg("cb"),
        arg("table"), arg("e"), arg("f0"), arg("eps"));
  m.def("gate_residual_ffn_", &gate_residual_ffn_, "y += (f + fb) c_gate in place", nogil, arg("y"), arg("f"),
        arg("feature_major"), arg("fb"), arg("table"), arg("e"), arg("f0"));
  m.def("short_attention", &short_attention, "softmax(q k^T / sqrt(Dh)) v over at most 64 keys", nogil, arg("q"),
        arg("k"), arg("v"), arg("portable") = false);
  m.def("rms_rope_", &rms_rope_, "y [..., D] <- RoPE(RMSNorm(y + bias) * gain) in place (empty: none)", nogil,
        arg("y"), arg("bias"), arg("gain"), arg("cs"), arg("eps"));
  m.def("window_attention",
        [](const Tensor& q, const Tensor& k, const Tensor& v, bool sdpa, const std::optional<Tensor>& key_ends) {
          return window_attention(q, k, v, sdpa, key_ends.value_or(Tensor()));
        },
        "softmax(q k^T / sqrt(Dh)) v over a cached window (query i over keys [0, key_ends[i]) if given)", nogil,
        arg("q"), arg("k"), arg("v"), arg("sdpa") = false, arg("key_ends") = py::none());
  m.def("linear_t", &linear_t, "x @ w^T (no bias) through wt = w^T [K, N] where it applies", nogil);
  m.def("write_kv", &write_kv, "the chunk's K/V (v plus its bias) into their cache slots", nogil);
  m.def("bias_gelu_tanh_", &bias_gelu_tanh_, "h [F, N] <- GELU_tanh(h + bias[:, None]) in place", nogil);
}
