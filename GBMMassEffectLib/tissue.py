"""Healthy-tissue fractions and the coefficient fields they define (MODEL.md §1, §3).

`Tissues` holds wm, gm, vt, csf (transported by the forward model) and bg, the skull /
background fraction 1 − (wm+gm+vt+csf) computed once from the tissues clipped at 0 and
never updated afterwards (not by the t = 0 filter, not by advection). From the current
tissues (and tumor c) it builds, exactly as §3 states:
  k(x) = κ·max(0, 1 − bg − (1−r_k)·gm − vt − csf),  ρ(x) likewise with ρ and r_ρ;
  Lamé µ, λ = max(0, x_bg·bg + x_h·(wm+gm) + x_csf·(vt+csf)) + x_tumor·c where c > 0;
  screening η = 1e-2 where c ≥ 0.005, 1e2 elsewhere, 1e6 where bg > 0.95.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Young's modulus (Pa) and Poisson ratio per material (MODEL.md §3).
YOUNG = {"healthy": 2100.0, "csf": 100.0, "tumor": 8000.0, "bg": 15000.0}
POISSON = {"healthy": 0.4, "csf": 0.1, "tumor": 0.45, "bg": 0.45}
SCREEN_TUMOR, SCREEN_HEALTHY, SCREEN_BG = 1e-2, 1e2, 1e6
TUMOR_THRESHOLD = 0.005  # c ≥ this counts as tumor for the screening field
BG_THRESHOLD = 0.95  # bg > this is pinned (skull)

# Label numbering of the atlas / patient label maps (README of glia-testdata, §1).
LABEL_GM, LABEL_WM, LABEL_VT, LABEL_CSF, LABEL_TUMOR = 5, 6, 7, 8, 1


def lame_mu(E: float, nu: float) -> float:
    """Shear modulus µ = E / (2(1+ν))."""
    return E / (2.0 * (1.0 + nu))


def lame_lambda(E: float, nu: float) -> float:
    """First Lamé parameter λ = νE / ((1+ν)(1−2ν))."""
    return nu * E / ((1.0 + nu) * (1.0 - 2.0 * nu))


MU = {m: lame_mu(YOUNG[m], POISSON[m]) for m in YOUNG}
LAMBDA = {m: lame_lambda(YOUNG[m], POISSON[m]) for m in YOUNG}


@dataclass
class Tissues:
    """Tissue fractions on the grid (backend arrays of shape (n, n, n)); bg is fixed."""

    wm: object
    gm: object
    vt: object
    csf: object
    bg: object

    # ---- construction ------------------------------------------------------------
    @classmethod
    def from_fractions(cls, xp, wm, gm=None, vt=None, csf=None, dtype=np.float32) -> "Tissues":
        """Clip the given fractions at 0 (missing ones are 0) and fix bg = 1 − Σ."""
        wm = xp.asarray(wm, dtype=dtype)
        if wm.ndim != 3 or len(set(wm.shape)) != 1:
            raise ValueError(f"tissue maps must be cubic 3-D arrays, got shape {wm.shape}")
        maps = []
        for name, m in (("wm", wm), ("gm", gm), ("vt", vt), ("csf", csf)):
            m = xp.zeros_like(wm) if m is None else xp.asarray(m, dtype=dtype)
            if m.shape != wm.shape:
                raise ValueError(f"tissue map {name} has shape {m.shape}, expected {wm.shape}")
            maps.append(xp.maximum(m, 0).astype(dtype, copy=False))
        bg = 1 - (maps[0] + maps[1] + maps[2] + maps[3])
        return cls(*maps, bg.astype(dtype, copy=False))

    @classmethod
    def from_labels(cls, xp, labels, tumor_as: str | None = "wm", dtype=np.float32) -> "Tissues":
        """Fractions (0/1) from a label map: 5 gm, 6 wm, 7 vt, 8 csf, 1 tumor.

        tumor_as: the tissue tumor voxels count as ('wm', 'gm', …) or None (background).
        """
        lab = np.rint(np.asarray(labels)).astype(np.int64)
        if lab.ndim != 3:
            raise ValueError(f"label map must be 3-D, got shape {lab.shape}")
        code = {"gm": LABEL_GM, "wm": LABEL_WM, "vt": LABEL_VT, "csf": LABEL_CSF}
        if tumor_as is not None and tumor_as not in code:
            raise ValueError(f"tumor_as must be one of {sorted(code)} or None, not {tumor_as!r}")
        fr = {}
        for name, c in code.items():
            m = lab == c
            if tumor_as == name:
                m |= lab == LABEL_TUMOR
            fr[name] = m.astype(dtype)
        return cls.from_fractions(xp, fr["wm"], fr["gm"], fr["vt"], fr["csf"], dtype=dtype)

    def copy(self) -> "Tissues":
        return Tissues(self.wm.copy(), self.gm.copy(), self.vt.copy(), self.csf.copy(), self.bg)

    def smoothed(self, ops) -> "Tissues":
        """Each map smoothed by one voxel (G_σ of §2), then clipped and bg recomputed."""
        xp = ops.xp
        s = ops.smooth(xp.stack([self.wm, self.gm, self.vt, self.csf]))
        return Tissues.from_fractions(xp, s[0], s[1], s[2], s[3], dtype=ops.dtype)

    def stacked(self):
        """(4, n, n, n) array wm, gm, vt, csf (a copy)."""
        return self._xp().stack([self.wm, self.gm, self.vt, self.csf])

    def _xp(self):
        if type(self.wm).__module__.startswith("cupy"):
            import cupy

            return cupy
        return np

    # ---- the t = 0 filter (§3) ---------------------------------------------------
    def filter_tumor(self, c0) -> "Tissues":
        """wm ← wm(1−c0), gm ← gm(1−c0); vt, csf and bg unchanged. Returns a new object."""
        return Tissues(self.wm * (1 - c0), self.gm * (1 - c0), self.vt, self.csf, self.bg)

    # ---- coefficients (§3) -------------------------------------------------------
    def _fraction(self, xp, gm_ratio: float):
        f = 1 - (self.bg + (1 - gm_ratio) * self.gm + self.vt + self.csf)
        return xp.maximum(f, 0)

    def diffusivity(self, kappa: float, r_k: float = 0.0):
        """k(x) = κ·max(0, 1 − bg − (1−r_k)·gm − vt − csf)."""
        xp = self._xp()
        return (kappa * self._fraction(xp, r_k)).astype(self.wm.dtype, copy=False)

    def proliferation(self, rho: float, r_rho: float = 0.0):
        """ρ(x) = ρ·max(0, 1 − bg − (1−r_ρ)·gm − vt − csf)."""
        xp = self._xp()
        return (rho * self._fraction(xp, r_rho)).astype(self.wm.dtype, copy=False)

    def _lame_mix(self, xp, table, c):
        x = table["bg"] * self.bg + table["healthy"] * (self.wm + self.gm) + table["csf"] * (
            self.vt + self.csf
        )
        x = xp.maximum(x, 0)
        x += table["tumor"] * xp.maximum(c, 0)
        return x.astype(self.wm.dtype, copy=False)

    def lame(self, c):
        """Lamé fields (µ, λ) in Pa from the tissues and tumor c."""
        xp = self._xp()
        return self._lame_mix(xp, MU, c), self._lame_mix(xp, LAMBDA, c)

    def screening(self, c):
        """η(x): 1e-2 where c ≥ 0.005, 1e2 elsewhere, 1e6 where bg > 0.95."""
        xp = self._xp()
        dt = self.wm.dtype
        eta = xp.where(c >= TUMOR_THRESHOLD, dt.type(SCREEN_TUMOR), dt.type(SCREEN_HEALTHY))
        eta = xp.where(self.bg > BG_THRESHOLD, dt.type(SCREEN_BG), eta)
        return eta.astype(dt, copy=False)
