"""Data d, observation operator O, misfit and β-regularisation (MODEL.md §5).

- d = tumor-core indicator (enhancing + necrotic), smoothed one voxel (reference kernel).
- O = 1 on tumor core, 0 on edema (unknown concentration there), 1 elsewhere; O is
  diagonal 0/1, so Oᵀ = O = O².
- misfit ½h³‖Oc(1) − Od‖², regularisation β/2·h³‖Φp‖² (β = 1e-4 default).
- label band (a deviation, an S.3 option on label data; mass_effect_inversion's docstring):
  each label boundary read as an iso-contour of c(1) at the thresholds `simulate` draws
  its labels at (presets.BRATS_THRESHOLDS), i.e. bounds L ≤ c(1) ≤ U per voxel and the
  misfit ½h³‖(c − U)₊ − (L − c)₊‖², zero when the predicted labels are the observed ones.
- labels as partial volumes (a deviation, calibrate's S.3 default on label data, PartialVolumeMisfit):
  the share of each voxel above the same thresholds that c(1) predicts below the voxel
  scale, against the labels' box fractions; it sees where a label boundary runs inside a
  voxel, which both readings above, thresholded per voxel, do not.
"""
from __future__ import annotations

import numpy as np

from .spectral import SpectralOps

BETA_DEFAULT = 1e-4


def _check(ops: SpectralOps, a, name: str):
    n = ops.n
    a = ops.xp.asarray(a)
    if a.shape != (n, n, n):
        raise ValueError(f"{name} must have shape {(n, n, n)}, got {a.shape}")
    return a


def tumor_data(ops: SpectralOps, core, smooth: bool = True):
    """d: the tumor-core indicator (core > 0.5), smoothed one voxel (§5)."""
    core = _check(ops, core, "tumor core")
    d = (core > 0.5).astype(ops.dtype)
    return ops.smooth(d) if smooth else d


def observation_operator(ops: SpectralOps, core, edema=None):
    """O: 1 on tumor core, 0 on edema (outside the core), 1 elsewhere (§5)."""
    core = _check(ops, core, "tumor core")
    O = ops.xp.ones(core.shape, dtype=ops.dtype)
    if edema is not None:
        edema = _check(ops, edema, "edema")
        O[(edema > 0.5) & ~(core > 0.5)] = 0.0
    return O


class Misfit:
    """J_d(c1) = ½h³‖O(c1 − d)‖² and its gradient h³·O(c1 − d)."""

    def __init__(self, ops: SpectralOps, d, O=None):
        self.ops = ops
        self.d = _check(ops, d, "data d").astype(ops.dtype)
        self.O = None if O is None else _check(ops, O, "observation operator O").astype(ops.dtype)
        self.h3 = ops.h**3

    def residual(self, c1, tissues=None):
        """O(c1 − d); tissues (at t = 1) unused: the tumour terms' common signature."""
        r = c1 - self.d
        return r if self.O is None else self.O * r

    def value(self, c1) -> float:
        r = self.residual(c1)
        return 0.5 * self.h3 * float(self.ops.xp.sum(r * r, dtype=np.float64))

    def gradient(self, c1):
        """∂J_d/∂c1 = h³ Oᵀ(Oc1 − Od) (the adjoint's final condition, sign +)."""
        return self.ops.dtype.type(self.h3) * self.residual(c1)

    def relative_error(self, c1) -> float:
        """‖O(c1 − d)‖ / ‖Od‖."""
        xp = self.ops.xp
        Od = self.d if self.O is None else self.O * self.d
        den = float(xp.sqrt(xp.sum(Od * Od, dtype=np.float64)))
        r = self.residual(c1)
        return float(xp.sqrt(xp.sum(r * r, dtype=np.float64))) / max(den, 1e-300)


