// GELU(depthwise(GELU(expand(x)))), the front of an MBConv block with its BatchNorms folded,
// for eager CPU inference on float32 channels-last (NHWC) tensors.
//
// Run as two oneDNN convolutions, the 4x-expanded map between them is written to memory and
// read back: 154 MB for MOAT-0's first block at batch 8, far more than any cache. Here the
// output is made in bands of rows: each thread expands the input rows a band needs (a matrix
// product, bias and GELU) into a buffer of its own that stays in cache, then runs the
// depthwise convolution (TF 'SAME' padding given as `top` / `left`, bias and GELU) from it.
// Consecutive bands of an image share rows (the kernel's overlap); those are kept, not
// computed again. GELU is the exact (erf) form, erf as a fitted rational function, or its
// tanh approximation (gelu.h).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "gelu.h"

#include <algorithm>
#include <cstring>

namespace {

using moat_kernels::Vec;

struct Problem {
  const float* dw_weight;  // [k, k, channels]
  const float* dw_bias;    // [channels]
  float* out;              // [batch, out_h, out_w, channels]
  int64_t height, width, channels, out_h, out_w, kernel, stride, top, left;
};

inline Vec load(const float* p, int64_t n) {
  return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n);
}

template <bool kTanh>
inline Vec activation(const Vec& y) {
  return kTanh ? moat_kernels::gelu_tanh(y) : moat_kernels::gelu_rational(y);
}

// Output row `ho` of image `n` from the expanded rows [r0, ...) in `e` (width x channels each).
// K > 0: the kernel size known at compile time; then two neighbouring output pixels whose
// taps all lie inside the map are computed together, each weight loaded once for both.
// 0: p.kernel, one pixel at a time.
template <bool kTanh, int K>
void depthwise_row(const Problem& p, const float* e, int64_t r0, int64_t n, int64_t ho) {
  const int64_t k = K > 0 ? K : p.kernel, C = p.channels, W = p.width, s = p.stride;
  const int64_t h0 = ho * s - p.top;
  const int64_t i0 = std::max<int64_t>(0, -h0), i1 = std::min<int64_t>(k, p.height - h0);
  const bool pairs = K > 0 && i0 == 0 && i1 == K && C % Vec::size() == 0;
  const float* bias = p.dw_bias;
  float* op = p.out + ((n * p.out_h + ho) * p.out_w) * C;
  for (int64_t wo = 0; wo < p.out_w;) {
    const int64_t w0 = wo * s - p.left;
    const float* ew = e + ((h0 - r0) * W + w0) * C;  // tap (i, j), channel c: + (i W + j) C + c
    if (pairs && w0 >= 0 && wo + 1 < p.out_w && w0 + s + K <= W) {
      for (int64_t c = 0; c < C; c += Vec::size()) {
        Vec a0 = Vec::loadu(bias + c), a1 = a0;
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < K; ++j) {
            const Vec w = Vec::loadu(p.dw_weight + (i * K + j) * C + c);
            const float* x = ew + (i * W + j) * C + c;
            a0 = at::vec::fmadd(Vec::loadu(x), w, a0);
            a1 = at::vec::fmadd(Vec::loadu(x + s * C), w, a1);
          }
        activation<kTanh>(a0).store(op + c);
        activation<kTanh>(a1).store(op + C + c);
      }
      wo += 2, op += 2 * C;
      continue;
    }
    const int64_t j0 = std::max<int64_t>(0, -w0), j1 = std::min<int64_t>(k, W - w0);
    for (int64_t c = 0; c < C; c += Vec::size()) {
      const int64_t lanes = std::min<int64_t>(Vec::size(), C - c);
      Vec acc = load(bias + c, lanes);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j)
          acc = at::vec::fmadd(load(ew + (i * W + j) * C + c, lanes),
                               load(p.dw_weight + (i * k + j) * C + c, lanes), acc);
      const Vec y = activation<kTanh>(acc);
      if (lanes == Vec::size()) y.store(op + c); else y.store(op + c, lanes);
    }
    ++wo, op += C;
  }
}

