"""Exact logistic reaction step (MODEL.md §3 step 5): c⁺ = c·e^{ρdt} / (c·e^{ρdt} + 1 − c)."""
from __future__ import annotations


def logistic_step(xp, c, rho, dt: float):
    """Exact solution of ∂t c = ρ(x) c(1−c) over dt (ρ scalar or field)."""
    e = xp.exp(rho * dt)
    ce = c * e
    return ce / (ce + 1.0 - c)


def logistic_step_derivative(xp, c, rho, dt: float):
    """∂c⁺/∂c = e^{ρdt} / (c·e^{ρdt} + 1 − c)² (for linearisations and adjoints)."""
    e = xp.exp(rho * dt)
    return e / (c * e + 1.0 - c) ** 2
