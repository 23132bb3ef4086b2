"""Benchmark of the §3 forward solve with mass effect (MODEL.md §3, §8 sinusoid case).

    python benchmarks/forward.py --grid 64 128 [256] --device cpu --precision float32

Each (grid, device, precision) runs in a fresh subprocess so that its peak memory (max
RSS, or the CuPy pool on a GPU) is its own. The case is the §8 regression: wm =
sinusoid.nc (64³; resampled trilinearly and periodically for other n), one Gaussian c0
(σ = 4·2π/64, same physical size at every n), ρ 8, κ 0.01, γ 1.2, 26 steps + the initial
elasticity solve. Prints a markdown table, then where the time goes: elasticity (PCG,
with its FFTs), advection (trajectories + cubic interpolation), diffusion (CN PCG), and
the transform / interpolation counts per step. Timers are light wall-clock timers in
forward.py, not a profiler.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO / "Testing" / "Data" / "glia-testdata" / "sinusoid.nc"


def _case(ops):
    import numpy as np
    import scipy.io
    import scipy.ndimage

    from GBMMassEffectLib.basis import brain_mask, gaussian_atom
    from GBMMassEffectLib.tissue import Tissues

    wm = scipy.io.netcdf_file(DATA, "r", mmap=False).variables["data"].data.astype(np.float64)
    wm = np.maximum(wm, 0)
    if ops.n != wm.shape[0]:
        wm = scipy.ndimage.zoom(wm, ops.n / wm.shape[0], order=1, mode="grid-wrap", grid_mode=True)
        wm = np.clip(wm, 0, 1)
    zero = np.zeros_like(wm)
    centre = 2 * math.pi * np.array([137.0, 169.0, 96.0]) / 256
    atom = gaussian_atom(ops, centre, 4 * 2 * math.pi / 64, ops.xp.asarray(brain_mask(wm, zero, zero)))
    c0 = atom / atom.max()
    xp = ops.xp
    tissues = Tissues.from_fractions(xp, xp.asarray(wm), None, None, None, dtype=ops.dtype)
    return tissues, c0


def _run_one(n: int, device: str, precision: str, queue) -> None:
    try:
        import resource

        from GBMMassEffectLib.backend import get_backend
        from GBMMassEffectLib.forward import ForwardParams, run_forward
        from GBMMassEffectLib.spectral import SpectralOps

        backend = get_backend(device, precision)
        ops = SpectralOps(n, backend)
        tissues, c0 = _case(ops)
        backend.synchronize()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        cpu0 = ru0.ru_utime + ru0.ru_stime
        t = time.perf_counter()
        res = run_forward(ops, tissues, c0, ForwardParams(kappa=0.01, rho=8.0, gamma=1.2))
        backend.synchronize()
        wall = time.perf_counter() - t
        st = res.stats
        if backend.name == "gpu":
            import cupy

            peak = cupy.get_default_memory_pool().total_bytes() / 2**20
            mem = f"{peak:.0f} (GPU pool)"
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB → MiB on Linux
            mem = f"{rss:.0f}"
        ru = resource.getrusage(resource.RUSAGE_SELF)
        queue.put({
            "n": n, "device": backend.device_name, "precision": precision, "seconds": wall,
            "cpu_seconds": ru.ru_utime + ru.ru_stime - cpu0,
            "memory": mem, "cg_total": st.total_elasticity_iterations,
            "cg_per_step": st.elasticity_iterations, "cg_initial": st.initial_elasticity_iterations,
            "diff_per_step": st.diffusion_iterations, "fft": st.fft_forward + st.fft_inverse,
            "fft_elasticity": st.elasticity_fft, "t_fft": st.seconds_fft,
            "t_el": st.seconds_elasticity, "t_el_fft": st.seconds_elasticity_fft,
            "t_adv": st.seconds_advection, "t_diff": st.seconds_diffusion, "t_other": st.seconds_other,
            "interp": st.interpolated_fields, "steps": st.steps_completed,
            "c1": ops.norm(res.c), "u": ops.norm(res.displacement_norm()), "cfl": st.cfl_max,
        })
    except BaseException as exc:  # report, never hang the parent
        queue.put({"n": n, "device": device, "precision": precision, "error": f"{type(exc).__name__}: {exc}"})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", type=int, nargs="+", default=[64, 128], help="grid sizes n (n³ voxels)")
    ap.add_argument("--device", nargs="+", default=["cpu"], choices=["cpu", "gpu", "auto"])
    ap.add_argument("--precision", nargs="+", default=["float32"], choices=["float32", "float64"])
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    ctx = mp.get_context("spawn")
    rows = []
    for n in args.grid:
        for device in args.device:
            for precision in args.precision:
                q = ctx.Queue()
                p = ctx.Process(target=_run_one, args=(n, device, precision, q))
                p.start()
                row = q.get()
                p.join()
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print("| n | device | precision | forward s (CPU s) | peak MiB | CG its (total) | FFTs (elasticity) "
          "| FFT s | elasticity s (its FFT s) | advection/interp. s | diffusion s | ‖c(1)‖ | ‖|u|‖ |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['n']} | {r['device']} | {r['precision']} | failed: {r['error']} |")
            continue
        print(f"| {r['n']} | {r['device']} | {r['precision']} | {r['seconds']:.1f} ({r['cpu_seconds']:.1f}) | {r['memory']} "
              f"| {r['cg_total']} | {r['fft']} ({r['fft_elasticity']}) | {r['t_fft']:.1f} "
              f"| {r['t_el']:.1f} ({r['t_el_fft']:.1f}) | {r['t_adv']:.1f} | {r['t_diff']:.1f} "
              f"| {r['c1']:.4f} | {r['u']:.4f} |")
    print()
    print("Per step: 9 single-field cubic interpolations (v at X*: 3, ∇·v at X: 1, wm/gm/c: 3, "
          "vt/csf: 2) on 2 stencils (X*, X); elasticity 18 FFTs per PCG iteration (9 inverse, "
          "9 forward), + 8 for the force, 18 for the warm-start residual, 3 for u; velocity 3.")
    for r in rows:
        if "error" not in r:
            print(f"n={r['n']} {r['precision']}: PCG its initial {r['cg_initial']}, per step {r['cg_per_step']}; "
                  f"CN its per step {sorted(set(r['diff_per_step']))}; cfl max {r['cfl']:.3f}; "
                  f"interpolated fields {r['interp']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
