"""The simulate pipeline: label map → box → forward model → back to the image
(ARCHITECTURE.md "Other subcommands"; MODEL.md §2, §3, §5, §7).

1. Read the label map (0 background, 5 gm, 6 wm, 7 ventricles, 8 csf) with its geometry;
   place the n³ box of edge L (geometry.box_for_image: image-aligned, centred on the brain,
   brain not touching the box edge).
2. Tissue fractions: the one-hot maps of 5/6/7/8 resampled linearly into the box, averaged
   over sub-voxels where the box is coarser than the image (partial volumes;
   BoxGeometry.to_box kind 'fraction'), then smoothed one voxel (MODEL §2; Tissues.smoothed).
3. c0: one §5 Gaussian atom at the seed (σ = sigma_voxels box voxels, default 1, the width
   of the S.1 basis so a synthetic c0 is representable by it), brain mask of §2, divided
   by its max (max c0 = 1). The seed must lie in gray or white matter.
4. The §3 forward model (forward.run_forward), CFL violations are errors.
5. Back onto the input grid (sitk.Resample with the input as reference): c0 and c(1)
   cubic (B-spline interpolation, clipped to [0, 1]), tissue fractions linear, u as LPS
   millimetres (u_mm = (L/2π)·D_box·u), |u| in mm, deformed labels as the argmax of the
   deformed fractions (bg 0, gm 5, wm 6, vt 7, csf 8), tumor 1 where c(1) exceeds every
   tissue fraction.
Outputs are written atomically through progress.OutputSet, report.json last.

displacement.nrrd holds the model's u at the deformed position x (tissue now at x came
from about x − u(x)), LPS mm, ITK vector image. As an ITK displacement-field transform
(p ↦ p + field(p), resampling direction) the field −u resamples the healthy image into
the deformed state: deformed(x) ≈ healthy(x − u(x)).
"""
from __future__ import annotations

import dataclasses
import math
import platform
import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from . import __version__, io, presets
from .backend import get_backend, to_numpy
from .geometry import BoxGeometry, box_for_image
from .progress import OutputSet, check_cancel

#: c(1) above this anywhere in the outermost voxel layer of the box counts as the tumor
#: touching the domain edge (the box is periodic: it would meet its own image). Not
#: smaller: spectral ringing leaves |c| ~ 3e-3 far from a tumor at 32³.
EDGE_TUMOR_THRESHOLD = 0.05


class InputError(ValueError):
    """A bad simulate input (seed outside the brain, tumor touching the domain edge …)."""


@dataclass
class SimulateOptions:
    labels: str
    out: str
    kappa: float = 0.025
    rho: float = 12.0
    gamma: float = 0.4
    seed_ijk: tuple | None = None  # ITK continuous index (i, j, k) in the input image
    seed_ras: tuple | None = None  # RAS mm (Slicer convention)
    sigma_voxels: float = 1.0
    c0_max: float = 1.0  # peak of the seed (§5: 1); (n/256)³ gives the paper's 1 mm seed's mass at grid n
    grid: int = 64
    nt: int = 25
    dt: float = 0.04
    device: str = "auto"
    precision: str = "float32"
    box_mm: float = 256.0
    preset: str | None = None
    random_seed: int | None = None
    extra: dict = field(default_factory=dict)