#: thresholds of the label band: the core (enhancing + necrotic) is c(1) > CORE_THRESHOLD,
#: the whole tumour (core + edema) c(1) > EDEMA_THRESHOLD (presets.BRATS_THRESHOLDS'
#: enhancing and edema values, the ones `simulate` labels its patients with)
CORE_THRESHOLD = 0.4
EDEMA_THRESHOLD = 0.02
#: the tumour terms S.1 and S.3 offer (option tumor_misfit): §5's, the label band, and the
#: labels as partial volumes (S.3 only: it has no adjoint)
TUMOR_MISFITS = ("indicator", "band", "fraction")


def check_label_thresholds(core_threshold, edema_threshold) -> None:
    """ValueError unless both are numbers with 0 < edema_threshold < core_threshold < 1."""
    th = (edema_threshold, core_threshold)
    if not (all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in th) and 0 < th[0] < th[1] < 1):
        raise ValueError("label thresholds must satisfy 0 < edema_threshold < core_threshold < 1, "
                         f"got {edema_threshold!r}, {core_threshold!r}")


def label_band(ops: SpectralOps, core, edema=None, core_threshold: float = CORE_THRESHOLD,
               edema_threshold: float = EDEMA_THRESHOLD):
    """Bounds (L, U) on c(1) that the labels imply when each label boundary is an iso-contour
    of c(1): core (fraction > 0.5) c ≥ θ_core (no upper bound); edema θ_edema ≤ c ≤ θ_core;
    elsewhere c ≤ θ_edema, or c ≤ θ_core when no edema was segmented (a core mask alone
    says nothing of the infiltration around it)."""
    check_label_thresholds(core_threshold, edema_threshold)
    xp = ops.xp
    core = _check(ops, core, "tumor core") > 0.5
    outside_upper = core_threshold if edema is None else edema_threshold
    if edema is None:
        edema = xp.zeros(core.shape, dtype=bool)
    else:
        edema = (_check(ops, edema, "edema") > 0.5) & ~core
    lower = xp.where(core, core_threshold, xp.where(edema, edema_threshold, 0.0)).astype(ops.dtype)
    upper = xp.where(core, xp.inf, xp.where(edema, core_threshold, outside_upper)).astype(ops.dtype)
    return lower, upper


class BandMisfit:
    """J_d(c1) = ½h³‖(c1 − U)₊ − (L − c1)₊‖² for label bounds L ≤ U (label_band); C¹ in c1,
    gradient h³·r with r the residual."""

    def __init__(self, ops: SpectralOps, lower, upper):
        self.ops = ops
        self.lower = _check(ops, lower, "label lower bound").astype(ops.dtype)
        self.upper = _check(ops, upper, "label upper bound").astype(ops.dtype)
        if bool(ops.xp.any(self.lower > self.upper)):
            raise ValueError("label band: a lower bound exceeds its upper bound")
        self.h3 = ops.h**3

    def residual(self, c1, tissues=None):
        """(c1 − U)₊ − (L − c1)₊; tissues unused (the tumour terms' common signature)."""
        xp = self.ops.xp
        return xp.maximum(c1 - self.upper, 0) - xp.maximum(self.lower - c1, 0)

    def value(self, c1) -> float:
        r = self.residual(c1)
        return 0.5 * self.h3 * float(self.ops.xp.sum(r * r, dtype=np.float64))

    def gradient(self, c1):
        return self.ops.dtype.type(self.h3) * self.residual(c1)


