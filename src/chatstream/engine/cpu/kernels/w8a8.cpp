// int8 x int8 linear layer (every row of the w8a8 mode, decode and prefill) on CPUs with AVX512-VNNI
// (chatstream.engine.cpu.w8a8 builds it).
//
// Weights: int8 per output channel (w[n, k] ~ q[n, k] * wscale[n]), stored as unsigned bytes q + 128 in blocks of 16
// output channels by 4 inputs, the layout VPDPBUSD multiplies: packed[n / 16][k / 4][n % 16][k % 4].
// Activations: each row quantized at call time per block of 32 inputs (x[m, k] ~ a[m, k] * xscale[m, k / 32], a in
// [-127, 127]), so a row's result depends on that row alone. One VPDPBUSD adds 4 products of 16 output channels:
// sum (q + 128) * a = sum q * a + 128 * sum a, and each block's int32 sum starts at -128 * sum a to take the offset
// back. The block sums are scaled by the row's block scale in float32; the output channel's scale and bias come last.
//
// The mode's layers also run their RMSNorms (rms_norm), rotary embeddings (rotate) and MLP gates (gated) here: one
// call each instead of PyTorch's dozen to a few small operators, which at one decoding row cost more than their
// arithmetic.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace {

constexpr int64_t kBlockN = 16;  // output channels per weight block: one zmm of int32 sums
constexpr int64_t kBlockK = 32;  // inputs of a row that share one activation scale
constexpr int64_t kQuads = kBlockK / 4;
// Whether a block's first tile prefetches the next block's weights (bench/w8a8_prefetch.py builds the kernel with
// -DCHATSTREAM_W8A8_PREFETCH=0 to compare).
#ifndef CHATSTREAM_W8A8_PREFETCH
#define CHATSTREAM_W8A8_PREFETCH 1
#endif

struct QuantizedRows {
  const int8_t* values;  // [M, K]
  const float* scale;    // [M, K / kBlockK]
  const int32_t* start;  // [M, K / kBlockK]: -128 * the block's sum of values
  int64_t K;
};

// 16 inputs as float32: loaded, or widened from bfloat16 (exact: a bfloat16 is a float32's upper half).
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const at::BFloat16* x) {
  const __m512i halves = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(halves, 16));
}

// 16 float32 values rounded to bfloat16 (to nearest, ties to even, NaN as 0x7FC0: as PyTorch rounds), one per
// 32-bit lane's low half.
inline __m512i bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

// 16 outputs stored as float32, or rounded to bfloat16.
inline void store16(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
inline void store16(at::BFloat16* out, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(bf16_bits(v)));
}

// v as the dtype T holds it (rounded to bfloat16 and widened back; float32 as it is).
inline __m512 as_stored(__m512 v, const float*) { return v; }
inline __m512 as_stored(__m512 v, const at::BFloat16*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16));
}

// e^x in float32 for x <= 0 (a score minus its row's maximum): 2^n * e^r with |r| <= ln(2) / 2, r's series to the
// sixth power (relative error below 2e-7); x below -87 gives 0 within float32's normal range.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// GELU's tanh form, 0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3), computed as x * sigmoid(2u) from
// e^-|2u| (exp_nonpositive). It has no cancellation in 1 + tanh(u): below x = -4, where the result is under 1e-4 in
// magnitude, PyTorch's form returns 0 or a value some per cent off; elsewhere the two agree to float32's rounding.
inline __m512 gelu_tanh16(__m512 x) {
  const __m512 z = _mm512_mul_ps(_mm512_set1_ps(2.0f * 0.7978845608028654f),
                                 _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), _mm512_mul_ps(_mm512_mul_ps(x, x), x), x));
  const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(z)));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __mmask16 negative = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
  // sigmoid(z) = 1 / (1 + e^-z) for z >= 0, e^z / (1 + e^z) below
  return _mm512_mul_ps(x, _mm512_div_ps(_mm512_mask_blend_ps(negative, one, e), _mm512_add_ps(one, e)));
}

// One block of 32 inputs of a row: a = round(x * 127 / max|x|) (to nearest, ties to even), its scale max|x| / 127 and
// the offset term -128 * sum(a).
template <typename In>
void quantize_block(const In* x, int8_t* values, float* scale, int32_t* start) {
  const __m512 lo = load16(x), hi = load16(x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
  const __m512 inverse = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  const __m512i a_lo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse));  // rounds to nearest even (MXCSR default)
  const __m512i a_hi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(values), _mm512_cvtepi32_epi8(a_lo));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(values + 16), _mm512_cvtepi32_epi8(a_hi));
  *scale = amax / 127.f;
  *start = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(a_lo, a_hi));
}

