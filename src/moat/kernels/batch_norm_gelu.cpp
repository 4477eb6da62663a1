// GELU(BatchNorm(x)) in training mode for float32 channels-last (NHWC) tensors on CPU.
//
// Eager PyTorch makes seven passes over the activation (statistics, normalisation, GELU;
// GELU's gradient and BatchNorm's two backward passes) plus the F.pad copy of the next
// 'SAME' convolution, and keeps both x and the normalised value for backward. Here it is
// two passes each way, the padding written in the same pass, and only x is kept: the
// normalised value is recomputed. GELU uses ATen's formulas (its erf approximation, with a
// faster exponential), so results match the unfused ops to about 1e-6 relative.
//
// Tensors are walked as lines of W pixels x C channels: channels contiguous, any stride
// between pixels and lines, so padded views (the gradient of F.pad) need no copy.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "gelu.h"

#include <cmath>
#include <vector>

namespace {

using moat_kernels::Vec;
using moat_kernels::gelu;
using moat_kernels::gelu_grad;
constexpr int64_t kFlushRows = 64;  // float partial sums over at most this many pixels

struct Lines {  // an NHWC view: line l = (n, h), pixel w, channel c
  float* data;
  int64_t height, width, channels, stride_n, stride_h, stride_w;
  explicit Lines(const at::Tensor& t)
      : data(t.data_ptr<float>()), height(t.size(2)), width(t.size(3)), channels(t.size(1)),
        stride_n(t.stride(0)), stride_h(t.stride(2)), stride_w(t.stride(3)) {}
  float* pixel(int64_t line, int64_t w) const {
    return data + (line / height) * stride_n + (line % height) * stride_h + w * stride_w;
  }
};

void check_nhwc(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.scalar_type() == at::kFloat && t.device().is_cpu() &&
                  t.stride(1) == 1,
              name, " must be a float32 CPU tensor [N, C, H, W] with contiguous channels "
              "(channels-last)");
}

// Split `lines` into one contiguous range per thread; fn(part, first, last).
template <typename F>
void for_each_part(int64_t parts, int64_t lines, const F& fn) {
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) fn(p, lines * p / parts, lines * (p + 1) / parts);
  });
}

// Two per-channel sums over all pixels: `fn(line, w, sum_a, sum_b)` adds one pixel's terms
// into float sums, which are moved into double ones every kFlushRows pixels. Each thread
// sums one contiguous part of the lines; the parts are added in a fixed order.
struct ChannelSums {
  std::vector<double> a, b;
  explicit ChannelSums(int64_t channels) : a(channels, 0.0), b(channels, 0.0) {}
  void flush(std::vector<float>& fa, std::vector<float>& fb) {
    for (size_t c = 0; c < a.size(); ++c) {
      a[c] += fa[c];
      b[c] += fb[c];
      fa[c] = fb[c] = 0.f;
    }
  }
};

template <typename PixelFn>
ChannelSums sum_over_pixels(int64_t lines, int64_t width, int64_t channels, const PixelFn& fn) {
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), lines);
  std::vector<ChannelSums> partial(parts, ChannelSums(channels));
  for_each_part(parts, lines, [&](int64_t part, int64_t first, int64_t last) {
    std::vector<float> fa(channels, 0.f), fb(channels, 0.f);
    int64_t run = 0;
    for (int64_t line = first; line < last; ++line) {
      for (int64_t w = 0; w < width; ++w) {
        fn(line, w, fa.data(), fb.data());
        if (++run == kFlushRows) {
          partial[part].flush(fa, fb);
          run = 0;
        }
      }
    }
    partial[part].flush(fa, fb);
  });
  ChannelSums total(channels);  // deterministic for a given thread count
  for (const auto& p : partial) {
    for (int64_t c = 0; c < channels; ++c) {
      total.a[c] += p.a[c];
      total.b[c] += p.b[c];
    }
  }
  return total;
}

// Vectorised loop over the channels of one pixel, with a partial last vector.
template <typename F>
inline void over_channels(int64_t channels, const F& fn) {
  int64_t c = 0;
  for (; c + Vec::size() <= channels; c += Vec::size()) fn(c, Vec::size());
  if (c < channels) fn(c, channels - c);
}

inline Vec load(const float* p, int64_t n) {
  return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n);
}
inline void store(const Vec& v, float* p, int64_t n) {
  if (n == Vec::size()) v.store(p); else v.store(p, n);
}


}  // namespace