class PartialVolumeMisfit:
    """Labels read as partial volumes (a deviation, S.3 option tumor_misfit "fraction"): the
    share of each box voxel where c(1) > θ_core (the core) and c(1) > θ_edema (the whole
    tumour), predicted below the voxel scale, against the labels' box fractions (what
    `BoxGeometry.to_box(…, "fraction")` reads from a finer label map). c(1) is interpolated
    spectrally onto the m³ sub-voxel centres of each voxel; a sub-voxel counts as above θ
    by a linear ramp across it along ∇c (its share on the side c > θ of the tangent plane,
    to first order; ‖∇c‖₁ that of its box voxel), and the voxel's share is the mean over its
    m³ sub-voxels. Edema is drawn on parenchyma only (presets.brats_labels), so with the
    tissues at t = 1 the whole tumour beyond the core counts only on the sub-voxels where
    max(gm, wm, c) outweighs max(bg, vt, csf) (the same ramp; both maxima interpolated).
    Residual (F_core − f_core, F_whole − f_whole); J_d = ½h³‖r‖². Continuous in c(1), so the
    finite differences S.3 uses see where a label boundary sits inside a voxel, which the
    indicator and the band (both thresholded per voxel) do not."""

    def __init__(self, ops: SpectralOps, core, edema=None, core_threshold: float = CORE_THRESHOLD,
                 edema_threshold: float = EDEMA_THRESHOLD, supersample: int | None = None):
        check_label_thresholds(core_threshold, edema_threshold)
        xp, n = ops.xp, ops.n
        self.ops, self.h3 = ops, ops.h**3
        core = xp.clip(_check(ops, core, "tumor core").astype(ops.dtype), 0, 1)
        data, levels = [core], [core_threshold]
        if edema is not None:  # a core mask alone says nothing of the infiltration around it
            data.append(xp.clip(core + _check(ops, edema, "edema").astype(ops.dtype), 0, 1))
            levels.append(edema_threshold)
        self.data, self.levels = xp.stack(data), levels
        m = int(supersample or min(8, max(2, 128 // n)))
        if m < 1:
            raise ValueError(f"supersample must be ≥ 1, got {supersample!r}")
        self.m, N = m, m * n
        # the n-grid's wavenumbers in the N-grid's rfftn layout, Nyquist planes dropped
        k = np.fft.fftfreq(n, d=1.0 / n).astype(int)
        keep = np.abs(k) < n // 2
        self._i01 = xp.asarray(np.mod(k[keep], N))
        self._src01 = xp.asarray(np.nonzero(keep)[0])
        self._src2 = xp.asarray(np.arange(n // 2))
        # sub-voxel centres: x_i + ((j + ½)/m − ½)·h, j < m, i.e. the N-grid shifted by s
        s = -(m - 1) / (2 * m) * ops.h
        kk = np.fft.fftfreq(N, d=1.0 / N)
        kr = np.arange(N // 2 + 1, dtype=float)
        phase = np.exp(1j * s * (kk[:, None, None] + kk[None, :, None] + kr[None, None, :])) * m**3
        self._phase = xp.asarray(phase, dtype=np.result_type(ops.dtype, np.complex64))
        self._h_sub = ops.h / m

    def _upsample(self, fields):
        """Fields (k, n, n, n) at the sub-voxel centres (spectral), as (k, n, m, n, m, n, m):
        axes 1, 3, 5 index the box voxel, 2, 4, 6 the sub-voxel in it."""
        ops, xp, n, m = self.ops, self.ops.xp, self.ops.n, self.m
        N = m * n
        C = ops.fft(xp.asarray(fields, dtype=ops.dtype))
        C = C[:, self._src01][:, :, self._src01][:, :, :, self._src2]
        P = xp.zeros((C.shape[0], N, N, N // 2 + 1), dtype=self._phase.dtype)
        P[:, self._i01[:, None, None], self._i01[None, :, None], self._src2[None, None, :]] = C
        P *= self._phase
        fine = ops.backend.irfftn(P, N).astype(ops.dtype, copy=False)
        return fine.reshape(-1, n, m, n, m, n, m)

    def _ramp(self, f6, level, g1):
        """Each sub-voxel's share where f > level, f linear across it along ∇f: a ramp one
        sub-voxel extent (h_sub·‖∇f‖₁, ‖∇f‖₁ its box voxel's) wide."""
        xp = self.ops.xp
        width = (g1 * self._h_sub + 1e-12)[:, None, :, None, :, None]
        return xp.clip(0.5 + (f6 - level) / width, 0.0, 1.0)

    def fractions(self, c1, tissues=None):
        """(F_core[, F_whole]) of c(1): each box voxel's predicted share above θ; with the
        tissues at t = 1, the whole tumour beyond the core on their parenchyma only: where
        gm, wm or the tumour outweigh bg, vt and csf (presets.brats_labels on simulate's
        argmax labels), per sub-voxel."""
        ops, xp = self.ops, self.ops.xp
        c1 = xp.asarray(c1, dtype=ops.dtype)
        fields = [c1]
        use_tissues = len(self.levels) == 2 and tissues is not None
        if use_tissues:
            par_max = xp.maximum(tissues.gm, tissues.wm)
            other_max = xp.maximum(xp.maximum(tissues.bg, tissues.vt), tissues.csf)
            fields += [par_max, other_max]
        fine = self._upsample(xp.stack(fields))
        g1 = sum(xp.abs(g) for g in ops.grad(c1))
        shares = [self._ramp(fine[0], level, g1) for level in self.levels]
        if use_tissues:
            D = xp.maximum(fine[1], fine[0]) - fine[2]
            gD = sum(xp.abs(g) for g in xp.gradient(xp.maximum(par_max, c1) - other_max, ops.h))
            par = self._ramp(D, 0.0, gD)
            shares[1] = shares[0] + par * xp.maximum(shares[1] - shares[0], 0)
        return xp.stack([a.mean(axis=(1, 3, 5)) for a in shares]).astype(ops.dtype)

    def residual(self, c1, tissues=None):
        return self.fractions(c1, tissues) - self.data

    def value(self, c1, tissues=None) -> float:
        r = self.residual(c1, tissues)
        return 0.5 * self.h3 * float(self.ops.xp.sum(r * r, dtype=np.float64))

    def gradient(self, c1):
        raise NotImplementedError("the partial-volume tumour term has no adjoint: S.3 only "
                                  "(finite differences), not S.1")


def tumor_misfits(ops: SpectralOps, kind: str, d, O=None, labels=None,
                  core_threshold: float = CORE_THRESHOLD, edema_threshold: float = EDEMA_THRESHOLD,
                  stage: str = "S.3"):
    """(indicator, misfit) of S.1 / S.3: §5's Misfit(d, O), which gives the reported
    relative tumour error, and the tumour term J uses: that same object for kind
    "indicator", the label band (BandMisfit of label_band) for "band", which needs
    labels = (core, edema or None)."""
    if kind not in TUMOR_MISFITS:
        raise ValueError(f"{stage} tumor_misfit must be one of {', '.join(TUMOR_MISFITS)}, got {kind!r}")
    indicator = Misfit(ops, d, O)
    if kind == "indicator":
        return indicator, indicator
    if labels is None:
        raise ValueError(f"{stage} tumor_misfit '{kind}' needs the tumour labels (core, edema)")
    if kind == "fraction":
        return indicator, PartialVolumeMisfit(ops, labels[0], labels[1], core_threshold, edema_threshold)
    return indicator, BandMisfit(ops, *label_band(ops, labels[0], labels[1], core_threshold, edema_threshold))


def labels_from_concentration(c, core_threshold: float = CORE_THRESHOLD,
                              edema_threshold: float = EDEMA_THRESHOLD):
    """(core, edema) float32 indicators drawn from a concentration at the thresholds, the
    labels label_band reads back: core c > θ_core, edema θ_edema < c ≤ θ_core."""
    c = np.asarray(c)
    return ((c > core_threshold).astype(np.float32),
            ((c > edema_threshold) & (c <= core_threshold)).astype(np.float32))


def regularisation(ops: SpectralOps, c0, beta: float = BETA_DEFAULT) -> float:
    """β/2·h³‖c0‖² with c0 = Φp (§5)."""
    return 0.5 * beta * ops.h**3 * float(ops.xp.sum(c0 * c0, dtype=np.float64))


def regularisation_gradient(ops: SpectralOps, c0, beta: float = BETA_DEFAULT):
    """∂/∂c0 of β/2·h³‖c0‖²: β h³ c0 (apply Φᵀ for the p-gradient)."""
    return ops.dtype.type(beta * ops.h**3) * c0