// Rows [m0, m0 + MT) of one block of 16 output channels: the block's weights are loaded once per 4 inputs and used
// by every row of the tile. With `next` (the block's first tile), the next block's weights are prefetched into L1,
// 512 bytes per block of inputs. A step reads each layer's weights from memory once, and without it the hardware's
// own prefetch left the tiles waiting for them at 4-64 rows (bench/w8a8_prefetch.py: 0.65-0.88x the time then, and
// 1.03-1.14x with the weights already in the caches). One row keeps up with the memory without it (1.04x with it).
template <int MT, typename Out>
void tile(const uint8_t* w, const uint8_t* next, const QuantizedRows& rows, int64_t m0, __m512 wscale, __m512 bias,
          Out* out, int64_t N) {
  const int64_t K = rows.K, blocks = K / kBlockK;
  __m512 sums[MT];
  for (int t = 0; t < MT; ++t) sums[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i acc[MT];
    for (int t = 0; t < MT; ++t) acc[t] = _mm512_set1_epi32(rows.start[(m0 + t) * blocks + b]);
    const uint8_t* wb = w + b * kQuads * 64;
    if (next)
      for (int64_t q = 0; q < kQuads; ++q)
        _mm_prefetch(reinterpret_cast<const char*>(next + b * kQuads * 64 + q * 64), _MM_HINT_T0);
    for (int64_t q = 0; q < kQuads; ++q) {
      const __m512i weights = _mm512_loadu_si512(wb + q * 64);
      for (int t = 0; t < MT; ++t) {
        int32_t quad;
        std::memcpy(&quad, rows.values + (m0 + t) * K + b * kBlockK + q * 4, sizeof quad);
        acc[t] = _mm512_dpbusd_epi32(acc[t], weights, _mm512_set1_epi32(quad));
      }
    }
    for (int t = 0; t < MT; ++t) {
      const __m512 scale = _mm512_set1_ps(rows.scale[(m0 + t) * blocks + b]);
      sums[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t]), scale, sums[t]);
    }
  }
  for (int t = 0; t < MT; ++t) store16(out + (m0 + t) * N, _mm512_fmadd_ps(sums[t], wscale, bias));
}

template <typename Out>
using Tile = void (*)(const uint8_t*, const uint8_t*, const QuantizedRows&, int64_t, __m512, __m512, Out*, int64_t);
template <typename Out>
constexpr Tile<Out> kLastTile[8] = {nullptr,      tile<1, Out>, tile<2, Out>, tile<3, Out>,
                                    tile<4, Out>, tile<5, Out>, tile<6, Out>, tile<7, Out>};

// x [M, K] (In) quantized per row and block, times the packed weights, into out [M, N] (Out).
template <typename In, typename Out>
void run(const In* x, int64_t M, int64_t K, const uint8_t* weights, const float* wscale, const float* bias, Out* out,
         int64_t N) {
  const int64_t blocks = K / kBlockK;
  std::vector<int8_t> values(M * K);
  std::vector<float> scale(M * blocks);
  std::vector<int32_t> start(M * blocks);
  at::parallel_for(0, M * blocks, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) quantize_block(x + i * kBlockK, &values[i * kBlockK], &scale[i], &start[i]);
  });
  const QuantizedRows rows{values.data(), scale.data(), start.data(), K};
  at::parallel_for(0, N / kBlockN, 16, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const uint8_t* w = weights + j * K * kBlockN;
      const __m512 ws = _mm512_loadu_ps(wscale + j * kBlockN);
      const __m512 bs = bias ? _mm512_loadu_ps(bias + j * kBlockN) : _mm512_setzero_ps();
      Out* o = out + j * kBlockN;
      const uint8_t* next = CHATSTREAM_W8A8_PREFETCH && M > 1 && j + 1 < j1 ? w + K * kBlockN : nullptr;
      int64_t m0 = 0;
      for (; m0 + 8 <= M; m0 += 8, next = nullptr) tile<8>(w, next, rows, m0, ws, bs, o, N);
      if (m0 < M) kLastTile<Out>[M - m0](w, next, rows, m0, ws, bs, o, N);
    }
  });
}

