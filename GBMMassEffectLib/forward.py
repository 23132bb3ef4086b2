"""The forward model with mass effect: the coupled time loop of MODEL.md §3.

Before the first step: t = 0 filter wm ← wm(1−c0), gm ← gm(1−c0); one elasticity solve
with the force of c0 from u = 0, kept as u_old; v = 0. Then nt + 1 steps (26 by default,
t_end = (nt+1)·dt = 1.04: the reference's convention for "c(1)"), each in this order:
  1. CFL = dt·max|v|/h (|v| the per-voxel magnitude); ≥ cfl_limit (14) stops the solve:
     on_cfl="raise" raises CFLError, on_cfl="flag" returns the state reached, flagged
     (what the reference does silently; S.3 scores such an evaluation).
  2. k(x), ρ(x) from the tissues before this step's advection.
  3. Semi-Lagrangian advection with v: wm, gm, c conservative, vt, csf plain.
  4. Crank–Nicolson diffusion with the k of step 2 (PCG, rtol 1e-6, warm start).
  5. Exact logistic reaction with the ρ of step 2.
  6. Elasticity: µ, λ, η from the advected tissues and the new c, force from the new c,
     PCG warm-started from the previous in-loop u (the first in-loop solve from 0).
  7. v = G_σ * (u − u_old)/dt (σ one voxel), u_old ← u.
With γ = 0 the force is 0, u ≡ v ≡ 0, the advection is the identity, and c(1) is exactly
the Lie-split reaction–diffusion of steps 4–5.

All arrays stay on the backend (numpy or cupy); callers convert with backend.to_numpy.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .advection import SemiLagrangian
from .diffusion import CrankNicolson
from .elasticity import Elasticity, ElasticityCoefficients, FFTMeter
from .progress import Cancelled
from .reaction import logistic_step_nonnegative
from .spectral import SpectralOps
from .tissue import Tissues


class CFLError(RuntimeError):
    """The velocity grew so large that dt·max|v|/h ≥ the CFL limit (MODEL.md §3 step 1)."""


@dataclass(frozen=True)
class ForwardParams:
    """Model parameters (paper units) and solver settings of the §3 forward model."""

    kappa: float
    rho: float
    gamma: float
    nt: int = 25
    dt: float = 0.04
    r_k: float = 0.0
    r_rho: float = 0.0
    elasticity_rtol: float = 1e-3
    elasticity_maxiter: int = 100
    diffusion_rtol: float = 1e-6
    cfl_limit: float = 14.0

    def __post_init__(self):
        for name in ("kappa", "rho", "gamma", "dt", "r_k", "r_rho", "elasticity_rtol",
                     "diffusion_rtol", "cfl_limit"):
            val = getattr(self, name)
            if not isinstance(val, (int, float, np.floating, np.integer)) or not math.isfinite(val):
                raise ValueError(f"ForwardParams.{name} must be a finite number, got {val!r}")
        if self.kappa < 0 or self.rho < 0 or self.gamma < 0:
            raise ValueError(
                f"kappa, rho and gamma must be ≥ 0, got kappa={self.kappa}, rho={self.rho}, gamma={self.gamma}")
        if int(self.nt) != self.nt or self.nt < 0:
            raise ValueError(f"ForwardParams.nt must be a non-negative integer, got {self.nt!r}")
        if self.dt <= 0:
            raise ValueError(f"ForwardParams.dt must be positive, got {self.dt}")
        if int(self.elasticity_maxiter) != self.elasticity_maxiter or self.elasticity_maxiter < 1:
            raise ValueError(f"elasticity_maxiter must be a positive integer, got {self.elasticity_maxiter!r}")

    @property
    def n_steps(self) -> int:
        return int(self.nt) + 1


@dataclass
class StepStats:
    """What one time step did (passed to the progress callback, kept in ForwardStats)."""

    step: int  # 0 … nt
    n_steps: int
    t: float  # model time reached after this step, (step+1)·dt
    cfl: float  # at the start of the step
    elasticity_iterations: int = 0
    elasticity_converged: bool = True
    diffusion_iterations: int = 0
    seconds: float = 0.0

    @property
    def fraction(self) -> float:
        return (self.step + 1) / self.n_steps


@dataclass
class ForwardStats:
    initial_elasticity_iterations: int = 0
    steps: list = field(default_factory=list)
    cfl_max: float = 0.0
    cfl_exceeded: bool = False
    steps_completed: int = 0
    fft_forward: int = 0
    fft_inverse: int = 0
    elasticity_fft: int = 0  # of which inside the elasticity (force, PCG, solution)
    interpolated_fields: int = 0  # single-field cubic interpolations (incl. trajectories)
    seconds_total: float = 0.0
    seconds_fft: float = 0.0  # all FFTs of the solve (elasticity, diffusion, advection, …)
    seconds_elasticity: float = 0.0  # elasticity solves (PCG, incl. their FFTs)
    seconds_elasticity_fft: float = 0.0
    seconds_advection: float = 0.0  # trajectories + interpolation + conservative updates
    seconds_diffusion: float = 0.0  # CN solves (incl. their FFTs)
    seconds_other: float = 0.0

    @property
    def elasticity_iterations(self) -> list[int]:
        return [s.elasticity_iterations for s in self.steps]

    @property
    def diffusion_iterations(self) -> list[int]:
        return [s.diffusion_iterations for s in self.steps]

    @property
    def total_elasticity_iterations(self) -> int:
        return self.initial_elasticity_iterations + sum(self.elasticity_iterations)


@dataclass
class Snapshot:
    t: float
    c: object
    u: object
    tissues: Tissues


@dataclass
class ForwardResult:
    c: object  # tumor c at t_end
    tissues: Tissues  # wm, gm, vt, csf at t_end (bg fixed)
    u: object  # displacement (3, n, n, n) in domain units
    v: object  # smoothed velocity (3, n, n, n)
    stats: ForwardStats
    t_end: float
    snapshots: dict = field(default_factory=dict)  # requested t → Snapshot
    cfl_flagged: bool = False

    def displacement_norm(self):
        """|u| per voxel (domain units)."""
        u = self.u
        return (u[0] * u[0] + u[1] * u[1] + u[2] * u[2]) ** 0.5


def _metered_ops(ops: SpectralOps, meter: FFTMeter) -> SpectralOps:
    """A shallow copy of ops whose fft/ifft (and so grad, div, smooth, …) go through meter."""
    m = copy.copy(ops)
    m.fft = meter.fft
    m.ifft = meter.ifft
    return m


def _check_inputs(ops: SpectralOps, tissues: Tissues, c0):
    n = ops.n
    xp = ops.xp
    c0 = xp.asarray(c0, dtype=ops.dtype)
    if tuple(c0.shape) != (n, n, n):
        raise ValueError(f"c0 must have shape ({n}, {n}, {n}) for this grid, got {tuple(c0.shape)}")
    for name in ("wm", "gm", "vt", "csf", "bg"):
        a = getattr(tissues, name)
        if tuple(a.shape) != (n, n, n):
            raise ValueError(f"tissue map {name} must have shape ({n}, {n}, {n}), got {tuple(a.shape)}")
    if not bool(xp.all(xp.isfinite(c0))):
        raise ValueError("c0 contains NaN or Inf")
    maps = [getattr(tissues, name) for name in ("wm", "gm", "vt", "csf", "bg")]
    if any(getattr(a, "dtype", None) != ops.dtype or not isinstance(a, xp.ndarray) for a in maps):
        tissues = Tissues(*[xp.asarray(a, dtype=ops.dtype) for a in maps])
    return c0, tissues


def run_forward(ops: SpectralOps, tissue: Tissues, c0, params: ForwardParams,
                progress: Callable[[StepStats], None] | None = None,
                cancel: Callable[[], bool] | None = None,
                snapshot_times=(), on_cfl: str = "raise") -> ForwardResult:
    """Solve the §3 forward model from c0 on the given tissues; see the module docstring.

    tissue: tissue fractions at t = 0 before the tumor filter (not modified), used as given:
    smooth them first (Tissues.smoothed) where MODEL §2 asks for it; the §8 regression
    does not. gamma = 0 skips the elasticity (u ≡ v ≡ 0, exactly §3's γ = 0 limit).
    progress(step_stats) is called after every step; cancel() is polled before every step
    and a True raises progress.Cancelled. snapshot_times: model times (0 … (nt+1)·dt)
    whose state (c, u, tissues) is kept; each is matched to the nearest step.
    """
    if on_cfl not in ("raise", "flag"):
        raise ValueError(f"on_cfl must be 'raise' or 'flag', not {on_cfl!r}")
    t_start = time.perf_counter()
    xp = ops.xp
    dtype = ops.dtype
    dt = float(params.dt)
    n_steps = params.n_steps
    c, tissue = _check_inputs(ops, tissue, c0)
    snap_index = {}
    for ts in snapshot_times:
        ts = float(ts)
        idx = int(round(ts / dt))
        if not (0 <= idx <= n_steps) or abs(idx * dt - ts) > 0.5 * dt + 1e-12:
            raise ValueError(f"snapshot time {ts} is outside [0, {n_steps * dt:g}]")
        snap_index.setdefault(idx, []).append(ts)
    snapshots: dict = {}

    def _snap(idx, c, u, tissues):
        for ts in snap_index.get(idx, ()):
            snapshots[ts] = Snapshot(idx * dt, c.copy(), u.copy(), tissues.copy())

    def _check_cancel():
        if cancel is not None and cancel():
            raise Cancelled("forward solve cancelled")

    meter = FFTMeter(ops)
    mops = _metered_ops(ops, meter)
    stats = ForwardStats()
    el_meter = FFTMeter(ops)  # the elasticity's own transforms, counted apart
    elastic = Elasticity(ops, params.elasticity_rtol, params.elasticity_maxiter, meter=el_meter)
    gauss = ops.gaussian_multiplier(ops.h)
    mass_effect = params.gamma != 0.0

    # ---- t = 0: tumor filter, initial elasticity solve (u_old), v = 0 -------------------
    _check_cancel()
    tissues = tissue.filter_tumor(c)
    zeros3 = xp.zeros((3,) + c.shape, dtype=dtype)
    if mass_effect:
        t0 = time.perf_counter()
        sol = elastic.solve(elastic.force(c, params.gamma), ElasticityCoefficients.from_tissues(tissues, c))
        stats.seconds_elasticity += time.perf_counter() - t0
        stats.initial_elasticity_iterations = sol.info.iterations
        u_old, u_old_hat = sol.u, sol.u_hat
    else:
        u_old, u_old_hat = zeros3, None
    u = u_old
    v = zeros3.copy()
    u_prev_hat = None  # warm start of the in-loop solves: the first one starts from 0
    _snap(0, c, u, tissues)

    for i in range(n_steps):
        _check_cancel()
        t_step = time.perf_counter()
        # 1. CFL
        vmax = float(xp.max(xp.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])))
        cfl = dt * vmax / ops.h
        stats.cfl_max = max(stats.cfl_max, cfl)
        if not cfl < params.cfl_limit:
            stats.cfl_exceeded = True
            if on_cfl == "raise":
                raise CFLError(
                    f"CFL number {cfl:.3g} ≥ {params.cfl_limit:g} at step {i} (t = {i * dt:.3g}): "
                    f"the displacement velocity is too large for dt = {dt:g}; "
                    f"use a smaller gamma (now {params.gamma:g}) or more time steps")
            break
        st = StepStats(step=i, n_steps=n_steps, t=(i + 1) * dt, cfl=cfl)
        # 2. coefficients before advection
        t0 = time.perf_counter()
        k = tissues.diffusivity(params.kappa, params.r_k)
        rho = tissues.proliferation(params.rho, params.r_rho)
        stats.seconds_other += time.perf_counter() - t0
        # 3. advection
        t0 = time.perf_counter()
        advect = SemiLagrangian(mops, dt)  # per step: its stencils are freed before step 6
        advect.set_velocity(v)
        if advect.interpolator is not None:
            stats.interpolated_fields += 4 + 5  # v at X* (3), ∇·v at X (1); wm, gm, c, vt, csf
        cons = advect.transport_conservative(xp.stack([tissues.wm, tissues.gm, c]))
        plain = advect.transport(xp.stack([tissues.vt, tissues.csf]))
        tissues = Tissues(cons[0], cons[1], plain[0], plain[1], tissues.bg)
        c = cons[2]
        del advect, cons, plain
        stats.seconds_advection += time.perf_counter() - t0
        # 4. diffusion
        t0 = time.perf_counter()
        cn = CrankNicolson(mops, k, dt, rtol=params.diffusion_rtol)
        c = cn.step(c)
        st.diffusion_iterations = cn.last_info.iterations if cn.last_info else 0
        stats.seconds_diffusion += time.perf_counter() - t0
        # 5. reaction
        t0 = time.perf_counter()
        c = logistic_step_nonnegative(xp, c, rho, dt).astype(dtype, copy=False)
        stats.seconds_other += time.perf_counter() - t0
        # 6.–7. elasticity and velocity
        if mass_effect:
            t0 = time.perf_counter()
            coef = ElasticityCoefficients.from_tissues(tissues, c)
            sol = elastic.solve(elastic.force(c, params.gamma), coef, u0_hat=u_prev_hat)
            stats.seconds_elasticity += time.perf_counter() - t0
            st.elasticity_iterations = sol.info.iterations
            st.elasticity_converged = sol.info.converged
            t0 = time.perf_counter()
            u, u_hat = sol.u, sol.u_hat
            V = u_hat - u_old_hat
            V *= gauss * dtype.type(1.0 / dt)
            v = mops.ifft(V)  # G_σ * (u − u_old)/dt, from the spectra already at hand
            u_old, u_old_hat, u_prev_hat = u, u_hat, u_hat
            stats.seconds_other += time.perf_counter() - t0
        st.seconds = time.perf_counter() - t_step
        stats.steps.append(st)
        stats.steps_completed = i + 1
        _snap(i + 1, c, u, tissues)
        if progress is not None:
            progress(st)

    stats.fft_forward = meter.forward + el_meter.forward
    stats.fft_inverse = meter.inverse + el_meter.inverse
    stats.elasticity_fft = el_meter.total
    stats.seconds_fft = meter.seconds + el_meter.seconds
    stats.seconds_elasticity_fft = el_meter.seconds
    stats.seconds_total = time.perf_counter() - t_start
    return ForwardResult(c=c, tissues=tissues, u=u, v=v, stats=stats,
                         t_end=stats.steps_completed * dt, snapshots=snapshots,
                         cfl_flagged=stats.cfl_exceeded)
