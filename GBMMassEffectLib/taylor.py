"""Taylor (gradient) test that asserts the convergence orders (MODEL.md §4, cf. hippylib modelVerify).

For J(x + ε·dx), with g = ∇J(x):
    r1(ε) = |J(x + ε dx) − J(x)|            ∝ ε   (first order)
    r2(ε) = |J(x + ε dx) − J(x) − ε gᵀdx|   ∝ ε²  (second order, if g is exact)
ε is halved each level; the observed order is log2(r(ε)/r(ε/2)).  Round-off stops the ε²
decay for small ε, so the test requires a *window* of consecutive levels (above
round-off) where the second-order slope is ≈ 2, and checks that the first-order slope has
reached ≈ 1 at the small-ε end of that window (for larger ε the ε² term still shows in r1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class TaylorResult:
    eps: np.ndarray
    r1: np.ndarray
    r2: np.ndarray
    order1: np.ndarray  # log2 ratios between consecutive levels
    order2: np.ndarray
    window: tuple[int, int] | None  # [start, stop) indices into order2 of the best window

    def table(self) -> str:
        lines = [f"{'eps':>10} {'r1':>12} {'r2':>12} {'order1':>7} {'order2':>7}"]
        for i, e in enumerate(self.eps):
            o1 = f"{self.order1[i - 1]:7.3f}" if i else " " * 7
            o2 = f"{self.order2[i - 1]:7.3f}" if i else " " * 7
            lines.append(f"{e:10.3e} {self.r1[i]:12.5e} {self.r2[i]:12.5e} {o1} {o2}")
        return "\n".join(lines)


def taylor_test(J, grad_dot_dx: float, x, dx, eps0: float = 1.0, levels: int = 10,
                J0: float | None = None) -> TaylorResult:
    """Evaluate r1, r2 for ε = eps0·2^{-i}, i < levels.  J: callable on x (array or float)."""
    J0 = float(J(x)) if J0 is None else J0
    eps = eps0 * 0.5 ** np.arange(levels)
    r1 = np.empty(levels)
    r2 = np.empty(levels)
    for i, e in enumerate(eps):
        Je = float(J(x + e * dx))
        r1[i] = abs(Je - J0)
        r2[i] = abs(Je - J0 - e * grad_dot_dx)
    with np.errstate(divide="ignore", invalid="ignore"):
        o1 = np.log2(r1[:-1] / r1[1:])
        o2 = np.log2(r2[:-1] / r2[1:])
    return TaylorResult(eps, r1, r2, o1, o2, None)


def assert_taylor(res: TaylorResult, min_window: int = 3, tol2: float = 0.25, tol1: float = 0.15,
                  label: str = "") -> TaylorResult:
    """Assert a window of ≥ min_window consecutive ratios with order2 ≈ 2 and order1 ≈ 1."""
    ok2 = np.abs(res.order2 - 2.0) <= tol2
    best, start = (0, 0), None
    for i, good in enumerate(list(ok2) + [False]):
        if good and start is None:
            start = i
        if not good and start is not None:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    res.window = best if best[1] > best[0] else None
    length = best[1] - best[0]
    if length < min_window:
        raise AssertionError(f"Taylor test {label}: second-order remainder does not decay as ε² over "
                             f"{min_window} consecutive levels\n{res.table()}")
    # r1 = |ε gᵀdx + O(ε²)| approaches order 1 only as ε → 0: check the window's last ratio
    o1 = res.order1[best[1] - 1]
    if not abs(o1 - 1.0) <= tol1:
        raise AssertionError(f"Taylor test {label}: first-order remainder not ∝ ε in the window\n{res.table()}")
    if not math.isfinite(float(res.r2[best[0]])):
        raise AssertionError(f"Taylor test {label}: non-finite remainder\n{res.table()}")
    return res