// One row of an RMSNorm over C values: n = x * rstd with rstd = 1 / sqrt(mean(x^2) + eps), in float32; the output
// is n * scale (Gemma's arithmetic, scale = 1 + weight), or with after_cast round(n) * scale (Llama's: the weight
// multiplies n as the model's dtype holds it), stored in T.
template <typename T>
void norm_row(const T* x, const float* scale, T* out, int64_t C, float eps, bool after_cast) {
  __m512 squares = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) {
    const __m512 v = load16(x + c);
    squares = _mm512_fmadd_ps(v, v, squares);
  }
  float sum = _mm512_reduce_add_ps(squares);
  for (int64_t t = c; t < C; ++t) sum += static_cast<float>(x[t]) * static_cast<float>(x[t]);
  const float rstd = 1.f / std::sqrt(sum / static_cast<float>(C) + eps);
  const __m512 r = _mm512_set1_ps(rstd);
  for (c = 0; c + 16 <= C; c += 16) {
    __m512 n = _mm512_mul_ps(load16(x + c), r);
    if (after_cast) n = as_stored(n, x);
    store16(out + c, _mm512_mul_ps(n, _mm512_loadu_ps(scale + c)));
  }
  for (; c < C; ++c) {
    float n = static_cast<float>(x[c]) * rstd;
    if (after_cast) n = static_cast<float>(static_cast<T>(n));
    out[c] = static_cast<T>(n * scale[c]);
  }
}

// One head of the rotary embedding, in PyTorch's order of roundings: out = round(round(x * cos) + round(flip(x) *
// sin)), flip(x) swapping the two halves of the head (sin's first half comes negated).
template <typename T>
void rotate_head(const T* x, const T* cos, const T* sin, T* out, int64_t D) {
  const int64_t half = D / 2;
  int64_t d = 0;
  if (half % 16 == 0) {
    for (; d < half; d += 16) {
      const __m512 a = load16(x + d), b = load16(x + d + half);
      const __m512 lo = _mm512_add_ps(as_stored(_mm512_mul_ps(a, load16(cos + d)), x),
                                      as_stored(_mm512_mul_ps(b, load16(sin + d)), x));
      const __m512 hi = _mm512_add_ps(as_stored(_mm512_mul_ps(b, load16(cos + d + half)), x),
                                      as_stored(_mm512_mul_ps(a, load16(sin + d + half)), x));
      store16(out + d, lo);
      store16(out + d + half, hi);
    }
  }
  for (; d < half; ++d) {
    const float a = static_cast<float>(x[d]), b = static_cast<float>(x[d + half]);
    const auto stored = [](float v) { return static_cast<float>(static_cast<T>(v)); };
    out[d] = static_cast<T>(stored(a * static_cast<float>(cos[d])) + stored(b * static_cast<float>(sin[d])));
    out[d + half] =
        static_cast<T>(stored(b * static_cast<float>(cos[d + half])) + stored(a * static_cast<float>(sin[d + half])));
  }
}

}  // namespace

// q: int8 [N, K] (N a multiple of 16, K of 32) -> uint8 [N / 16, K / 4, 16, 4] holding q + 128.
torch::Tensor pack_weight(torch::Tensor q) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kInt8, "pack_weight: q must be an int8 [N, K] tensor");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(N % kBlockN == 0 && K % kBlockK == 0, "pack_weight: N must be a multiple of 16 and K of 32");
  auto shifted = (q.to(torch::kInt16) + 128).to(torch::kUInt8);
  return shifted.view({N / kBlockN, kBlockN, K / 4, 4}).permute({0, 2, 1, 3}).contiguous();
}

