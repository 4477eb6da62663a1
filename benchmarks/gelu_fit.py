"""Where the inference kernel's GELU comes from: erf(x) ~ x P(x^2) / Q(x^2), fitted here.

`moat/kernels/gelu.h` (`gelu_rational`) evaluates erf as a rational function of degrees 5 / 5
in x^2 on |x| <= 3.925 (+-1 beyond, where float32's erf is 1), with no exponential. This
script fits the coefficients (least squares, reweighted towards the largest errors, on
[0, 3.925]) and prints, in float32 arithmetic over [-6, 6], the largest error of that erf
and of ATen's formula (Abramowitz & Stegun 7.1.26 with an exponential), which the training
kernel keeps:

    python benchmarks/gelu_fit.py
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf

CLAMP = 3.925
DEGREES = (5, 5)


def fit(m: int, n: int, rounds: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """P (m + 1 coefficients) and Q (n + 1, Q[0] = 1), lowest degree first."""
    x = np.concatenate([(1 + np.cos(np.linspace(0, np.pi, 4000))) * CLAMP / 2,
                        np.linspace(0, CLAMP, 4000)])
    t, f = x * x, erf(x)
    weight, q = np.ones_like(x), np.ones_like(x)
    for _ in range(rounds):  # x P(t) - f (Q(t) - 1) = f, linear in the coefficients
        a = np.concatenate([x[:, None] * t[:, None] ** np.arange(m + 1),
                            -f[:, None] * t[:, None] ** np.arange(1, n + 1)], 1)
        w = weight / np.abs(q)
        solution = np.linalg.lstsq(a * w[:, None], f * w, rcond=None)[0]
        p, qs = solution[:m + 1], np.concatenate([[1.0], solution[m + 1:]])
        q = np.polyval(qs[::-1], t)
        error = np.abs(x * np.polyval(p[::-1], t) / q - f)
        weight = weight * (1 + 2 * error / error.max())
    return p, qs


def horner32(coefficients: np.ndarray, t: np.ndarray) -> np.ndarray:
    result = np.full_like(t, np.float32(coefficients[-1]))
    for c in coefficients[-2::-1]:
        result = result * t + np.float32(c)
    return result


def rational_erf32(p: np.ndarray, q: np.ndarray, x: np.ndarray) -> np.ndarray:
    x = np.clip(x.astype(np.float32), -CLAMP, CLAMP)
    t = x * x
    return x * horner32(p, t) / horner32(q, t)


def aten_erf32(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    a = np.abs(x)
    t = np.float32(1) / (np.float32(0.3275911) * a + 1)
    r = horner32(np.array([0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429]), t)
    return np.sign(x) * (1 - r * t * np.exp(-x * x))


def main() -> None:
    p, q = fit(*DEGREES)
    x = np.linspace(-6, 6, 2_000_001)
    exact = erf(x)
    print(f"P = {list(map(float, p))}\nQ = {list(map(float, q))}")
    print("| erf in float32 | largest error on [-6, 6] |\n|---|---|")
    print(f"| rational {DEGREES[0]}/{DEGREES[1]} (inference kernel) | "
          f"{np.abs(rational_erf32(p, q, x) - exact).max():.2e} |")
    print(f"| ATen's A&S 7.1.26 (training kernel) | {np.abs(aten_erf32(x) - exact).max():.2e} |")


if __name__ == "__main__":
    main()