# ---- pieces ---------------------------------------------------------------------------------
def seed_point(labels: sitk.Image, seed_ijk=None, seed_ras=None) -> tuple[np.ndarray, np.ndarray]:
    """(LPS mm point, continuous ITK index) of the seed; checks it lies in gm or wm."""
    if (seed_ijk is None) == (seed_ras is None):
        raise InputError("give exactly one of --seed-ijk I,J,K and --seed-ras X,Y,Z")
    if seed_ijk is not None:
        ijk = np.asarray(seed_ijk, dtype=float)
        if ijk.shape != (3,) or not np.isfinite(ijk).all():
            raise InputError(f"--seed-ijk must be three numbers, got {seed_ijk}")
        lps = np.asarray(labels.TransformContinuousIndexToPhysicalPoint(ijk.tolist()))
    else:
        ras = np.asarray(seed_ras, dtype=float)
        if ras.shape != (3,) or not np.isfinite(ras).all():
            raise InputError(f"--seed-ras must be three numbers, got {seed_ras}")
        lps = io.ras_to_lps(ras)
        ijk = np.asarray(labels.TransformPhysicalPointToContinuousIndex(lps.tolist()))
    nearest = np.rint(ijk).astype(int)
    size = np.asarray(labels.GetSize())
    ras_txt = ", ".join(f"{v:.1f}" for v in io.lps_to_ras(lps))
    if (nearest < 0).any() or (nearest >= size).any():
        raise InputError(
            f"the seed (voxel {np.round(ijk, 2).tolist()}, RAS {ras_txt} mm) is outside the image "
            f"of size {size.tolist()}")
    lab = int(sitk.GetArrayViewFromImage(labels)[nearest[2], nearest[1], nearest[0]])
    if lab not in (io.TISSUE_LABELS["gm"], io.TISSUE_LABELS["wm"]):
        where = {0: "background", 7: "the ventricles", 8: "CSF"}.get(lab, f"label {lab}")
        raise InputError(
            f"the seed (voxel {np.round(ijk, 2).tolist()}, RAS {ras_txt} mm) is outside the brain "
            f"tissue: it lies in {where}; put it in gray (5) or white (6) matter")
    return lps, ijk


def box_tissues(geom: BoxGeometry, labels: sitk.Image, ops, tumor_as: str | None = None):
    """Tissue fractions in the box: one-hot 5/6/7/8 as partial volumes, smoothed one voxel.
    tumor_as='wm' (or 'gm', …) counts the BraTS tumor labels 1, 2, 4 as that tissue (S.1)."""
    from .tissue import Tissues

    fr = {}
    for name in ("wm", "gm", "vt", "csf"):
        values = {io.TISSUE_LABELS[name]}
        if tumor_as == name:
            values |= set(io.BRATS_LABELS.values())
        fr[name] = geom.label_fraction(labels, values, dtype=np.dtype(ops.dtype))
    t = Tissues.from_fractions(ops.xp, fr["wm"], fr["gm"], fr["vt"], fr["csf"], dtype=ops.dtype)
    return t.smoothed(ops)


def initial_condition(ops, geom: BoxGeometry, tissues, seed_lps, sigma_voxels: float, c0_max: float = 1.0):
    """c0 = c0_max·atom/atom.max() (MODEL §5: c0_max 1) at the seed; returns (c0, centre in
    domain units)."""
    from .basis import brain_mask, gaussian_atom

    if not (sigma_voxels > 0 and math.isfinite(sigma_voxels)):
        raise InputError(f"--sigma-voxels must be positive, got {sigma_voxels}")
    centre = geom.physical_to_domain(seed_lps)
    mask = brain_mask(tissues.wm, tissues.gm, tissues.vt, ops.xp)
    atom = gaussian_atom(ops, centre, sigma_voxels * ops.h, mask)
    peak = float(ops.xp.max(atom))
    if not peak > 1e-6:
        raise InputError(
            "the seed is outside the brain mask of the box (no gray/white matter within "
            f"{5 * sigma_voxels:g} box voxels); move the seed or use a finer --grid")
    c0 = atom / atom.dtype.type(peak)
    if c0_max != 1:  # (not a multiplication by 1: keeps §5 patients bit-identical to earlier ones)
        c0 = c0 * c0.dtype.type(c0_max)
    return c0.astype(ops.dtype), centre


def tumor_touches_edge(c) -> float:
    """max c over the outermost voxel layer of the box (periodic faces)."""
    c = to_numpy(c)
    return float(max(np.abs(c.take(i, axis=a)).max() for a in range(3) for i in (0, -1)))