// x: [M, K], bfloat16 (read as it is, and the result is bfloat16) or any other float dtype (converted to float32,
// and the result is float32); packed from pack_weight; wscale: float32 [N]; bias: float32 [N] or None.
torch::Tensor linear(torch::Tensor x, torch::Tensor packed, torch::Tensor wscale, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2, "linear: x must be [M, K]");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == torch::kUInt8 && packed.is_contiguous(),
              "linear: packed must come from pack_weight");
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  const auto xc = bf16 ? x.contiguous() : x.to(torch::kFloat).contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = packed.size(0) * kBlockN;
  TORCH_CHECK(packed.size(1) * 4 == K, "linear: x has ", K, " inputs, the weight ", packed.size(1) * 4);
  TORCH_CHECK(wscale.scalar_type() == torch::kFloat && wscale.is_contiguous() && wscale.numel() == N,
              "linear: wscale must be float32 [N]");
  const float* bias_data = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->is_contiguous() && bias->numel() == N,
                "linear: bias must be float32 [N]");
    bias_data = bias->data_ptr<float>();
  }
  auto out = torch::empty({M, N}, xc.options());
  const uint8_t* weights = packed.data_ptr<uint8_t>();
  const float* wscale_data = wscale.data_ptr<float>();
  if (bf16) {
    run(xc.data_ptr<at::BFloat16>(), M, K, weights, wscale_data, bias_data, out.data_ptr<at::BFloat16>(), N);
  } else {
    run(xc.data_ptr<float>(), M, K, weights, wscale_data, bias_data, out.data_ptr<float>(), N);
  }
  return out;
}

// RMSNorm of x [A, C] or [A, H, C] (float32 or bfloat16; the last dimension contiguous, the others any stride) with
// scale float32 [C], or [H, C] for heads that each have their own; returns a new contiguous tensor of x's shape and
// dtype (norm_row's arithmetic).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor scale, double eps, bool after_cast) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "rms_norm: x must be [A, C] or [A, H, C]");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat,
              "rms_norm: x must be float32 or bfloat16");
  TORCH_CHECK(x.stride(-1) == 1, "rms_norm: x's last dimension must be contiguous");
  const int64_t A = x.size(0), H = x.dim() == 3 ? x.size(1) : 1, C = x.size(-1);
  const int64_t row_stride = x.stride(0), head_stride = x.dim() == 3 ? x.stride(1) : 0;
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.size(-1) == C &&
                  (scale.numel() == C || scale.numel() == H * C),
              "rms_norm: scale must be float32 [C] or [H, C]");
  const int64_t scale_step = scale.numel() == C ? 0 : C;
  auto out = torch::empty(x.sizes(), x.options());
  const float* s = scale.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / C);  // one thread for a decode step's few rows
  auto norm = [&](auto* in, auto* o) {
    at::parallel_for(0, A * H, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t a = r / H, h = r % H;
        norm_row(in + a * row_stride + h * head_stride, s + h * scale_step, o + r * C, C, static_cast<float>(eps),
                 after_cast);
      }
    });
  };
  if (x.scalar_type() == torch::kBFloat16) {
    norm(x.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>());
  } else {
    norm(x.data_ptr<float>(), out.data_ptr<float>());
  }
  return out;
}

// The rotary embedding of heads x [T, H, D] (float32 or bfloat16, the last dimension contiguous, the others any
// stride) at tables cos, sin [T, D] of x's dtype; returns a new contiguous [T, H, D] (rotate_head's arithmetic).
torch::Tensor rotate(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(-1) == 1, "rotate: x must be [T, H, D] with a contiguous last dimension");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat,
              "rotate: x must be float32 or bfloat16");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2);
  TORCH_CHECK(D % 2 == 0, "rotate: the head size must be even");
  const auto table = [&](const torch::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.numel() == T * D,
                "rotate: cos and sin must be [T, D] of x's dtype");
    return t.contiguous();
  };
  const auto c = table(cos), s = table(sin);
  auto out = torch::empty({T, H, D}, x.options());
  const int64_t row_stride = x.stride(0), head_stride = x.stride(1);
  auto run = [&](auto* in, auto* cs, auto* sn, auto* o) {
    at::parallel_for(0, T * H, std::max<int64_t>(1, 16384 / D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r / H, h = r % H;
        rotate_head(in + t * row_stride + h * head_stride, cs + t * D, sn + t * D, o + r * D, D);
      }
    });
  };
  if (x.scalar_type() == torch::kBFloat16) {
    run(x.data_ptr<at::BFloat16>(), c.data_ptr<at::BFloat16>(), s.data_ptr<at::BFloat16>(),
        out.data_ptr<at::BFloat16>());
  } else {
    run(x.data_ptr<float>(), c.data_ptr<float>(), s.data_ptr<float>(), out.data_ptr<float>());
  }
  return out;
}

