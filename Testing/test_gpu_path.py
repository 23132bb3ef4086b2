"""The CuPy code path, run on a strict stand-in (cupy_standin.py): get_backend("gpu") takes
its CuPy branch, the arrays refuse implicit host conversion and host operands as CuPy does,
and every result must equal the numpy backend's (the same float operations, bit for bit
where the FFTs agree). No GPU is needed; CUDA compilation and speed are not tested here
(benchmarks/forward.py on a GPU does that)."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

import cupy_standin
from cli_helpers import cli_env
from GBMMassEffectLib.backend import get_backend, to_numpy
from GBMMassEffectLib.basis import brain_mask, gaussian_atom
from GBMMassEffectLib.forward import ForwardParams, run_forward
from GBMMassEffectLib.mass_effect_inversion import MassEffectOptions, invert_mass_effect
from GBMMassEffectLib.reaction_diffusion import ReactionDiffusion
from GBMMassEffectLib.sparse_ic import SparseICOptions, solve_sparse_ic
from GBMMassEffectLib.spectral import SpectralOps
from GBMMassEffectLib.tissue import Tissues

REPO = pathlib.Path(__file__).resolve().parents[1]
ATLAS = REPO / "Resources" / "Atlases" / "mni152_labels.nrrd"
TRUTH = {"gamma": 0.8, "rho": 10.0, "kappa": 0.025}


@pytest.fixture
def gpu(monkeypatch):
    """The stand-in installed; returns get_backend("gpu", precision)."""
    cupy_standin.install(monkeypatch)
    cupy_standin.ElementwiseKernel.calls = 0
    return lambda precision="float64": get_backend("gpu", precision)


def test_the_standin_refuses_what_cupy_refuses(gpu):
    be = gpu()
    assert be.name == "gpu" and be.device_name == cupy_standin.NAME and be.fft_workers is None
    a = be.xp.asarray(np.arange(4.0))
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(a)
    with pytest.raises(TypeError, match="Unsupported type"):
        a + np.ones(4)
    with pytest.raises(TypeError, match="Unsupported type"):
        be.xp.where(np.ones(4, bool), a, 0.0)
    with pytest.raises(TypeError, match="Unsupported type"):
        a[:] = np.ones(4)
    with pytest.raises(TypeError, match="workers"):
        be.fft.rfftn(a, workers=2)
    s = be.xp.sum(a)
    assert isinstance(s, be.xp.ndarray) and s.ndim == 0 and float(s) == 6.0
    assert np.array_equal(to_numpy(a * 2.0 + 1), [1.0, 3.0, 5.0, 7.0])
    assert np.array_equal(to_numpy(be.irfftn(be.rfftn(be.xp.ones((4, 4, 4))), 4)), np.ones((4, 4, 4)))


def _tissues(n):
    """Smooth wm/gm, a ventricle, a CSF rim on the n³ box (test_forward's small case)."""
    ops = SpectralOps(n, get_backend("cpu", "float64"))
    x, y, z = ops.coordinates()
    r2 = (x - np.pi) ** 2 + (y - np.pi) ** 2 + (z - np.pi) ** 2
    inside = r2 < 2.6**2
    full = lambda a: np.ascontiguousarray(np.broadcast_to(a, (n, n, n)))  # noqa: E731
    fr = {"wm": full(np.where(inside, 0.5 + 0.3 * np.sin(2 * x) * np.cos(y), 0)),
          "gm": full(np.where(inside, 0.3 - 0.2 * np.sin(2 * x) * np.cos(y), 0)),
          "vt": full(np.where(r2 < 0.5, 0.9, 0.0)) * (y < np.pi),
          "csf": full(np.where(inside & (r2 > 2.2**2), 0.15, 0.0))}
    centre = np.array([3.6, 3.0, 2.8])
    c0 = full(np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / 0.3))
    return fr, c0, centre


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_forward_on_the_gpu_path_equals_numpy(gpu, precision):
    """§3 with mass effect through the CuPy branch (the interpolation's CUDA-kernel call
    included, run by the stand-in): the numpy backend's c(1), u and iteration counts."""
    fr, c0, _ = _tissues(32)
    out = {}
    for name, be in (("cpu", get_backend("cpu", precision)), ("gpu", gpu(precision))):
        ops, xp = SpectralOps(32, be), be.xp
        t = Tissues.from_fractions(xp, *(xp.asarray(fr[k]) for k in ("wm", "gm", "vt", "csf")), dtype=ops.dtype)
        res = run_forward(ops, t, xp.asarray(c0, dtype=ops.dtype), ForwardParams(**TRUTH))
        assert type(res.c) is be.xp.ndarray and res.c.dtype == ops.dtype
        out[name] = (to_numpy(res.c), to_numpy(res.u), res.stats.total_elasticity_iterations)
    assert cupy_standin.ElementwiseKernel.calls > 0  # the kernel path, not the xp fallback
    tol = 1e-5 if precision == "float32" else 1e-12
    for k in (0, 1):
        assert np.abs(out["gpu"][k] - out["cpu"][k]).max() <= tol * np.abs(out["cpu"][k]).max()
    assert out["gpu"][2] == out["cpu"][2] and np.abs(out["cpu"][1]).max() > 0.05