def deformed_labels(fr: dict, c) -> np.ndarray:
    """Argmax of {bg 0, gm 5, wm 6, vt 7, csf 8}; tumor 1 where c exceeds all of them."""
    names = ("bg", "gm", "wm", "vt", "csf")
    codes = np.array([0, 5, 6, 7, 8], np.uint8)
    stack = np.stack([np.asarray(fr[k]) for k in names])
    lab = codes[np.argmax(stack, axis=0)]
    lab[np.asarray(c) > stack.max(axis=0)] = 1
    return lab


def moved_labels(healthy: sitk.Image, displacement: sitk.Image) -> np.ndarray:
    """The input label map moved by the simulated displacement at its own resolution,
    deformed(x) = healthy(x − u(x)) (nearest neighbour; the report's convention): the
    synthetic patient's tissue. (labels.nrrd, the argmax of the box fractions, loses thin
    structures: at grid 32, 8 mm voxels, 93% of the MNI152 ventricles.)"""
    field = sitk.GetImageFromArray(-sitk.GetArrayFromImage(displacement).astype(np.float64), isVector=True)
    field.CopyInformation(displacement)
    moved = sitk.Resample(healthy, healthy, sitk.DisplacementFieldTransform(field), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(moved)


def _versions(backend) -> dict:
    import scipy

    v = {"GBMMassEffectLib": __version__, "python": platform.python_version(),
         "numpy": np.__version__, "scipy": scipy.__version__, "SimpleITK": sitk.Version_VersionString()}
    if backend.name == "gpu":
        v["cupy"] = backend.xp.__version__
    return v


def _stats_dict(stats) -> dict:
    if dataclasses.is_dataclass(stats):
        d = dataclasses.asdict(stats)
        d.pop("steps", None)
        for name in ("elasticity_iterations", "diffusion_iterations", "total_elasticity_iterations"):
            if hasattr(stats, name):
                d[name] = getattr(stats, name)
        return d
    return {"stats": str(stats)}


# ---- the pipeline ----------------------------------------------------------------------------
def run_simulate(opt: SimulateOptions, outputs: OutputSet, progress=None, cancel=None) -> dict:
    """Run the pipeline, write every output through `outputs` (report.json last) and
    return the report. progress(stage, fraction, message, **extra); cancel() polled."""
    from .forward import ForwardParams, run_forward
    from .spectral import SpectralOps

    def say(stage, fraction, message, **extra):
        if progress is not None:
            progress(stage, fraction, message, **extra)

    timings = {}
    t_all = time.perf_counter()
    preset = presets.get_preset(opt.preset) if opt.preset else None
    say("setup", 0.0, f"reading {opt.labels}")
    labels = io.read_label_map(opt.labels, what="label map")
    if not (opt.box_mm > 0 and math.isfinite(opt.box_mm)):
        raise InputError(f"--box-mm must be a positive length, got {opt.box_mm}")
    try:
        params = ForwardParams(kappa=opt.kappa, rho=opt.rho, gamma=opt.gamma, nt=opt.nt, dt=opt.dt)
    except (TypeError, ValueError) as exc:
        raise InputError(str(exc)) from None
    for name in ("kappa", "rho", "gamma"):
        if getattr(opt, name) < 0:
            raise InputError(f"--{name} must be ≥ 0, got {getattr(opt, name)}")
    if isinstance(opt.c0_max, bool) or not (isinstance(opt.c0_max, (int, float)) and 0 < opt.c0_max <= 1):
        raise InputError(f"--c0-max must be a number in (0, 1], got {opt.c0_max}")
    rng = np.random.default_rng(opt.random_seed if opt.random_seed is not None else 0)
    seed_ijk, seed_ras = opt.seed_ijk, opt.seed_ras
    if preset is not None and seed_ijk is None and seed_ras is None:
        seed_ijk = presets.default_seed_ijk(
            labels, None if opt.random_seed is None else np.random.default_rng(opt.random_seed))
    seed_lps, seed_index = seed_point(labels, seed_ijk, seed_ras)

    geom = box_for_image(labels, opt.grid, opt.box_mm)
    backend = get_backend(opt.device, opt.precision)
    ops = SpectralOps(geom.n, backend)
    check_cancel(cancel)
    t0 = time.perf_counter()
    say("setup", 0.02, f"tissues into the {geom.n}^3 box ({geom.spacing:.3g} mm voxels)")
    tissues = box_tissues(geom, labels, ops)
    c0, centre = initial_condition(ops, geom, tissues, seed_lps, opt.sigma_voxels, opt.c0_max)
    timings["setup_s"] = time.perf_counter() - t0
    check_cancel(cancel)

    def on_step(st):
        say("forward", 0.05 + 0.85 * st.fraction, f"step {st.step + 1}/{st.n_steps}",
            t=round(st.t, 4), cfl=round(st.cfl, 4))

    t0 = time.perf_counter()
    res = run_forward(ops, tissues, c0, params, progress=on_step, cancel=cancel, on_cfl="raise")
    backend.synchronize()
    timings["forward_s"] = time.perf_counter() - t0
    check_cancel(cancel)

    c1 = to_numpy(res.c).astype(np.float64)
    u = to_numpy(res.u).astype(np.float64)
    c0_np = to_numpy(c0).astype(np.float64)
    edge = tumor_touches_edge(c1)
    if edge > EDGE_TUMOR_THRESHOLD:
        raise InputError(
            f"tumor touching the domain edge (c = {edge:.3g} on the box boundary): the brain or "
            "tumor reaches the edge of the periodic box; increase --box-mm")
    unorm = np.sqrt((u**2).sum(0))
    max_u = float(unorm.max())

    # ---- back to the input grid ------------------------------------------------------
    t0 = time.perf_counter()
    say("output", 0.92, "resampling results onto the input grid")
    f32 = sitk.sitkFloat32
    clip01 = lambda img: sitk.Clamp(img, f32, 0.0, 1.0)  # noqa: E731
    # cubic, not linear: the box holds point values of a smooth c; drawn linearly onto a
    # finer image it gets a kink at every box node, as if blurred by up to h²/4 per axis, and
    # calibrate read that blur as diffusion (κ 21% over on P1 of ACCURACY.md, true c0 and
    # atlas; with the cubic 1.7%; calibrate.concentration_to_box)
    c0_img = clip01(geom.from_box(c0_np.astype(np.float32), labels, "cubic"))
    c1_img = clip01(geom.from_box(c1.astype(np.float32), labels, "cubic"))
    disp_img = geom.vector_from_box(u, labels)
    norm_img = sitk.VectorMagnitude(disp_img)
    T = res.tissues
    fr_box = {"wm": T.wm, "gm": T.gm, "vt": T.vt, "csf": T.csf, "bg": T.bg}
    fr = {}
    for k, v in fr_box.items():
        fr[k] = sitk.GetArrayFromImage(geom.from_box(to_numpy(v).astype(np.float32), labels, "linear",
                                                     default=1.0 if k == "bg" else 0.0))
    c1_arr = sitk.GetArrayFromImage(c1_img)
    lab_arr = deformed_labels(fr, c1_arr)
    lab_img = io.image_like(lab_arr, labels)
    timings["resample_s"] = time.perf_counter() - t0
    check_cancel(cancel)

    out = outputs.folder
    files = {}

    def put(name, img):
        check_cancel(cancel)
        files[name] = outputs.write(f"{out}/{name}", lambda tmp: io.write_image(img, tmp))

    put("initial_condition.nrrd", c0_img)
    put("predicted_tumor.nrrd", c1_img)
    put("displacement_norm.nrrd", norm_img)
    put("displacement.nrrd", disp_img)
    put("labels.nrrd", lab_img)

    seed_info = {
        "ijk": [float(v) for v in seed_index],
        "lps_mm": [float(v) for v in seed_lps],
        "ras_mm": [float(v) for v in io.lps_to_ras(seed_lps)],
        "box_domain": [float(v) for v in centre],
        "box_voxel": [float(v) for v in centre / geom.h],
    }
    mm = geom.domain_unit_mm
    max_u_info = {
        "max_u_mm": max_u * mm,
        "max_u_domain": max_u,
        "max_u_box_voxels": max_u / geom.h,
        "max_u_voxels_256": max_u * 256 / (2 * math.pi),
        "max_u_mm_on_input_grid": float(sitk.GetArrayViewFromImage(norm_img).max()),
    }
    if preset is not None:
        say("output", 0.96, f"synthetic patient of preset {preset.name}")
        # BraTS labels drawn on the box's labels (edema on its parenchyma), then put on top of
        # the patient's tissue at the input resolution
        tumor = presets.tumor_only(presets.brats_labels(c1_arr, lab_arr))
        patient = moved_labels(labels, disp_img).astype(np.uint8)
        patient[tumor > 0] = tumor[tumor > 0]
        put("patient_labels.nrrd", io.image_like(patient, labels))
        put("tumor_labels.nrrd", io.image_like(tumor, labels))
        put("tumor_concentration.nrrd", c1_img)
        t1 = presets.t1_like(fr, c1_arr, labels, rng)
        put("t1.nrrd", io.image_like(t1, labels))
        counts = {k: int((patient == v).sum()) for k, v in io.BRATS_LABELS.items()}
        truth = {
            "preset": preset.name,
            "kappa": opt.kappa, "rho": opt.rho, "gamma": opt.gamma,
            "units": "paper (non-dimensional, box edge 2π = box_mm)",
            "seed": seed_info,
            "c0_centre_domain": seed_info["box_domain"],
            "c0_centre_lps_mm": seed_info["lps_mm"],
            "sigma_voxels": opt.sigma_voxels,
            "sigma_mm": opt.sigma_voxels * geom.spacing,
            "c0_max": opt.c0_max,
            **max_u_info,
            "paper_max_u_voxels_256": preset.paper_max_u_voxels_256,
            "brats_thresholds": presets.BRATS_THRESHOLDS,
            "brats_label_voxels": counts,
            "random_seed": opt.random_seed,
            "grid": geom.n, "box_mm": geom.box_mm, "nt": opt.nt, "dt": opt.dt,
        }
        files["ground_truth.json"] = outputs.write_json(f"{out}/ground_truth.json", truth)

    timings["total_s"] = time.perf_counter() - t_all
    stats = res.stats
    report = {
        "command": "simulate",
        "preset": preset.name if preset else None,
        "input": {"labels": str(opt.labels), "geometry": io.geometry_dict(labels)},
        "parameters": {"kappa": opt.kappa, "rho": opt.rho, "gamma": opt.gamma, "nt": opt.nt,
                       "dt": opt.dt, "n_steps": params.n_steps, "t_end": res.t_end,
                       "sigma_voxels": opt.sigma_voxels, "c0_max": opt.c0_max, "grid": geom.n, "box_mm": geom.box_mm,
                       "precision": opt.precision},
        "seed": seed_info,
        "box": geom.to_dict(),
        **max_u_info,
        "norms": {"c0": float(np.linalg.norm(c0_np)), "c1": float(np.linalg.norm(c1)),
                  "u_norm": float(np.linalg.norm(unorm)),
                  "c1_min": float(c1.min()), "c1_max": float(c1.max()),
                  "convention": "unweighted 2-norms over box voxels, domain units (MODEL §8)"},
        "solver": _stats_dict(stats),
        "timings": timings,
        "device": {"name": backend.name, "device": backend.device_name, "requested": opt.device},
        "versions": _versions(backend),
        "outputs": {k: str(v) for k, v in files.items()},
        "conventions": {
            "displacement": "LPS millimetres on the input grid, u_mm = (L/2π)·D_box·u_box; "
                            "deformed(x) ≈ healthy(x − u(x))",
            "labels": "0 bg, 5 gm, 6 wm, 7 vt, 8 csf, 1 tumor (c(1) above every tissue fraction)",
        },
    }
    check_cancel(cancel)
    outputs.write_json(f"{out}/report.json", report)
    say("done", 1.0, "finished")
    return report