// act(gate) * up for gate_up = [gate | up] along the last dimension, act "gelu_tanh" or "silu". A bfloat16
// gelu_tanh runs here in one pass (gelu_tanh16, rounded to bfloat16 before the product as PyTorch's operators round
// it; 0.4x their time); the rest are PyTorch's own operators, called from here instead of one by one from Python.
torch::Tensor gated(torch::Tensor gate_up, const std::string& act) {
  const int64_t half = gate_up.size(-1) / 2;
  TORCH_CHECK(act == "gelu_tanh" || act == "silu", "gated: act must be gelu_tanh or silu, not ", act);
  if (act == "gelu_tanh" && gate_up.scalar_type() == torch::kBFloat16 && half % 16 == 0 && gate_up.numel() > 0) {
    const auto rows = gate_up.reshape({-1, 2 * half}).contiguous();
    auto sizes = gate_up.sizes().vec();
    sizes.back() = half;
    auto out = torch::empty(sizes, gate_up.options());
    const at::BFloat16* in = rows.data_ptr<at::BFloat16>();
    at::BFloat16* o = out.data_ptr<at::BFloat16>();
    at::parallel_for(0, rows.size(0), std::max<int64_t>(1, 16384 / half), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const at::BFloat16* gate = in + t * 2 * half;
        for (int64_t i = 0; i < half; i += 16) {
          const __m512 h = as_stored(gelu_tanh16(load16(gate + i)), gate);
          store16(o + t * half + i, _mm512_mul_ps(h, load16(gate + half + i)));
        }
      }
    });
    return out;
  }
  const auto gate = gate_up.narrow(-1, 0, half), up = gate_up.narrow(-1, half, half);
  auto h = act == "gelu_tanh" ? at::gelu(gate, "tanh") : at::silu(gate);
  return h.mul_(up);
}

// Attention of a block of new tokens of each row of a group against its cache (decode steps, prompt chunks), on CPUs
// with AVX512-BF16. A row's query rows m = g * S + s are its block's S tokens for each of the G query heads of one key
// head (read in place from the decoder's strided buffer); keys and values [L, D] are the cache columns the block may
// read; token s sits at key column offset + s and reads the columns from the row's start (its left padding before)
// up to its own and, with a window, the last `window` of them. Scores are dot products of bfloat16 pairs added up in
// float32 (VDPBF16PS), the softmax is float32 and so are the probabilities that weigh the values (widened from
// bfloat16, exactly); the output is rounded to bfloat16 once.
// Work items are blocks of 32 query rows (two zmm of lanes; 16 where a block has no more): one reads every key of its
// rows' union of columns, so the key and value rows it loads serve 32 queries (four heads' 8 tokens, or one head's 32).