def test_s3_on_the_gpu_path_equals_numpy(gpu):
    """S.3 as calibrate runs it (Gauss-Newton, S.1's atoms refitted, c0 translated, the FD
    solves on threads, the Hessian at the end), one iteration at 16³."""
    fr, _, centre = _tissues(16)
    res = {}
    for name, be in (("cpu", get_backend("cpu", "float64")), ("gpu", gpu("float64"))):
        ops, xp = SpectralOps(16, be), be.xp
        t = Tissues.from_fractions(xp, *(xp.asarray(fr[k]) for k in ("wm", "gm", "vt", "csf"))).smoothed(ops)
        mask = brain_mask(t.wm, t.gm, t.vt)
        atoms = xp.stack([gaussian_atom(ops, centre + np.array(s) * ops.h, ops.h, mask) for s in ((0, 0, 0), (1, 0, 0))])
        c0_true = atoms[0] + 0.5 * atoms[1]
        fwd = run_forward(ops, t, c0_true / c0_true.max(), ForwardParams(**TRUTH))
        opt = MassEffectOptions(workers=2, maxiter=1, optimizer="gauss-newton", c0_refit=True, c0_shift=1.0)
        r = invert_mass_effect(ops, t, atoms[0], fwd.c, None, fwd.tissues.vt, options=opt, c0_atoms=atoms,
                               c0_weights=[0.3, 1.0], initial={"gamma": 0.6, "rho": 8.0, "kappa": 0.02})
        res[name] = r
    c, g = res["cpu"], res["gpu"]
    assert g.nit == c.nit == 1 and g.n_forward == c.n_forward
    np.testing.assert_allclose(g.x, c.x, rtol=1e-10, atol=1e-12)
    assert g.fun == pytest.approx(c.fun, rel=1e-10) and g.max_u == pytest.approx(c.max_u, rel=1e-10)
    assert g.hessian_condition == pytest.approx(c.hessian_condition, rel=1e-6)
    np.testing.assert_allclose(to_numpy(g.c0), to_numpy(c.c0), atol=1e-12)