// -> out (zero-padded by `pad` = left, right, top, bottom, as F.pad), mean, biased variance,
// 1/sqrt(var + eps). Padding here saves the copy that F.pad would make for the following
// 'SAME' convolution.
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& bias, double eps, std::vector<int64_t> pad) {
  check_nhwc(x, "x");
  const Lines in(x);
  const int64_t C = in.channels, lines = x.size(0) * in.height, count = lines * in.width;
  TORCH_CHECK(count > 1, "batch_norm_gelu: expected more than one value per channel");

  // Shifted sums (around the first pixel) keep the variance exact when |mean| >> std.
  const std::vector<float> shift(in.pixel(0, 0), in.pixel(0, 0) + C);
  const ChannelSums sums = sum_over_pixels(lines, in.width, C,
      [&](int64_t line, int64_t w, float* sum, float* sum_sq) {
        const float* px = in.pixel(line, w);
        over_channels(C, [&](int64_t c, int64_t n) {
          const Vec d = load(px + c, n) - load(shift.data() + c, n);
          store(load(sum + c, n) + d, sum + c, n);
          store(at::vec::fmadd(d, d, load(sum_sq + c, n)), sum_sq + c, n);
        });
      });

  auto stats = at::empty({3, C}, x.options());
  float *mean = stats[0].data_ptr<float>(), *var = stats[1].data_ptr<float>(),
        *invstd = stats[2].data_ptr<float>();
  std::vector<float> scale(C), offset(C);
  const float* w = weight.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    const double m = sums.a[c] / count;
    const double v = std::max(sums.b[c] / count - m * m, 0.0);
    mean[c] = static_cast<float>(shift[c] + m);
    var[c] = static_cast<float>(v);
    invstd[c] = static_cast<float>(1.0 / std::sqrt(v + eps));
    scale[c] = w[c] * invstd[c];
    offset[c] = b[c] - mean[c] * scale[c];
  }

  TORCH_CHECK(pad.size() == 4, "pad must be (left, right, top, bottom)");
  const int64_t left = pad[0], top = pad[2];
  auto out = at::empty({x.size(0), C, in.height + top + pad[3], in.width + left + pad[1]},
                       x.options().memory_format(at::MemoryFormat::ChannelsLast));
  out.narrow(2, 0, top).zero_();  // only the border: the interior is written below
  out.narrow(2, top + in.height, pad[3]).zero_();
  out.narrow(3, 0, left).zero_();
  out.narrow(3, left + in.width, pad[1]).zero_();
  const Lines interior(out.narrow(2, top, in.height).narrow(3, left, in.width));
  at::parallel_for(0, lines, 1, [&](int64_t first, int64_t last) {
    for (int64_t line = first; line < last; ++line) {
      for (int64_t px = 0; px < in.width; ++px) {
        const float* xp = in.pixel(line, px);
        float* op = interior.pixel(line, px);
        over_channels(C, [&](int64_t c, int64_t n) {
          const Vec y = at::vec::fmadd(load(xp + c, n), load(scale.data() + c, n),
                                       load(offset.data() + c, n));
          store(gelu(y), op + c, n);
        });
      }
    }
  });
  return {out, stats[0], stats[1], stats[2]};
}

// -> grad x, grad weight, grad bias
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x,
                                 const at::Tensor& weight, const at::Tensor& bias,
                                 const at::Tensor& mean, const at::Tensor& invstd) {
  check_nhwc(grad_out, "grad_out");
  check_nhwc(x, "x");
  const Lines in(x), dout(grad_out);
  const int64_t C = in.channels, lines = x.size(0) * in.height, count = lines * in.width;
  const float *w = weight.data_ptr<float>(), *b = bias.data_ptr<float>(),
              *m = mean.data_ptr<float>(), *is = invstd.data_ptr<float>();

  // Pass 1: dy = dout * gelu'(y) into grad_x, and the per-channel sums of dy and dy * xhat.
  auto grad_x = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  float* gx = grad_x.data_ptr<float>();
  const ChannelSums sums = sum_over_pixels(lines, in.width, C,
      [&](int64_t line, int64_t px, float* sum_dy, float* sum_dy_xhat) {
        const float* xp = in.pixel(line, px);
        const float* dp = dout.pixel(line, px);
        float* gp = gx + (line * in.width + px) * C;
        over_channels(C, [&](int64_t c, int64_t n) {
          const Vec xhat = (load(xp + c, n) - load(m + c, n)) * load(is + c, n);
          const Vec y = at::vec::fmadd(xhat, load(w + c, n), load(b + c, n));
          const Vec dy = load(dp + c, n) * gelu_grad(y);
          store(dy, gp + c, n);
          store(load(sum_dy + c, n) + dy, sum_dy + c, n);
          store(at::vec::fmadd(dy, xhat, load(sum_dy_xhat + c, n)), sum_dy_xhat + c, n);
        });
      });

  auto grad_weight = at::empty({C}, x.options()), grad_bias = at::empty({C}, x.options());
  float *gw = grad_weight.data_ptr<float>(), *gb = grad_bias.data_ptr<float>();
  // grad_x = a * (dy - mean(dy) - xhat * mean(dy * xhat)) = a * dy - k * x + k0
  std::vector<float> a(C), k(C), k0(C);
  for (int64_t c = 0; c < C; ++c) {
    gb[c] = static_cast<float>(sums.a[c]);
    gw[c] = static_cast<float>(sums.b[c]);
    a[c] = w[c] * is[c];
    const double mean_dy = sums.a[c] / count, mean_dy_xhat = sums.b[c] / count;
    k[c] = static_cast<float>(a[c] * is[c] * mean_dy_xhat);
    k0[c] = static_cast<float>(k[c] * static_cast<double>(m[c]) - a[c] * mean_dy);
  }

  // Pass 2, in place.
  at::parallel_for(0, lines * in.width, 1, [&](int64_t first, int64_t last) {
    for (int64_t px = first; px < last; ++px) {
      const float* xp = in.pixel(px / in.width, px % in.width);
      float* gp = gx + px * C;
      over_channels(C, [&](int64_t c, int64_t n) {
        const Vec rest = at::vec::fmadd(Vec(0.f) - load(k.data() + c, n), load(xp + c, n),
                                        load(k0.data() + c, n));
        store(at::vec::fmadd(load(a.data() + c, n), load(gp + c, n), rest), gp + c, n);
      });
    }
  });
  return {grad_x, grad_weight, grad_bias};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "GELU(BatchNorm(x)) in training mode, NHWC float32");
  m.def("backward", &backward, "its gradient with respect to x, weight and bias");
}