namespace {

constexpr int64_t kAttnKeys = 12;  // keys per register block of scores (up to 2 x 12 accumulators)
constexpr int64_t kAttnOutRows = 6;  // query rows per register block of the output (6 x 4 accumulators)
constexpr int64_t kAttnPartKeys = 128;  // the fewest key columns worth a thread of their own

struct ChunkAttention {
  const at::BFloat16* q;  // query row m = g * S + s (head g, token s) at q + s * q_token + g * q_head
  const at::BFloat16* k;
  const at::BFloat16* v;
  int64_t k_stride, v_stride;  // elements between consecutive key (value) rows
  int64_t M, S, L, D, offset, window;
  int64_t start;  // the row's first key column (a left-padded row's padding comes before it)
  float scale;
  at::BFloat16* out;  // output row m at out + s * out_token + g * out_head
  int64_t q_token, q_head, out_token, out_head;
};

// The rows' own key columns: row r (of a work item's R; rows past M repeat row M - 1) reads [lo[r], hi[r]).
template <int R>
void row_bounds(const ChunkAttention& a, int64_t m0, int32_t* lo, int32_t* hi) {
  const int64_t rows = std::min<int64_t>(R, a.M - m0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t m = m0 + std::min(r, rows - 1), own = a.offset + m % a.S;
    hi[r] = static_cast<int32_t>(std::min(a.L, own + 1));
    lo[r] = static_cast<int32_t>(std::max(a.start, a.window > 0 ? own - a.window + 1 : 0));
  }
}

// One work item: query rows [m0, m0 + R) (R = 16 or 32: one or two vectors of lanes; 16 where a block has few
// query rows, a decode step's) against the keys [first, last) (a part of the rows' columns). Leaves per row the
// largest scaled score (-inf where the part holds none of the row's columns), the sum of e^(score - largest) and
// the values weighed by those, unnormalized: out [R, D] float32.
// scores: [last - first, R] float32 scratch; pairs: [D / 2, R] scratch for the rows' query pairs, lane-major.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void attend_part(const ChunkAttention& a, int64_t m0,
                                                                        int64_t first, int64_t last, float* scores,
                                                                        uint32_t* pairs, float* out, float* largest,
                                                                        float* total) {
  constexpr int QV = R / 16;
  const int64_t rows = std::min<int64_t>(R, a.M - m0), half = a.D / 2;
  alignas(64) int32_t lo[R], hi[R];
  row_bounds<R>(a, m0, lo, hi);
  for (int64_t t = 0; t < half; ++t) {
    for (int64_t r = 0; r < R; ++r) {
      const int64_t m = m0 + std::min<int64_t>(r, rows - 1);
      pairs[t * R + r] = reinterpret_cast<const uint32_t*>(a.q + m % a.S * a.q_token + m / a.S * a.q_head)[t];
    }
  }
  __m512i low[QV], high[QV];
  __m512 top[QV], sum[QV];
  for (int v = 0; v < QV; ++v) {
    low[v] = _mm512_load_si512(lo + 16 * v);
    high[v] = _mm512_load_si512(hi + 16 * v);
    top[v] = _mm512_set1_ps(-INFINITY);
    sum[v] = _mm512_setzero_ps();
  }
  const __m512 scale = _mm512_set1_ps(a.scale), minus_inf = _mm512_set1_ps(-INFINITY);
  for (int64_t j = first; j < last; j += kAttnKeys) {
    const int32_t* key[kAttnKeys];
    for (int64_t kk = 0; kk < kAttnKeys; ++kk) {  // past the last key: the last again (computed, not kept)
      key[kk] = reinterpret_cast<const int32_t*>(a.k + std::min(j + kk, last - 1) * a.k_stride);
    }
    __m512 acc[QV][kAttnKeys];
    for (int v = 0; v < QV; ++v) {
      for (int64_t kk = 0; kk < kAttnKeys; ++kk) acc[v][kk] = _mm512_setzero_ps();
    }
    for (int64_t t = 0; t < half; ++t) {
      __m512bh query[QV];
      for (int v = 0; v < QV; ++v) query[v] = (__m512bh)_mm512_loadu_si512(pairs + t * R + 16 * v);
      for (int64_t kk = 0; kk < kAttnKeys; ++kk) {
        const __m512bh kb = (__m512bh)_mm512_set1_epi32(key[kk][t]);
        for (int v = 0; v < QV; ++v) acc[v][kk] = _mm512_dpbf16_ps(acc[v][kk], query[v], kb);
      }
    }
    for (int64_t kk = 0; kk < std::min(kAttnKeys, last - j); ++kk) {
      const __m512i col = _mm512_set1_epi32(static_cast<int32_t>(j + kk));
      float* row = scores + (j + kk - first) * R;
      for (int v = 0; v < QV; ++v) {
        const __mmask16 in = _mm512_cmpge_epi32_mask(col, low[v]) & _mm512_cmplt_epi32_mask(col, high[v]);
        const __m512 score = _mm512_mask_mul_ps(minus_inf, in, acc[v][kk], scale);
        _mm512_storeu_ps(row + 16 * v, score);
        top[v] = _mm512_max_ps(top[v], score);
      }
    }
  }
  for (int64_t j = first; j < last; ++j) {  // a row's columns outside its bounds weigh 0 (and no NaN from -inf)
    const __m512i col = _mm512_set1_epi32(static_cast<int32_t>(j));
    float* row = scores + (j - first) * R;
    for (int v = 0; v < QV; ++v) {
      const __mmask16 in = _mm512_cmpge_epi32_mask(col, low[v]) & _mm512_cmplt_epi32_mask(col, high[v]);
      const __m512 e = _mm512_maskz_mov_ps(in, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + 16 * v), top[v])));
      _mm512_storeu_ps(row + 16 * v, e);
      sum[v] = _mm512_add_ps(sum[v], e);
    }
  }
  for (int v = 0; v < QV; ++v) {
    _mm512_storeu_ps(largest + 16 * v, top[v]);
    _mm512_storeu_ps(total + 16 * v, sum[v]);
  }
  for (int64_t d0 = 0; d0 < a.D; d0 += 64) {
    for (int64_t r0 = 0; r0 < rows; r0 += kAttnOutRows) {
      int64_t lane[kAttnOutRows];
      for (int64_t rr = 0; rr < kAttnOutRows; ++rr) lane[rr] = std::min(r0 + rr, rows - 1);
      __m512 acc[kAttnOutRows][4];
      for (int64_t rr = 0; rr < kAttnOutRows; ++rr) {
        for (int c = 0; c < 4; ++c) acc[rr][c] = _mm512_setzero_ps();
      }
      for (int64_t j = first; j < last; ++j) {
        const at::BFloat16* value = a.v + j * a.v_stride + d0;
        __m512 vals[4];
        for (int c = 0; c < 4; ++c) vals[c] = load16(value + 16 * c);
        const float* p = scores + (j - first) * R;
        for (int64_t rr = 0; rr < kAttnOutRows; ++rr) {
          const __m512 w = _mm512_set1_ps(p[lane[rr]]);
          for (int c = 0; c < 4; ++c) acc[rr][c] = _mm512_fmadd_ps(w, vals[c], acc[rr][c]);
        }
      }
      for (int64_t rr = 0; rr < std::min(kAttnOutRows, rows - r0); ++rr) {
        for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + (r0 + rr) * a.D + d0 + 16 * c, acc[rr][c]);
      }
    }
  }
}

