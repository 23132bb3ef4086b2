"""§4 Strang reaction–diffusion model and its exact discrete adjoint (MODEL.md §4)."""
from __future__ import annotations

import numpy as np
import pytest

from GBMMassEffectLib.backend import get_backend
from GBMMassEffectLib.reaction_diffusion import ReactionDiffusion, coefficient_fraction
from GBMMassEffectLib.spectral import SpectralOps
from GBMMassEffectLib.taylor import assert_taylor, taylor_test


def _setup(n=24, nt=8, rtol=1e-13):
    ops = SpectralOps(n, get_backend("cpu", "float64"))
    h = ops.h
    x, y, z = ops.coordinates()
    wm = np.broadcast_to(0.5 + 0.4 * np.sin(x) * np.sin(2 * y) * np.cos(z), (n, n, n)).copy()
    rd = ReactionDiffusion(ops, wm, nt=nt, rtol=rtol)
    r2 = (x - 3.0) ** 2 + (y - 3.2) ** 2 + (z - 2.9) ** 2
    c0 = np.exp(-r2 / (2 * (2 * h) ** 2))
    d = 0.8 * np.exp(-r2 / (2 * (3 * h) ** 2))
    return ops, rd, c0, d


def _objective(ops, rd, d):
    h3 = ops.h**3

    def J(c0, kappa, rho):
        c1 = rd.forward(c0, kappa, rho)
        return 0.5 * h3 * float(np.sum((c1 - d) ** 2))

    return J


@pytest.fixture(scope="module")
def problem():
    ops, rd, c0, d = _setup()
    kappa, rho = 0.03, 8.0
    traj = rd.forward(c0, kappa, rho, store=True)
    lam0, g_kappa, g_rho = rd.adjoint(traj, ops.h**3 * (traj.c1 - d))
    J = _objective(ops, rd, d)
    return dict(ops=ops, rd=rd, c0=c0, d=d, kappa=kappa, rho=rho, J=J, J0=J(c0, kappa, rho),
                lam0=lam0, g_kappa=g_kappa, g_rho=g_rho)


def test_taylor_c0(problem):
    P = problem
    dc = np.random.default_rng(0).standard_normal(P["c0"].shape) * P["c0"]
    res = taylor_test(lambda e: P["J"](P["c0"] + e * dc, P["kappa"], P["rho"]),
                      float(np.sum(P["lam0"] * dc)), 0.0, 1.0, eps0=2e-2, levels=9, J0=P["J0"])
    print("\nTaylor test, direction in c0\n" + res.table())
    assert_taylor(res, min_window=5, label="c0")


def test_taylor_kappa(problem):
    P = problem
    res = taylor_test(lambda k: P["J"](P["c0"], k, P["rho"]), P["g_kappa"] * P["kappa"],
                      P["kappa"], P["kappa"], eps0=0.25, levels=9, J0=P["J0"])
    print("\nTaylor test, kappa\n" + res.table())
    assert_taylor(res, min_window=5, label="kappa")


def test_taylor_rho(problem):
    P = problem
    res = taylor_test(lambda r: P["J"](P["c0"], P["kappa"], r), P["g_rho"], P["rho"], 1.0,
                      eps0=0.5, levels=9, J0=P["J0"])
    print("\nTaylor test, rho\n" + res.table())
    assert_taylor(res, min_window=5, label="rho")


def test_recompute_mode_gives_identical_gradient(problem):
    P = problem
    rd = P["rd"]
    traj = rd.forward(P["c0"], P["kappa"], P["rho"], store="steps")
    assert len(traj.ca) == 0 and len(traj.c) == rd.nt + 1
    lam0, gk, gr = rd.adjoint(traj, P["ops"].h ** 3 * (traj.c1 - P["d"]))
    assert np.array_equal(lam0, P["lam0"]) and gk == P["g_kappa"] and gr == P["g_rho"]


def test_pure_logistic_and_pure_diffusion():
    ops, rd, c0, d = _setup(n=16, nt=8)
    # no diffusivity: nt exact logistic steps compose to the exact logistic over t = 1
    rd0 = ReactionDiffusion(ops, np.zeros((16,) * 3), m_rho=np.ones((16,) * 3), nt=8, rtol=1e-13)
    c1 = rd0.forward(0.5 * c0, 0.1, 5.0)
    e = np.exp(5.0)
    assert np.abs(c1 - 0.5 * c0 * e / (0.5 * c0 * e + 1 - 0.5 * c0)).max() < 1e-13
    # no reaction: CN diffusion conserves the total mass
    rdd = ReactionDiffusion(ops, rd.m_k, m_rho=np.zeros((16,) * 3), nt=8, rtol=1e-13)
    c1 = rdd.forward(c0, 0.05, 5.0)
    assert abs(c1.sum() - c0.sum()) < 1e-11 * c0.sum()
    assert c1.max() < 0.95 * c0.max()  # spread out


