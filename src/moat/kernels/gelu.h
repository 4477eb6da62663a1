// GELU on ATen's vectors, shared by the kernels in this folder (each .cpp includes it; the
// extension's build name hashes it with the source, so a change here rebuilds them).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>

namespace moat_kernels {

using Vec = at::vec::Vectorized<float>;

// erf as ATen's Vectorized<float>::erf (Abramowitz & Stegun 7.1.26, error < 1.5e-7), with
// the faster exp_u20 (relative error ~1e-6); `gauss` = exp(-x^2) is returned for reuse.
inline Vec erf(const Vec& x, Vec& gauss) {
  const Vec a = x.abs();
  const Vec t = Vec(1.f) / at::vec::fmadd(Vec(0.3275911f), a, Vec(1.f));
  Vec r = at::vec::fmadd(Vec(1.061405429f), t, Vec(-1.453152027f));
  r = at::vec::fmadd(r, t, Vec(1.421413741f));
  r = at::vec::fmadd(r, t, Vec(-0.284496736f));
  r = at::vec::fmadd(r, t, Vec(0.254829592f));
  gauss = (Vec(0.f) - x * x).exp_u20();
  const Vec e = Vec(1.f) - r * t * gauss;
  return Vec::blendv(e, Vec(0.f) - e, x < Vec(0.f));
}

// ATen's exact GELU and its derivative (GeluKernel.cpp): x * Phi(x), Phi(x) + x * phi(x).
inline Vec gelu(const Vec& y) {
  Vec gauss;
  return y * Vec(0.5f) * (Vec(1.f) + erf(y * Vec(M_SQRT1_2), gauss));
}
inline Vec gelu_grad(const Vec& y) {
  Vec gauss;  // exp(-y^2 / 2): the same exponential serves the density
  const Vec cdf = Vec(0.5f) * (Vec(1.f) + erf(y * Vec(M_SQRT1_2), gauss));
  return at::vec::fmadd(y * Vec(M_2_SQRTPI * M_SQRT1_2 * 0.5), gauss, cdf);
}

// The exact GELU with erf as a rational function, for inference: erf(x) = x P(x^2) / Q(x^2)
// on |x| <= 3.925 (+-1 beyond, where float32's erf is 1), degrees 5 / 5, fitted by
// benchmarks/gelu_fit.py: largest error 3.7e-7 in float32 over all x (the formula above:
// 6.1e-7). No exponential: GELU about a third faster than `gelu` above, which training
// keeps because its backward reuses that exponential.
inline Vec gelu_rational(const Vec& y) {
  const Vec x = at::vec::clamp(y * Vec(M_SQRT1_2), Vec(-3.925f), Vec(3.925f));
  const Vec t = x * x;
  Vec p = at::vec::fmadd(Vec(2.030856352297109e-06f), t, Vec(0.00028748868564494454f));
  p = at::vec::fmadd(p, t, Vec(0.00387625876790066f));
  p = at::vec::fmadd(p, t, Vec(0.053084151272030186f));
  p = at::vec::fmadd(p, t, Vec(0.19297121570357598f));
  p = at::vec::fmadd(p, t, Vec(1.1283790199359778f));
  Vec q = at::vec::fmadd(Vec(3.803112695517637e-05f), t, Vec(0.0011897295207702883f));
  q = at::vec::fmadd(q, t, Vec(0.015188226644282403f));
  q = at::vec::fmadd(q, t, Vec(0.11516688208575318f));
  q = at::vec::fmadd(q, t, Vec(0.5043479265013574f));
  q = at::vec::fmadd(q, t, Vec(1.f));
  const Vec half_y = y * Vec(0.5f);
  return at::vec::fmadd(half_y, x * p / q, half_y);
}

// GELU's tanh approximation, as ATen's (approximate="tanh"):
// 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))).
inline Vec gelu_tanh(const Vec& y) {
  const Vec inner = Vec(M_2_SQRTPI * M_SQRT1_2) * at::vec::fmadd(Vec(0.044715f) * y, y * y, y);
  return y * Vec(0.5f) * (Vec(1.f) + inner.tanh());
}

}  // namespace moat_kernels