// The output rows [m0, m0 + rows) from the parts' results: each part's sums and values rescaled to the largest
// score over all parts, added, divided, rounded to bfloat16 once.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void merge_parts(const ChunkAttention& a, int64_t m0,
                                                                        int64_t parts, const float* outs,
                                                                        const float* largest, const float* totals) {
  const int64_t rows = std::min<int64_t>(R, a.M - m0);
  for (int64_t r = 0; r < rows; ++r) {
    float top = -INFINITY;
    for (int64_t p = 0; p < parts; ++p) top = std::max(top, largest[p * R + r]);
    float weight[64], sum = 0.0f;  // parts <= 64
    for (int64_t p = 0; p < parts; ++p) {
      const float m = largest[p * R + r];
      weight[p] = m == -INFINITY ? 0.0f : std::exp(m - top);
      sum += weight[p] * totals[p * R + r];
    }
    const int64_t m = m0 + r;
    at::BFloat16* o = a.out + m % a.S * a.out_token + m / a.S * a.out_head;
    for (int64_t d0 = 0; d0 < a.D; d0 += 16) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t p = 0; p < parts; ++p) {
        const float* part = outs + (p * R + r) * a.D + d0;
        acc = _mm512_fmadd_ps(_mm512_set1_ps(weight[p]), _mm512_loadu_ps(part), acc);
      }
      store16(o + d0, _mm512_mul_ps(acc, _mm512_set1_ps(1.0f / sum)));
    }
  }
}

// The work of chunk_attention for blocks of R query rows.
template <int R>
void attend_rows(const std::vector<ChunkAttention>& rows, int64_t M, int64_t D, int64_t L) {
  const int64_t B = static_cast<int64_t>(rows.size());
  const int64_t items = (M + R - 1) / R, blocks = B * items;
  const int64_t parts =
      std::max<int64_t>(1, std::min({at::get_num_threads() / blocks, int64_t{64}, L / kAttnPartKeys}));
  const std::unique_ptr<float[]> outs(new float[blocks * parts * R * D]),
      largest(new float[blocks * parts * R]), totals(new float[blocks * parts * R]);
  at::parallel_for(0, blocks * parts, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> scores;
    std::vector<uint32_t> pairs(D / 2 * R);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t block = w / parts, part = w % parts, m0 = block % items * R;
      const ChunkAttention& a = rows[block / items];
      alignas(64) int32_t lo[R], hi[R];
      row_bounds<R>(a, m0, lo, hi);
      const int64_t first = *std::min_element(lo, lo + R), last = *std::max_element(hi, hi + R);
      const int64_t width = (last - first + parts - 1) / parts;
      const int64_t begin = std::min(last, first + part * width), end = std::min(last, begin + width);
      scores.resize(std::max<int64_t>(1, end - begin) * R);
      attend_part<R>(a, m0, begin, end, scores.data(), pairs.data(), outs.get() + w * R * D, largest.get() + w * R,
                     totals.get() + w * R);
    }
  });
  at::parallel_for(0, blocks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      merge_parts<R>(rows[i / items], i % items * R, parts, outs.get() + i * parts * R * D,
                     largest.get() + i * parts * R, totals.get() + i * parts * R);
    }
  });
}

}  // namespace