def test_s1_on_the_gpu_path_equals_numpy(gpu):
    """S.1 (CoSaMP and the final solve) on 24³ synthetic data through the CuPy branch."""
    n = 24
    res = {}
    for name, be in (("cpu", get_backend("cpu", "float64")), ("gpu", gpu("float64"))):
        ops, xp = SpectralOps(n, be), be.xp
        x, y, z = (to_numpy(a) for a in ops.coordinates())
        wm = xp.asarray(np.broadcast_to(0.6 + 0.3 * np.sin(x) * np.sin(2 * y) * np.cos(z), (n, n, n)))
        centre = np.array([n // 2 - 2, n // 2 + 2, n // 2]) * ops.h
        c0 = gaussian_atom(ops, centre, ops.h, brain_mask(wm, 0 * wm, 0 * wm))
        d = ReactionDiffusion(ops, wm, nt=40).forward(c0 / c0.max(), 0.01, 6.0)
        opt = SparseICOptions(cosamp_iterations=1, subspace_maxiter=5, final_maxiter=5)
        res[name] = solve_sparse_ic(ops, wm, None, None, None, d, options=opt)
    c, g = res["cpu"], res["gpu"]
    assert np.array_equal(np.asarray(g.support), np.asarray(c.support))
    np.testing.assert_allclose(g.p, c.p, rtol=1e-8, atol=1e-12)
    assert (g.kappa, g.rho) == pytest.approx((c.kappa, c.rho), rel=1e-8)
    np.testing.assert_allclose(to_numpy(g.c0), to_numpy(c.c0), atol=1e-10)


def _run(args, standin: bool, timeout=900):
    cmd = [sys.executable, str(REPO / "Testing" / "cupy_standin.py")] if standin else \
        [sys.executable, "-m", "GBMMassEffectLib"]
    proc = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(), cwd=REPO)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    return proc


def _same_images(a: pathlib.Path, b: pathlib.Path, names, rtol):
    for name in names:
        x = sitk.GetArrayFromImage(sitk.ReadImage(str(a / name)))
        y = sitk.GetArrayFromImage(sitk.ReadImage(str(b / name)))
        assert np.abs(x - y).max() <= rtol * max(np.abs(x).max(), 1e-30), name


def test_simulate_command_on_the_gpu_path(tmp_path):
    """`gbm-calibrate simulate --device gpu` end to end on the stand-in: the CPU run's outputs,
    and the report names the device."""
    common = ["simulate", "--labels", ATLAS, "--preset", "tc-b", "--seed", "3", "--grid", "32"]
    _run(common + ["--device", "cpu", "--out", tmp_path / "cpu"], standin=False)
    _run(common + ["--device", "gpu", "--out", tmp_path / "gpu"], standin=True)
    report = json.loads((tmp_path / "gpu" / "report.json").read_text())
    assert report["device"]["name"] == "gpu" and report["device"]["device"] == cupy_standin.NAME
    _same_images(tmp_path / "cpu", tmp_path / "gpu", ("tumor_concentration.nrrd", "displacement.nrrd",
                                                       "initial_condition.nrrd"), 1e-6)


@pytest.mark.slow
def test_calibrate_command_on_the_gpu_path(tmp_path):
    """`gbm-calibrate calibrate --device gpu` end to end on the stand-in (S.1, S.2, S.3 on one
    atlas, two S.3 iterations): the CPU run's parameters and outputs. ~6 min on 2 cores."""
    _run(["simulate", "--labels", ATLAS, "--preset", "tc-b", "--seed", "3", "--grid", "32",
          "--device", "cpu", "--out", tmp_path / "p"], standin=False)
    p = tmp_path / "p"
    common = ["calibrate", "--tumor-seg", p / "tumor_labels.nrrd", "--tissue-seg", p / "patient_labels.nrrd",
              "--atlases", "1", "--grid", "32", "--options", json.dumps({"s3": {"maxiter": 2}})]
    _run(common + ["--device", "cpu", "--out", tmp_path / "cpu"], standin=False)
    _run(common + ["--device", "gpu", "--out", tmp_path / "gpu"], standin=True)
    rc, rg = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("cpu", "gpu"))
    assert rg["device"]["device"] == cupy_standin.NAME
    for k in ("gamma", "rho", "kappa", "max_u_mm"):
        assert rg["atlases"][0][k] == pytest.approx(rc["atlases"][0][k], rel=1e-8), k
    _same_images(tmp_path / "cpu", tmp_path / "gpu", ("predicted_tumor.nrrd", "displacement_norm.nrrd"), 1e-6)