template <bool kTanh, int K>
void run(const at::Tensor& x, const at::Tensor& expand_weight, const at::Tensor& expand_bias,
         const Problem& p, int64_t band) {
  const int64_t N = x.size(0), Cin = x.size(1), H = p.height, W = p.width, C = p.channels;
  const int64_t k = K > 0 ? K : p.kernel, s = p.stride;
  const int64_t bands = (p.out_h + band - 1) / band;
  const int64_t max_rows = std::min<int64_t>((band - 1) * s + k, H);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, N * bands, 1, [&](int64_t first, int64_t last) {
    at::Tensor buffer = at::empty({max_rows * W, C}, x.options());
    float* e = buffer.data_ptr<float>();
    int64_t held_n = -1, held_r0 = 0, held_r1 = 0;  // expanded rows held in `buffer`
    for (int64_t unit = first; unit < last; ++unit) {
      const int64_t n = unit / bands, o0 = (unit % bands) * band;
      const int64_t o1 = std::min(p.out_h, o0 + band);
      const int64_t r0 = std::clamp<int64_t>(o0 * s - p.top, 0, H);
      const int64_t r1 = std::clamp<int64_t>((o1 - 1) * s - p.top + k, 0, H);
      int64_t from = r0;  // the first row still to expand
      if (held_n == n && held_r0 <= r0 && r0 < held_r1) {  // keep the shared rows
        std::memmove(e, e + (r0 - held_r0) * W * C, (held_r1 - r0) * W * C * sizeof(float));
        from = held_r1;
      }
      if (from < r1) {
        const at::Tensor rows = at::from_blob(const_cast<float*>(xp) + (n * H + from) * W * Cin,
                                              {(r1 - from) * W, Cin}, x.options());
        at::Tensor expanded = buffer.narrow(0, (from - r0) * W, (r1 - from) * W);
        at::addmm_out(expanded, expand_bias, rows, expand_weight);
        float* q = expanded.data_ptr<float>();
        const int64_t count = expanded.numel();
        int64_t i = 0;
        for (; i + Vec::size() <= count; i += Vec::size())
          activation<kTanh>(Vec::loadu(q + i)).store(q + i);
        if (i < count) activation<kTanh>(Vec::loadu(q + i, count - i)).store(q + i, count - i);
      }
      held_n = n, held_r0 = r0, held_r1 = r1;
      for (int64_t ho = o0; ho < o1; ++ho) depthwise_row<kTanh, K>(p, e, r0, n, ho);
    }
  });
}

}  // namespace

// x [N, Cin, H, W] channels-last; expand_weight [Cin, C]; expand_bias [C];
// dw_weight [k, k, C]; dw_bias [C] -> [N, C, out_h, out_w] channels-last.
at::Tensor forward(const at::Tensor& x, const at::Tensor& expand_weight,
                   const at::Tensor& expand_bias, const at::Tensor& dw_weight,
                   const at::Tensor& dw_bias, int64_t stride, int64_t top, int64_t left,
                   int64_t out_h, int64_t out_w, int64_t band, bool tanh) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu() &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "expand_depthwise: x must be a float32 channels-last CPU tensor [N, C, H, W]");
  const int64_t C = expand_weight.size(1), k = dw_weight.size(0);
  for (const at::Tensor* t : {&expand_weight, &expand_bias, &dw_weight, &dw_bias})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(),
                "expand_depthwise: weights must be contiguous float32");
  TORCH_CHECK(expand_weight.dim() == 2 && expand_weight.size(0) == x.size(1) &&
                  expand_bias.numel() == C && dw_weight.dim() == 3 && dw_weight.size(1) == k &&
                  dw_weight.size(2) == C && dw_bias.numel() == C && band > 0 && stride > 0,
              "expand_depthwise: inconsistent shapes");
  at::Tensor out = at::empty({x.size(0), C, out_h, out_w},
                             x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const Problem p{dw_weight.data_ptr<float>(), dw_bias.data_ptr<float>(), out.data_ptr<float>(),
                  x.size(2), x.size(3), C, out_h, out_w, k, stride, top, left};
  if (k == 3)
    tanh ? run<true, 3>(x, expand_weight, expand_bias, p, band)
         : run<false, 3>(x, expand_weight, expand_bias, p, band);
  else
    tanh ? run<true, 0>(x, expand_weight, expand_bias, p, band)
         : run<false, 0>(x, expand_weight, expand_bias, p, band);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "GELU(depthwise(GELU(expand(x)))), NHWC float32, inference");
}