// softmax(q k^T * scale + causal and window masks) v for one block of S new tokens of each of B rows (see
// ChunkAttention), written into out: q and out [B, S, G, D] (G query heads of one key head; any strides but a
// contiguous last dimension), k and v [B, L, D] with contiguous rows, all bfloat16, D a multiple of 64. Row b reads
// the key columns from max(0, starts[b] - column0) on (its left padding before; starts in the cache's columns, k's
// first column being the cache's column0). Work is split by rows, blocks of 32 (or 16) query rows and, where there
// are fewer blocks than threads (a decode step's few queries), by parts of the key columns whose results are merged.
// The CPU must have AVX512-BF16 (the caller checks).
void chunk_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor starts, int64_t column0,
                     int64_t offset, int64_t window, double scale, torch::Tensor out) {
  TORCH_CHECK(q.dim() == 4 && out.sizes() == q.sizes() && k.dim() == 3 && v.dim() == 3,
              "chunk_attention: q and out must be [B, S, G, D], k and v [B, L, D]");
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 && k.scalar_type() == torch::kBFloat16 &&
                  v.scalar_type() == torch::kBFloat16 && out.scalar_type() == torch::kBFloat16,
              "chunk_attention: q, k, v and out must be bfloat16");
  const int64_t B = q.size(0), S = q.size(1), G = q.size(2), D = q.size(3), M = S * G, L = k.size(1);
  TORCH_CHECK(D % 64 == 0 && k.size(2) == D && v.size(2) == D && v.size(1) == L,
              "chunk_attention: the head size must match and be a multiple of 64");
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && starts.numel() == B && starts.scalar_type() == torch::kLong,
              "chunk_attention: k, v and starts (int64) must have q's rows");
  TORCH_CHECK(q.stride(3) == 1 && out.stride(3) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "chunk_attention: the last dimension must be contiguous");
  TORCH_CHECK(S > 0 && offset >= 0 && offset + S <= L,
              "chunk_attention: the block's tokens must lie in the key columns");
  const auto first = starts.contiguous();
  std::vector<ChunkAttention> rows;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t start = std::max<int64_t>(0, first.data_ptr<int64_t>()[b] - column0);
    TORCH_CHECK(start <= offset, "chunk_attention: a row's first key column must precede its tokens");
    rows.push_back({q.data_ptr<at::BFloat16>() + b * q.stride(0), k.data_ptr<at::BFloat16>() + b * k.stride(0),
                    v.data_ptr<at::BFloat16>() + b * v.stride(0), k.stride(1), v.stride(1), M, S, L, D, offset,
                    window, start, static_cast<float>(scale), out.data_ptr<at::BFloat16>() + b * out.stride(0),
                    q.stride(1), q.stride(2), out.stride(1), out.stride(2)});
  }
  if (M <= 16) {
    attend_rows<16>(rows, M, D, L);
  } else {
    attend_rows<32>(rows, M, D, L);
  }
}
// How many of PyTorch's threads at::parallel_for runs this extension's work on (1 if it was built without OpenMP).
int64_t parallel_threads() {
  std::vector<std::atomic<bool>> seen(at::get_num_threads());
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) { seen[at::get_thread_num()] = true; });
  return std::count_if(seen.begin(), seen.end(), [](const std::atomic<bool>& s) { return s.load(); });
}

// Every function lets go of the GIL while it computes (as PyTorch's own operators do), so that the event loop's
// thread runs while the engine's thread is in a matrix product.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("pack_weight", &pack_weight, "int8 [N, K] -> the kernel's uint8 layout", nogil);
  m.def("parallel_threads", &parallel_threads, "threads at::parallel_for uses here", nogil);
  m.def("linear", &linear, "x [M, K] @ dequantized(packed).T * wscale + bias, activations int8 per block of 32",
        nogil);
  m.def("rms_norm", &rms_norm, "RMSNorm of x [A, C] or [A, H, C] with a float32 scale [C] or [H, C]", nogil);
  m.def("rotate", &rotate, "the rotary embedding of heads x [T, H, D] at cos, sin [T, D]", nogil);
  m.def("chunk_attention", &chunk_attention,
        "softmax(q k^T * scale, causal and window masks) v for a block of new tokens of each row (AVX512-BF16)", nogil);
  m.def("gated", &gated, "act(gate) * up for gate_up = [gate | up], act gelu_tanh or silu", nogil);
}