def test_strang_second_order_in_time():
    ops, _, c0, _ = _setup(n=16)
    x, y, z = ops.coordinates()
    wm = np.broadcast_to(0.5 + 0.4 * np.sin(x) * np.sin(2 * y) * np.cos(z), (16,) * 3)
    ref = ReactionDiffusion(ops, wm, nt=320, rtol=1e-13).forward(c0, 0.05, 8.0)
    errs = [np.abs(ReactionDiffusion(ops, wm, nt=nt, rtol=1e-13).forward(c0, 0.05, 8.0) - ref).max()
            for nt in (10, 20, 40)]
    ratios = [errs[i] / errs[i + 1] for i in range(2)]
    print("\nStrang errors", errs, "ratios", ratios)
    assert all(3.5 < r < 4.6 for r in ratios)


def test_coefficient_fraction_and_validation():
    wm = np.array([0.6, 0.0, 0.3])
    gm = np.array([0.2, 0.5, 0.0])
    vt = np.array([0.1, 0.0, 0.0])
    csf = np.array([0.0, 0.0, -0.1])
    assert np.allclose(coefficient_fraction(wm, gm, vt, csf), [0.6, 0.0, 0.3])
    assert np.allclose(coefficient_fraction(wm, gm, vt, csf, gm_ratio=0.2), [0.64, 0.1, 0.3])
    ops = SpectralOps(16, get_backend("cpu", "float64"))
    with pytest.raises(ValueError, match="m_k"):
        ReactionDiffusion(ops, np.ones((8, 8, 8)))
    rd = ReactionDiffusion(ops, np.ones((16,) * 3))
    with pytest.raises(ValueError, match="kappa"):
        rd.forward(np.zeros((16,) * 3), 0.0, 1.0)


def test_negative_values_do_not_blow_up_and_switch_is_differentiated_exactly():
    """Positivity safeguard (reaction off where c ≤ −2τ, C¹ switch on [−2τ, −τ]).

    Without it a negative undershoot grows by e^{ρdt} per step and the exact logistic hits
    its pole; with it c stays bounded.  The Taylor test puts c0 values inside the switch
    band (τ = 0.05, c0 down to −0.08), so the switch's own derivative is exercised.
    """
    ops, _, c0, d = _setup(n=16, nt=4)
    x, y, z = ops.coordinates()
    wm = np.broadcast_to(0.5 + 0.4 * np.sin(x) * np.sin(2 * y) * np.cos(z), (16,) * 3).copy()
    dip = np.exp(-((x - 5.2) ** 2 + (y - 1.2) ** 2 + (z - 4.8) ** 2) / (2 * (2 * ops.h) ** 2))
    c0 = c0 - 0.08 * dip
    # blow-up without the switch, bounded with it (a strong undershoot, large ρ)
    wild = c0 - 0.5 * dip
    off = ReactionDiffusion(ops, wm, nt=4, rtol=1e-13, negative_cutoff=0.0).forward(wild, 1e-3, 18.0)
    on = ReactionDiffusion(ops, wm, nt=4, rtol=1e-13).forward(wild, 1e-3, 18.0)
    assert not np.all(np.isfinite(off)) or np.abs(off).max() > 10
    assert np.all(np.isfinite(on)) and on.min() > -0.6 and on.max() < 1.1
    rd = ReactionDiffusion(ops, wm, nt=4, rtol=1e-13, negative_cutoff=0.05)
    assert -0.1 < c0.min() < -0.05
    kappa, rho = 0.02, 9.0
    traj = rd.forward(c0, kappa, rho, store=True)
    h3 = ops.h**3
    lam0, gk, gr = rd.adjoint(traj, h3 * (traj.c1 - d))
    J = lambda c, k, r: 0.5 * h3 * float(np.sum((rd.forward(c, k, r) - d) ** 2))
    dc = np.random.default_rng(1).standard_normal(c0.shape) * (np.abs(c0) + 0.01)
    dk, dr = 0.3 * kappa, 1.0
    res = taylor_test(lambda e: J(c0 + e * dc, kappa + e * dk, rho + e * dr),
                      float(np.sum(lam0 * dc)) + gk * dk + gr * dr, 0.0, 1.0, eps0=5e-2, levels=12,
                      J0=J(c0, kappa, rho))
    print("\nTaylor test through the negative-value switch\n" + res.table())
    assert_taylor(res, min_window=5, label="switch")
