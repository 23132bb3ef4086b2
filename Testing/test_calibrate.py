"""The calibrate pipeline and its command line (calibrate.py, aggregate.py, cli.py;
MODEL.md §6, ARCHITECTURE.md "The process boundary").

A small patient: atlas.nc (64³ at 4 mm) with a BraTS tumor blob in white matter, on a
flipped, shifted grid; two atlases: atlas.nc itself and an affinely deformed copy. The
solver settings are cut down (S.1 one CoSaMP pass, S.3 one iteration at nt 9, dt 0.1, no
Hessian, short registrations) so that the pipeline runs in about a minute at grid 32: these
tests check the plumbing, geometry and the process contract, not the recovery (see
test_mass_effect_inversion.py and test_sparse_ic.py for that)."""
from __future__ import annotations

import json
import pathlib
import time
import types

import numpy as np
import pytest
import scipy.ndimage
import SimpleITK as sitk

from GBMMassEffectLib import aggregate, io
from GBMMassEffectLib.calibrate import S3_C0_SHIFT_MM, S3_TUMOR_MISFIT, CalibrateJob, InputError
from GBMMassEffectLib.registration import BRAIN_DICE_POOR
from cli_helpers import assert_one_line_error as one_line_error
from cli_helpers import run_cli, signal_cli_when
from glia_data import read_nc

REPO = pathlib.Path(__file__).resolve().parents[1]
OUTPUTS = ("predicted_tumor.nrrd", "displacement_norm.nrrd", "displacement_norm_std.nrrd",
           "displacement.nrrd", "initial_condition.nrrd")
CHEAP = {
    "s1": {"cosamp_iterations": 1, "subspace_maxiter": 3, "final_maxiter": 3, "nt": 10},
    "s3": {"maxiter": 1, "hessian": False, "nt": 9, "dt": 0.1, "workers": 2},
    "registration": {"iterations": 6, "affine_iterations": 15, "spacing_mm": 8.0},
}




def _write(arr, path, like=None, spacing=4.0, direction=None, origin=None):
    img = sitk.GetImageFromArray(arr)
    if like is not None:
        img.CopyInformation(like)
    else:
        img.SetSpacing([spacing] * 3)
        if direction is not None:
            img.SetDirection(direction)
        if origin is not None:
            img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return img


@pytest.fixture(scope="module")
def case(glia_testdata, tmp_path_factory):
    """Atlases (plain and deformed) and a patient with a BraTS tumor on a flipped grid."""
    d = tmp_path_factory.mktemp("calib")
    a = read_nc(glia_testdata / "atlas.nc")
    lab = np.asarray(a, dtype=np.float32).round().astype(np.uint8)
    atlas = _write(lab, d / "atlas_a.nrrd")
    centre = atlas.TransformContinuousIndexToPhysicalPoint([31.5] * 3)
    tx = sitk.AffineTransform(3)
    tx.SetCenter(centre)
    tx.SetMatrix([1.06, 0.03, 0, -0.02, 0.95, 0.02, 0, 0.01, 1.03])
    tx.SetTranslation([3.0, -2.0, 1.0])
    sitk.WriteImage(sitk.Resample(atlas, atlas, tx, sitk.sitkNearestNeighbor, 0), str(d / "atlas_b.nrrd"))
    # patient: the atlas anatomy on a flipped, shifted grid with a tumor ball in deep wm
    wm = lab == 6
    depth = scipy.ndimage.distance_transform_edt(wm)
    k, j, i = np.unravel_index(np.argmax(depth), lab.shape)
    zz, yy, xx = np.indices(lab.shape)
    r2 = (zz - k) ** 2 + (yy - j) ** 2 + (xx - i) ** 2
    tumor = np.zeros_like(lab)
    tumor[(r2 <= 36) & (lab > 0)] = 2
    tumor[r2 <= 16] = 4
    tumor[r2 <= 4] = 1
    geo = dict(spacing=4.0, direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1), origin=(110.0, 140.0, -100.0))
    tissue = lab.copy()
    tissue[tumor > 0] = 0  # tissue map without labels under the tumor
    t_img = _write(tumor, d / "tumor.nrrd", **geo)
    _write(tissue, d / "tissue.nrrd", **geo)
    both = tissue.copy()
    both[tumor > 0] = tumor[tumor > 0]
    _write(both, d / "patient_labels.nrrd", **geo)
    _write(np.zeros_like(tumor), d / "empty_tumor.nrrd", like=t_img)
    empty = np.zeros_like(tumor)
    empty[tumor == 2] = 2  # edema only: no tumor core
    _write(empty, d / "edema_only.nrrd", like=t_img)
    bad = tumor.copy()
    bad[0, 0, 0] = 9  # no BraTS or tissue label (3 is BraTS tumour core: test_brats_label_3_is_tumour_core)
    _write(bad, d / "bad_labels.nrrd", like=t_img)
    _write(tissue, d / "tissue_shifted.nrrd", spacing=4.0, origin=(5.0, 0.0, 0.0))
    return {"dir": d, "atlases": [d / "atlas_a.nrrd", d / "atlas_b.nrrd"], "tumor": d / "tumor.nrrd",
            "tissue": d / "tissue.nrrd"}


def _job(case, folder, **over):
    job = {"command": "calibrate", "t1": None, "tumor_labels": str(case["tumor"]),
           "tumor_label_values": {"necrotic": 1, "edema": 2, "enhancing": 4},
           "tissue_labels": str(case["tissue"]), "tissue_label_values": {"gm": 5, "wm": 6, "vt": 7, "csf": 8},
           "atlas_set": [str(p) for p in case["atlases"]], "grid": 32, "device": "cpu", "n_atlases": 2,
           "seed": 0, "out": str(folder / "out"), "options": CHEAP}
    job.update(over)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.json").write_text(json.dumps(job))
    return folder


@pytest.fixture(scope="module")
def full_run(case):
    folder = _job(case, case["dir"] / "job_full", predict_times=[1.2])
    t0 = time.perf_counter()
    proc, events = run_cli("calibrate", "--job", folder)
    return {"proc": proc, "events": events, "out": folder / "out", "seconds": time.perf_counter() - t0}


def same_geometry(img, ref):
    assert img.GetSize() == ref.GetSize()
    assert np.allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-6)
    assert np.allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    assert np.allclose(img.GetDirection(), ref.GetDirection(), atol=1e-6)


@pytest.mark.xdist_group("full_run")
def test_full_pipeline_outputs(case, full_run):
    proc, events, out = full_run["proc"], full_run["events"], full_run["out"]
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert events[-1] == {"event": "result", "path": str(out / "report.json")}
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {e["stage"] for e in events if e["event"] == "progress"} >= {"S.1", "S.2", "S.3"}
    ref = sitk.ReadImage(str(case["tumor"]))
    for name in OUTPUTS:
        img = sitk.ReadImage(str(out / name))
        same_geometry(img, ref)
    disp = sitk.ReadImage(str(out / "displacement.nrrd"))
    assert disp.GetNumberOfComponentsPerPixel() == 3
    later = sitk.ReadImage(str(out / "predicted_tumor_t1.2.nrrd"))  # requested later time
    same_geometry(later, ref)
    assert sitk.GetArrayFromImage(later).sum() > sitk.GetArrayFromImage(sitk.ReadImage(
        str(out / "predicted_tumor.nrrd"))).sum()  # the tumor keeps growing
    c1 = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "predicted_tumor.nrrd")))
    tumor = sitk.GetArrayFromImage(ref)
    assert 0 <= c1.min() and c1.max() <= 1
    assert c1[np.isin(tumor, (1, 4))].mean() > 0.3 > c1[tumor == 0].mean()  # the tumor lands on the tumor
    c0 = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "initial_condition.nrrd")))
    assert c0.max() > 0.5 and tumor[np.unravel_index(np.argmax(c0), c0.shape)] > 0
    unorm = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement_norm.nrrd")))
    u = sitk.GetArrayFromImage(disp)
    assert unorm.max() > 0.5  # mm; γ starts at 0.6
    report = json.loads((out / "report.json").read_text())
    for key in ("inputs", "options", "versions", "device", "timings", "s1", "atlases", "mean", "std",
                "patient_tissue_source", "outputs", "summary"):
        assert key in report, key
    assert report["patient_tissue_source"] == "tissue label map"
    assert len(report["s1"]["centres_domain"]) >= 1 and report["s1"]["kappa"] > 0
    assert len(report["atlases"]) == 2
    names = sorted(e["name"] for e in report["atlases"])
    assert names == ["atlas_a", "atlas_b"]
    for e in report["atlases"]:
        for key in ("name", "kappa", "rho", "gamma", "max_u_mm", "dropped", "relative_tumor_error",
                    "hessian_condition", "nit", "nfev", "status", "message"):
            assert key in e, key
        assert 0.005 <= e["kappa"] <= 0.05 and 2 <= e["rho"] <= 15 and 0 <= e["gamma"] <= 1.5
        assert e["max_u_mm"] == pytest.approx(e["max_u_domain"] * 256 / (2 * np.pi))
        # the pipeline's S.3 refits S.1's atom weights (one per atom, in [0, 1]), no pull-back
        w = e["c0_weights"]
        assert len(w) == report["s1"]["support"] and all(0 <= v <= 1 for v in w) and max(w) > 0
        assert e["c0_rounds"] == []
        # S.3's ventricle term leaves out the tumour (dilated one voxel): the share of the
        # atlas's ventricles it does not see (this tumour sits in deep white matter)
        assert 0 <= e["ventricles_unobserved_fraction"] < 0.5
        # S.2 lands the patient on each atlas: no poor-registration warning (brain Dice 0.85
        # on these coarse 64³ anatomies; 0.93–0.96 on the bundled atlases)
        assert e["registration"]["quality"]["dice_brain"] > BRAIN_DICE_POOR and not e.get("warnings")
        # and translates it (mm along the atlas box's axes) within S3_C0_SHIFT_MM when that is
        # on (it is with the partial-volume tumour term, not with §5's indicator)
        if report["effective_options"]["s3"]["c0_shift"] > 0:
            assert len(e["c0_shift_mm"]) == 3 and max(map(abs, e["c0_shift_mm"])) <= S3_C0_SHIFT_MM + 1e-9
        else:
            assert e["c0_shift_mm"] is None
        sub = out / f"atlas_{e['name']}"
        for name in ("predicted_tumor.nrrd", "displacement_norm.nrrd", "displacement.nrrd", "result.json"):
            assert (sub / name).is_file()
        same_geometry(sitk.ReadImage(str(sub / "predicted_tumor.nrrd")), ref)
    assert report["effective_options"]["s3"]["optimizer"] == "gauss-newton"
    kept = [e for e in report["atlases"] if not e["dropped"]] or report["atlases"]
    # parameters on a §6 bound: per atlas, summarised over the averaged ones, one note each
    bounds, averaged = report["summary"]["at_bounds"], report["summary"]["atlases_used"]
    for e in report["atlases"]:
        assert set(e["at_bounds"]) <= {"gamma", "rho", "kappa"}
        for k, side in e["at_bounds"].items():
            assert e["name"] not in averaged or e["name"] in bounds[k][side]["atlases"]
    assert len([n for n in report["notes"] if " bound " in n]) == sum(len(v) for v in bounds.values())
    assert report["mean"]["gamma"] == pytest.approx(np.mean([e["gamma"] for e in kept]))
    assert report["std"]["kappa"] == pytest.approx(np.std([e["kappa"] for e in kept]))
    # averaged |u| (mean of per-atlas norms) ≥ |mean u| voxel-wise (triangle inequality),
    # with equality for one atlas; the spread is the std of the per-atlas norms
    assert (unorm + 1e-3 >= np.sqrt((u ** 2).sum(-1))).all()
    norms = [np.sqrt((sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"atlas_{e['name']}" / "displacement.nrrd")))
                      .astype(np.float64) ** 2).sum(-1)) for e in report["atlases"]]
    used = report["summary"]["atlases_used"]
    sel = [n for n, e in zip(norms, report["atlases"]) if e["name"] in used]
    assert np.allclose(unorm, np.mean(sel, 0), atol=1e-3)
    std = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement_norm_std.nrrd")))
    assert np.allclose(std, np.std(sel, 0), atol=1e-3)
    assert not any("registration looks poor" in n for n in report["notes"])
    assert not list(out.rglob(".*.part*"))  # no temporaries left


@pytest.mark.parametrize("over, match", [
    ({"tissue_labels": None}, "neither a tissue segmentation"),
    ({"tumor_labels": "{dir}/empty_tumor.nrrd"}, "is empty"),
    ({"tumor_labels": "{dir}/edema_only.nrrd"}, "no tumor-core"),
    ({"tumor_labels": "{dir}/bad_labels.nrrd"}, "unknown label value(s) 9"),
    ({"tissue_labels": "{dir}/tissue_shifted.nrrd"}, "mismatched geometry"),
    ({"grid": 33}, "grid must be an even integer"),
    ({"colour": "blue"}, "unknown key(s) colour"),
    ({"options": {"s3": {"maxiterations": 3}}}, "unknown S.3 option(s): maxiterations"),
    ({"atlas_set": "{dir}/nowhere"}, "no such file or folder"),
])
def test_bad_inputs_one_line_error(case, tmp_path, over, match):
    over = {k: (v.format(dir=case["dir"]) if isinstance(v, str) else v) for k, v in over.items()}
    folder = _job(case, tmp_path / "job", **over)
    proc, events = run_cli("calibrate", "--job", folder, timeout=120)
    one_line_error(proc, events, 2, match)
    assert not (folder / "out" / "report.json").exists()


def test_flags_give_the_same_job_as_job_json(case, tmp_path):
    proc, events = run_cli("calibrate", "--tumor-seg", case["tumor"], "--out", tmp_path / "o", "--grid", 32,
                           timeout=120)
    one_line_error(proc, events, 2, "neither a tissue segmentation")
    proc, events = run_cli("calibrate", timeout=120)
    one_line_error(proc, events, 2, "calibrate needs --job DIR")
    job = CalibrateJob.from_dict({"tumor_labels": "t.nrrd", "tissue_labels": "s.nrrd", "out": "o"}, "/base")
    assert job.tumor_labels == "/base/t.nrrd" and job.out == "/base/o" and job.atlas_set == "bundled"
    with pytest.raises(InputError, match="unknown key"):
        CalibrateJob.from_dict({"tumour": "x"})
    # S.3 refits S.1's c0 in the pipeline; a job may ask for the pull-back or the fixed c0
    o3 = lambda s3: CalibrateJob.from_dict({"tumor_labels": "t", "out": "o", "options": {"s3": s3}}).s3_options()  # noqa: E731
    assert (job.s3_options().c0_refit, job.s3_options().c0_pullback) == (True, 0)
    assert job.s3_options().optimizer == "gauss-newton" and o3({"optimizer": "lbfgsb"}).optimizer == "lbfgsb"
    with pytest.raises(InputError, match="S.3 options: S.3 optimizer must be one of"):
        o3({"optimizer": "bfgs"})
    assert (o3({"c0_pullback": 2}).c0_refit, o3({"c0_pullback": 2}).c0_pullback) == (False, 2)
    assert (o3({"c0_refit": False}).c0_refit, o3({"c0_refit": False}).c0_pullback) == (False, 0)
    # the refit translates c0 by up to S3_C0_SHIFT_MM (32 mm: two S.1 lattice steps at 32³;
    # in voxels of the grid) when S.3's tumour term reads the data below the voxel scale (a
    # concentration, labels as partial volumes), not with thresholded labels, or as asked;
    # the pull-back and the paper's fixed c0 do not, unless asked
    assert S3_C0_SHIFT_MM == 32.0
    on = S3_TUMOR_MISFIT == "fraction"
    assert job.s3_options().c0_shift == pytest.approx(on * S3_C0_SHIFT_MM * job.grid / job.box_mm)
    for kind, expected in (("fraction", 4.0), ("indicator", 0.0), ("band", 0.0)):
        o = CalibrateJob.from_dict({"tumor_labels": "t", "out": "o", "grid": 32,
                                    "options": {"s3": {"tumor_misfit": kind}}}).s3_options()
        assert o.c0_shift == pytest.approx(expected), kind
    g32 = CalibrateJob.from_dict({"tumor_labels": "t", "out": "o", "grid": 32})
    assert g32.s3_options().c0_shift == pytest.approx(on * S3_C0_SHIFT_MM / 8.0)
    for n, voxels in ((32, 4.0), (64, 8.0)):  # 32 mm in 8 mm and 4 mm voxels (256 mm box)
        cj = CalibrateJob.from_dict({"tumor_concentration": "c", "out": "o", "grid": n})
        assert cj.s3_options().c0_shift == pytest.approx(voxels)
        assert CalibrateJob.from_dict({"tumor_concentration": "c", "out": "o", "grid": n,
                                       "options": {"s3": {"c0_shift": 0}}}).s3_options().c0_shift == 0
        assert CalibrateJob.from_dict({"tumor_concentration": "c", "out": "o", "grid": n, "options": {
            "s3": {"c0_refit": False}}}).s3_options().c0_shift == 0
    assert o3({"c0_pullback": 2}).c0_shift == 0 and o3({"c0_refit": False}).c0_shift == 0
    assert o3({"c0_shift": 2.0}).c0_shift == 2.0 and o3({"c0_shift": 2.0}).c0_refit is True
    assert o3({"c0_refit": False, "c0_shift": 1.5}).c0_shift == 1.5 and o3({"c0_shift": 0}).c0_shift == 0
    with pytest.raises(InputError, match="c0_shift must be"):
        o3({"c0_shift": -1})
    with pytest.raises(InputError, match="choose one"):
        o3({"c0_refit": True, "c0_pullback": 1})
    # S.3's tumour term on labels or masks: the partial volumes by default, §5's indicator or
    # the label band on request (thresholds those of simulate's labels); a concentration is
    # always compared as is
    assert (job.s3_options().tumor_misfit, job.s3_options().core_threshold,
            job.s3_options().edema_threshold) == ("fraction", 0.4, 0.02)
    assert o3({"tumor_misfit": "indicator"}).tumor_misfit == "indicator"
    assert o3({"tumor_misfit": "band"}).tumor_misfit == "band"
    assert o3({"tumor_misfit": "fraction"}).tumor_misfit == "fraction"
    assert o3({"core_threshold": 0.5, "edema_threshold": 0.1}).core_threshold == 0.5
    with pytest.raises(InputError, match="tumor_misfit must be one of"):
        o3({"tumor_misfit": "dice"})
    with pytest.raises(InputError, match="0 < edema_threshold < core_threshold < 1"):
        o3({"core_threshold": 0.01})
    conc = lambda s3: CalibrateJob.from_dict({"tumor_concentration": "c", "out": "o",  # noqa: E731
                                              "options": {"s3": s3}}).s3_options()
    assert conc({}).tumor_misfit == "indicator" and conc({"tumor_misfit": "indicator"}).tumor_misfit == "indicator"
    with pytest.raises(InputError, match="tumor_misfit 'band' needs a tumor label map or masks"):
        conc({"tumor_misfit": "band"})
    with pytest.raises(InputError, match="tumor_misfit 'fraction' needs a tumor label map or masks"):
        conc({"tumor_misfit": "fraction"})
    # S.1 the same: §5's indicator unless asked, the band only on labels or masks
    o1 = lambda s1, **j: CalibrateJob.from_dict({"tumor_labels": "t", "out": "o", **j,  # noqa: E731
                                                 "options": {"s1": s1}}).s1_options()
    assert o1({}).tumor_misfit == "indicator" and o1({"tumor_misfit": "band"}).tumor_misfit == "band"
    with pytest.raises(InputError, match="S.1 options: S.1 tumor_misfit must be one of"):
        o1({"tumor_misfit": "dice"})
    with pytest.raises(InputError, match="S.1 options: S.1 tumor_misfit 'fraction' is S.3's only"):
        o1({"tumor_misfit": "fraction"})
    with pytest.raises(InputError, match="S.1 option tumor_misfit 'band' needs a tumor label map or masks"):
        CalibrateJob.from_dict({"tumor_concentration": "c", "out": "o",
                                "options": {"s1": {"tumor_misfit": "band"}}}).s1_options()
    # S.2: affine only for the data S.3 sees, demons to derive tissue from a T1
    reg = job.registration_options()
    assert (reg["deformable"], reg["t1_deformable"]) == ("none", "demons")
    demons = CalibrateJob.from_dict({"tumor_labels": "t", "out": "o",
                                     "options": {"registration": {"deformable": "demons"}}})
    assert demons.registration_options()["deformable"] == "demons"
    with pytest.raises(InputError, match="t1_deformable"):
        CalibrateJob.from_dict({"tumor_labels": "t", "out": "o",
                                "options": {"registration": {"t1_deformable": "elastix"}}}).registration_options()


def test_concentration_input_through_the_whole_path(case, tmp_path):
    """`--tumor-concentration` (synthetic studies) end to end: a c(1) on the patient's
    flipped grid instead of labels; exit 0 with every output on the patient's geometry, and
    S.3 translates c0 by default there (32 mm = 4 voxels at 32³: S3_C0_SHIFT_MM), within
    its bound."""
    tumor_img = sitk.ReadImage(str(case["tumor"]))
    t = sitk.GetArrayFromImage(tumor_img)
    k, j, i = np.argwhere(t == 1).mean(0)
    zz, yy, xx = np.indices(t.shape)
    r = np.sqrt((zz - k) ** 2 + (yy - j) ** 2 + (xx - i) ** 2)
    tissue = sitk.GetArrayFromImage(sitk.ReadImage(str(case["tissue"])))
    conc = np.where((tissue > 0) | (t > 0), 1.0 / (1.0 + np.exp((r - 4.0) / 0.8)), 0).astype(np.float32)
    _write(conc, tmp_path / "c.nrrd", like=tumor_img)
    folder = _job(case, tmp_path / "job", tumor_labels=None, tumor_concentration=str(tmp_path / "c.nrrd"),
                  atlas_set=[str(case["atlases"][0])], n_atlases=1)
    proc, events = run_cli("calibrate", "--job", folder)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    out = folder / "out"
    for name in OUTPUTS:
        same_geometry(sitk.ReadImage(str(out / name)), tumor_img)
    report = json.loads((out / "report.json").read_text())
    assert report["effective_options"]["s3"]["c0_shift"] == pytest.approx(4.0)
    (e,) = report["atlases"]
    assert len(e["c0_shift_mm"]) == 3 and max(map(abs, e["c0_shift_mm"])) <= S3_C0_SHIFT_MM + 1e-9
    c1 = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "predicted_tumor.nrrd")))
    assert c1[conc > 0.5].mean() > 0.3 > c1[conc < 0.01].mean()  # the tumour lands on the tumour


def test_sigterm_leaves_nothing(case, tmp_path):
    """SIGTERM once the first atlas's outputs are written (atlas 2's S.2 or, when its affine
    registration was made for the atlas choice, its S.3 started): exit 143 within seconds,
    and the output folder is gone (nothing half written)."""
    folder = _job(case, tmp_path / "job")
    out = folder / "out"

    def atlas_1_written(proc, events):
        assert list(out.rglob("result.json")), "atlas 1 should have written its outputs"

    proc, lines, elapsed, _, _ = signal_cli_when(
        ["calibrate", "--job", folder], lambda e: e.get("stage") in ("S.2", "S.3") and e.get("atlas") == 2,
        before_signal=atlas_1_written)
    assert proc.returncode == 143
    assert elapsed < 10
    assert lines[-1]["event"] == "error" and lines[-1].get("cancelled")
    assert not out.exists() or not any(out.rglob("*"))


@pytest.mark.xdist_group("full_run")
def test_cohort_on_dask_gives_the_single_runs_outputs(case, full_run, tmp_path):
    """cohort: three job folders on a local Dask cluster of two workers: the valid one gets
    exactly full_run's outputs and numbers (the same pipeline cut into (patient, atlas)
    tasks); a patient whose input is bad and a folder with a broken job.json are reported
    as failed (their outputs absent) without stopping it; exit 1 with a result line."""
    root = tmp_path / "cohort"
    _job(case, root / "p1", predict_times=[1.2])
    _job(case, root / "p2", tumor_labels=str(case["dir"] / "empty_tumor.nrrd"))
    (root / "p3").mkdir()
    (root / "p3" / "job.json").write_text("{not json")
    proc, events = run_cli("cohort", "--jobs", root, "--out", tmp_path / "co", "--workers", 2)
    assert proc.returncode == 1, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    assert events[-1] == {"event": "result", "path": str(tmp_path / "co" / "cohort_report.json"),
                          "failed": ["p2", "p3"]}
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    co = json.loads((tmp_path / "co" / "cohort_report.json").read_text())
    rows = {r["name"]: r for r in co["patients"]}
    assert co["n_ok"] == 1 and co["n_failed"] == 2 and co["dask"]["workers"] == 2
    assert "is empty" in rows["p2"]["error"] and "job.json" in rows["p3"]["error"]
    assert not (root / "p2" / "out").exists()
    single = json.loads((full_run["out"] / "report.json").read_text())
    mine = json.loads((root / "p1" / "out" / "report.json").read_text())
    assert rows["p1"]["report"] == str(root / "p1" / "out" / "report.json")
    for k in ("kappa", "rho", "gamma", "max_u_mm"):
        assert mine["mean"][k] == pytest.approx(single["mean"][k], rel=1e-6), k
        assert rows["p1"]["mean"][k] == mine["mean"][k]
    assert [e["name"] for e in mine["atlases"]] == [e["name"] for e in single["atlases"]]
    files = sorted(str(p.relative_to(full_run["out"])) for p in full_run["out"].rglob("*"))
    assert sorted(str(p.relative_to(root / "p1" / "out")) for p in (root / "p1" / "out").rglob("*")) == files
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "p1" / "out" / "displacement_norm.nrrd")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(full_run["out"] / "displacement_norm.nrrd")))
    assert np.allclose(a, b, atol=1e-4)
    csv_rows = (tmp_path / "co" / "cohort_summary.csv").read_text().splitlines()
    assert csv_rows[0].startswith("patient,status,kappa_mean,kappa_std") and len(csv_rows) == 4
    assert csv_rows[1].startswith("p1,ok,")


def test_cohort_sigterm_stops_workers_and_leaves_nothing(case, tmp_path):
    """SIGTERM while the cohort's patients are in S.1 on the Dask workers: exit 143 within
    seconds, the worker processes are gone and no patient output is left."""
    import psutil

    root = tmp_path / "cohort"
    for name in ("p1", "p2"):
        _job(case, root / name)

    def workers_running(proc, events):
        time.sleep(2.0)  # the prepare tasks are running on the workers
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2  # the local cluster's worker processes
        return children

    proc, lines, elapsed, _, children = signal_cli_when(
        ["cohort", "--jobs", root, "--out", tmp_path / "co", "--workers", 2],
        lambda e: "submitted" in e.get("message", ""), before_signal=workers_running)
    assert proc.returncode == 143 and elapsed < 10
    assert lines[-1]["event"] == "error" and lines[-1].get("cancelled")
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive
    for name in ("p1", "p2"):
        assert not (root / name / "out").exists()
    assert not (tmp_path / "co" / "cohort_report.json").exists()


def test_cohort_workers_keep_glibc_malloc_defaults():
    """The local workers get Dask's one-thread BLAS/OpenMP settings but not its
    MALLOC_TRIM_THRESHOLD_ (cohort.worker_environ: it halved the solver's speed)."""
    import os

    from GBMMassEffectLib.cohort import dask_client

    with dask_client(workers=1) as client:
        env = client.submit(lambda: {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")},
                            pure=False).result(timeout=60)
    assert env == {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": "1"}


# ---- aggregation (pure) ------------------------------------------------------------------------
def _match_on_visible(job, patient, aset):
    """calibrate._match_atlases as prepare_calibration calls it for a 32³ job: the patient's
    own tissue map, its visible ventricle volume as the fallback's, no progress, no cancel."""
    from GBMMassEffectLib.atlases import ventricle_volume_ml
    from GBMMassEffectLib.calibrate import _as_progress, _match_atlases

    return _match_atlases(job, patient, aset, patient.tissue, ventricle_volume_ml(patient.tissue),
                          job.registration_options(), 256.0 / 32, _as_progress(None), None)


def _entry(name, **kw):
    e = {"name": name, "failed": False, "kappa": 0.02, "rho": 10.0, "gamma": 0.5, "max_u_mm": 10.0,
         "max_u_domain": 0.25, "relative_tumor_error": 0.3, "hessian_condition": 50.0}
    e.update(kw)
    return e


def test_dropping_rules_and_summary():
    es = [_entry("ok1", gamma=0.4, kappa=0.01), _entry("ok2", gamma=0.6, kappa=0.03),
          _entry("big_u", max_u_domain=2.5), _entry("misfit", relative_tumor_error=1.2),
          _entry("illcond", hessian_condition=2e4), _entry("failed", failed=True, error="boom"),
          _entry("nohess", hessian_condition=None)]
    aggregate.apply_dropping(es)
    reasons = {e["name"]: e["dropped"] for e in es}
    assert reasons["ok1"] is None and reasons["ok2"] is None and reasons["nohess"] is None
    assert "max|u|" in reasons["big_u"] and "relative tumor error" in reasons["misfit"]
    assert "Hessian condition" in reasons["illcond"] and "boom" in reasons["failed"]
    s = aggregate.summarise(es)
    assert s.kept == ["ok1", "ok2", "nohess"]
    assert s.mean["gamma"] == pytest.approx(0.5) and s.std["gamma"] == pytest.approx(np.std([0.4, 0.6, 0.5]))
    assert s.mean["kappa"] == pytest.approx(0.02)
    # every atlas dropped but some have results: summary over those, flagged
    es2 = aggregate.apply_dropping([_entry("a", max_u_domain=3.0, gamma=1.0), _entry("b", failed=True)])
    s2 = aggregate.summarise(es2)
    assert s2.kept == ["a"] and "every atlas" in s2.basis and s2.mean["gamma"] == 1.0
    with pytest.raises(aggregate.AllAtlasesFailed, match="no atlas produced a result"):
        aggregate.summarise(aggregate.apply_dropping([_entry("b", failed=True, error="x")]))


def test_parameters_left_on_a_bound_are_reported():
    """A γ, ρ or κ that S.3 left on (within 1% of the range of) a §6 bound is listed per atlas
    and noted in the report: the bound set it, not the data."""
    from GBMMassEffectLib.mass_effect_inversion import MassEffectOptions, at_bounds

    opt = MassEffectOptions()  # γ [0, 1.5], ρ [2, 15], κ [0.005, 0.05]
    assert at_bounds({"gamma": 0.5, "rho": 10.0, "kappa": 0.02}, opt) == {}
    assert at_bounds({"gamma": 0.0, "rho": 15.0, "kappa": 0.0498}, opt) == \
        {"gamma": "lower", "rho": "upper", "kappa": "upper"}
    assert at_bounds({"gamma": 0.5, "rho": 2.2, "kappa": 0.0486}, opt) == {}  # 1.5%, 3% of the range
    es = [_entry("a", at_bounds={"kappa": "upper"}), _entry("b", at_bounds={"kappa": "upper", "gamma": "lower"}),
          _entry("c", at_bounds={"kappa": "lower"}), _entry("d", at_bounds={"rho": "upper"}, dropped="x")]
    summary, notes = aggregate.bound_notes(es, ["a", "b", "c"], opt)
    assert summary == {"gamma": {"lower": {"value": 0.0, "atlases": ["b"]}},
                       "kappa": {"lower": {"value": 0.005, "atlases": ["c"]},
                                 "upper": {"value": 0.05, "atlases": ["a", "b"]}}}
    assert len(notes) == 3 and "no mass effect" in notes[0]
    assert notes[2].startswith("κ on its upper bound 0.05 in 2 of 3 atlas(es) (a, b)") and "not an estimate" in notes[2]
    assert aggregate.bound_notes([_entry("a")], ["a"], opt) == ({}, [])
    # ρ on its lower bound: the note also names the seed finer than the grid (the reference
    # solver's 64³ patient calibrated at 32³: ρ and κ on their lower bounds)
    _, notes = aggregate.bound_notes([_entry("a", at_bounds={"rho": "lower"})], ["a"], opt)
    assert len(notes) == 1 and notes[0].startswith("ρ on its lower bound 2 in 1 of 1") and "c0_max" in notes[0]


def test_volume_average():
    acc = aggregate.VolumeAverage()
    a, b = np.array([1.0, 2.0]), np.array([3.0, 2.0])
    acc.add({"displacement_norm": a, "predicted_tumor": a})
    acc.add({"displacement_norm": b, "predicted_tumor": b})
    assert np.allclose(acc.mean("displacement_norm"), [2, 2]) and np.allclose(acc.std("displacement_norm"), [1, 0])


def test_ventricles_observed_leaves_out_the_tumour_and_one_voxel_around_it():
    from GBMMassEffectLib.calibrate import VT_MASK_DILATION, ventricles_observed

    whole = np.zeros((9, 9, 9), np.float32)
    whole[4, 4, 4] = 0.9
    whole[4, 4, 5] = 0.4  # under half a voxel of tumour: not hidden itself
    m = ventricles_observed(whole)
    assert m.dtype == np.float32 and VT_MASK_DILATION == 1
    hidden = np.argwhere(m == 0)
    # the tumour voxel and its six face neighbours (one dilation step), nothing else
    assert len(hidden) == 7 and np.abs(hidden - 4).sum(axis=1).max() == 1
    assert ventricles_observed(np.zeros((4, 4, 4))).min() == 1.0


def test_atlas_choice_by_anatomical_match_when_the_tumour_hides_ventricles(case, tmp_path, monkeypatch):
    """A tumour over part of the patient's ventricles: no ventricle volume is fair, so the
    atlases are chosen by the affine S.2 match outside the tumour; the patient's own anatomy
    wins against an affinely deformed copy and a copy with larger ventricles."""
    from GBMMassEffectLib.atlases import load_atlas_set, ventricle_volume_ml
    from GBMMassEffectLib.calibrate import read_patient, tumor_borders_ventricles

    tissue = sitk.ReadImage(str(case["tissue"]))  # the patient's flipped, shifted grid
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(case["atlases"][0])))  # its anatomy, no tumour yet
    k, j, i = np.argwhere(lab == 7)[len(np.argwhere(lab == 7)) // 2]
    zz, yy, xx = np.indices(lab.shape)
    r2 = (zz - k) ** 2 + (yy - j) ** 2 + (xx - i) ** 2
    tumor = np.zeros_like(lab)
    tumor[(r2 <= 49) & (lab > 0)] = 2
    tumor[r2 <= 16] = 4
    hidden_tissue = lab.copy()
    hidden_tissue[tumor > 0] = 0
    _write(tumor, tmp_path / "tumor.nrrd", like=tissue)
    _write(hidden_tissue, tmp_path / "tissue.nrrd", like=tissue)
    big = lab.copy()  # the same anatomy with ventricles grown one voxel into the white matter
    big[scipy.ndimage.binary_dilation(lab == 7) & (lab == 6)] = 7
    big_path = _write(big, tmp_path / "atlas_big.nrrd", like=sitk.ReadImage(str(case["atlases"][0])))
    atlas_paths = [str(p) for p in case["atlases"]] + [str(tmp_path / "atlas_big.nrrd")]
    job = CalibrateJob.from_dict({"tumor_labels": str(tmp_path / "tumor.nrrd"),
                                  "tissue_labels": str(tmp_path / "tissue.nrrd"),
                                  "atlas_set": atlas_paths, "grid": 32, "n_atlases": 2,
                                  "out": str(tmp_path / "out"), "options": CHEAP})
    patient = read_patient(job)
    assert tumor_borders_ventricles(patient.tissue, patient)
    # ventricles two voxels from the tumour: nothing hidden
    near = scipy.ndimage.binary_dilation(tumor > 0, np.ones((3, 3, 3), bool), iterations=2)
    far = hidden_tissue.copy()
    far[near & (far == 7)] = 6
    assert (far == 7).any() and not tumor_borders_ventricles(_write(far, tmp_path / "far.nrrd", like=tissue), patient)
    aset = load_atlas_set(atlas_paths)
    own, shifted, grown = (a.name for a in aset)
    assert ventricle_volume_ml(patient.tissue) < 0.8 * aset[0].ventricle_ml  # over a fifth hidden
    assert ventricle_volume_ml(big_path) > 1.3 * aset[0].ventricle_ml
    chosen, regs = _match_on_visible(job, patient, aset)
    assert set(regs) == {own, shifted, grown}
    scores = {n: r.quality["score"] for n, r in regs.items()}
    assert scores[own] > max(scores[shifted], scores[grown]), scores
    # the own anatomy first; the grown copy's ventricles are over 1.3x the best match's
    assert [a.name for a, _ in chosen] == [own, shifted], (chosen, scores)
    assert "best anatomical match" in chosen[0][1] and "outside the tumour" in chosen[0][1]
    # an atlas whose registration fails is left out of the choice, not fatal
    import GBMMassEffectLib.calibrate as C
    from GBMMassEffectLib.registration import RegistrationError

    real = C._register

    def failing(job, patient, atlas, *a, **kw):
        if atlas.name == own:
            raise RegistrationError("no overlap")
        return real(job, patient, atlas, *a, **kw)

    monkeypatch.setattr(C, "_register", failing)
    chosen2, regs2 = _match_on_visible(job, patient, aset)
    assert set(regs2) == {shifted, grown} and own not in [a.name for a, _ in chosen2] and len(chosen2) == 2
    # every registration failing: §6's choice on the visible volume (S.2 then reports them)
    monkeypatch.setattr(C, "_register", lambda *a, **kw: (_ for _ in ()).throw(RegistrationError("no")))
    chosen3, regs3 = _match_on_visible(job, patient, aset)
    assert regs3 == {} and len(chosen3) == 2 and "ventricle ratio" in chosen3[0][1]


def test_atlas_choice_finds_the_patients_anatomy_under_mass_effect(tmp_path):
    """A patient grown with mass effect in the bundled sri24 (κ 0.015, ρ 8, γ 0.6; the tumour
    hides part of its ventricles). The mass effect pushes ventricle out from under the
    tumour: sri24's ventricles outside the registered tumour are fewer than the patient's
    visible ones, so comparing those volumes passes over the patient's own atlas for ones
    with larger ventricles. The match choice takes sri24 first and, beside it, an atlas
    whose ventricles are within 1.3x of sri24's, not the better-matching 47 mL variant."""
    from GBMMassEffectLib.atlases import load_atlas_set, ventricle_volume_ml
    from GBMMassEffectLib.calibrate import read_patient, tumor_borders_ventricles
    from GBMMassEffectLib.progress import OutputSet
    from GBMMassEffectLib.simulate import SimulateOptions, run_simulate

    bundled = load_atlas_set()
    names = ["sri24", "sri24-var4", "sri24-var5", "sri24-var6", "mni152-var8"]
    aset = [bundled[n] for n in names]
    pdir = tmp_path / "patient"
    run_simulate(SimulateOptions(labels=str(bundled["sri24"].labels_path), out=str(pdir), preset="tc-c",
                                 kappa=0.015, rho=8.0, gamma=0.6, grid=32, device="cpu"), OutputSet(pdir))
    job = CalibrateJob.from_dict({"tumor_labels": str(pdir / "tumor_labels.nrrd"),
                                  "tissue_labels": str(pdir / "patient_labels.nrrd"),
                                  "grid": 32, "n_atlases": 2, "out": str(tmp_path / "out")})
    patient = read_patient(job)
    assert tumor_borders_ventricles(patient.tissue, patient)
    chosen, regs = _match_on_visible(job, patient, aset)
    own = chosen[0][1]
    visible = ventricle_volume_ml(patient.tissue)
    outside = float(own.split("; ")[-1].split(" mL")[0])
    assert outside < 0.9 * visible, (outside, visible)  # pushed out from under the tumour
    assert [a.name for a, _ in chosen] == ["sri24", "sri24-var4"], (chosen, {n: r.quality for n, r in regs.items()})
    assert regs["sri24-var6"].quality["score"] > regs["sri24-var4"].quality["score"]


def _t1_from_labels(lab):
    table = np.zeros(256, np.float32)
    for v, x in ((5, 650.0), (6, 900.0), (7, 350.0), (8, 350.0), (1, 450.0), (2, 700.0), (4, 500.0)):
        table[v] = x
    return scipy.ndimage.gaussian_filter(table[lab], 0.7)


def test_t1_only_patient_chooses_atlases_by_the_t1_match(case, tmp_path):
    """No tissue map: the T1 is registered affinely to every atlas with a T1 and the best
    match chosen (here the patient's own anatomy against a copy with ventricles grown two
    voxels, which wins a tie by name); its labels, through the deformable stage, are the tissue."""
    from GBMMassEffectLib.atlases import load_atlas_set, make_manifest
    from GBMMassEffectLib.calibrate import _as_progress, _derive_tissue, read_patient

    aset_dir = tmp_path / "atlases"
    aset_dir.mkdir()
    lab_a = sitk.ReadImage(str(case["atlases"][0]))
    arr = sitk.GetArrayFromImage(lab_a)
    big = arr.copy()
    big[scipy.ndimage.binary_dilation(arr == 7, iterations=2) & (arr == 6)] = 7
    for stem, a in (("own", arr), ("big", big)):
        _write(a, aset_dir / f"{stem}_labels.nrrd", like=lab_a)
        _write(_t1_from_labels(a), aset_dir / f"{stem}_t1.nrrd", like=lab_a)
    make_manifest(aset_dir)
    pl = sitk.ReadImage(str(case["dir"] / "patient_labels.nrrd"))
    _write(_t1_from_labels(sitk.GetArrayFromImage(pl)), tmp_path / "t1.nrrd", like=pl)
    job = CalibrateJob.from_dict({"t1": str(tmp_path / "t1.nrrd"), "tumor_labels": str(case["tumor"]),
                                  "atlas_set": str(aset_dir), "grid": 32, "n_atlases": 1,
                                  "out": str(tmp_path / "out"), "options": CHEAP})
    patient = read_patient(job)
    aset = load_atlas_set(job.atlas_set)
    tissue, chosen, regs, best = _derive_tissue(job, patient, aset, job.registration_options(), 8.0,
                                                _as_progress(None), None)
    assert [a.name for a, _ in chosen] == ["own"] and best == "own" and set(regs) == {"own"}
    assert "best anatomical match" in chosen[0][1] and "T1, affine" in chosen[0][1]
    assert (sitk.GetArrayViewFromImage(tissue) == 7).any()
    # named atlases skip the affine pass
    job.atlases = ["big"]
    _, chosen2, regs2, best2 = _derive_tissue(job, patient, aset, job.registration_options(), 8.0,
                                              _as_progress(None), None)
    assert [a.name for a, _ in chosen2] == ["big"] and best2 == "big" and chosen2[0][1] == "named in the job"


@pytest.mark.slow
def test_clinical_like_t1_and_binary_mask(case, tmp_path):
    """Only a thick-slice T1 (4 × 4 × 12 mm) and a binary tumor mask: the tissue comes from the
    best-registered atlas (said in report.json), outputs on the T1's grid."""
    d = case["dir"]
    aset = tmp_path / "atlases"
    aset.mkdir()
    for p in case["atlases"]:
        img = sitk.ReadImage(str(p))
        stem = p.name.replace(".nrrd", "")
        sitk.WriteImage(img, str(aset / f"{stem}_labels.nrrd"))
        _write(_t1_from_labels(sitk.GetArrayFromImage(img)), aset / f"{stem}_t1.nrrd", like=img)
    from GBMMassEffectLib.atlases import make_manifest

    make_manifest(aset)
    pl = sitk.ReadImage(str(d / "patient_labels.nrrd"))
    t1 = io_img = _write(_t1_from_labels(sitk.GetArrayFromImage(pl)), tmp_path / "t1_iso.nrrd", like=pl)
    thick = sitk.Image([64, 64, 21], sitk.sitkFloat32)
    thick.SetSpacing((4.0, 4.0, 12.0))
    thick.SetDirection(pl.GetDirection())
    thick.SetOrigin(pl.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, 1.0)))
    sitk.WriteImage(sitk.Resample(io_img, thick, sitk.Transform(), sitk.sitkLinear, 0.0), str(tmp_path / "t1.nrrd"))
    core = sitk.Resample(sitk.Cast(sitk.ReadImage(str(case["tumor"])), sitk.sitkUInt8), thick, sitk.Transform(),
                         sitk.sitkNearestNeighbor, 0)
    mask = sitk.Cast(sitk.BinaryThreshold(core, 1, 4, 1, 0), sitk.sitkUInt8)  # core + edema as one mask
    sitk.WriteImage(mask, str(tmp_path / "mask.nrrd"))
    del t1
    proc, events = run_cli("calibrate", "--t1", tmp_path / "t1.nrrd", "--tumor-core", tmp_path / "mask.nrrd",
                           "--atlas-set", aset, "--atlases", 2, "--grid", 32, "--device", "cpu",
                           "--options", json.dumps(CHEAP), "--out", tmp_path / "out")
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["patient_tissue_source"].startswith("derived from the best-registered atlas")
    # the derived tissue (affine + demons on the T1) is registered again, affine only, for S.3
    assert {a["registration"]["method"] for a in report["atlases"] if not a["failed"]} == {"affine+none"}
    assert (tmp_path / "out" / "patient_tissue_labels.nrrd").is_file()
    for name in OUTPUTS:
        same_geometry(sitk.ReadImage(str(tmp_path / "out" / name)), thick)


def test_tissue_map_tumour_labels_and_holes_join_the_whole_tumour(case, tmp_path):
    """A concentration input (whole tumour c > 0.1) smaller than the tumour of the tissue
    map: its tumour labels, or the unlabelled hole a tissue map leaves under a tumour, join
    the whole tumour (S.1's brain, S.2's mask, S.3's ventricle mask). Left out, the demo
    patient's labelled ring 0.02 < c < 0.1 stayed unmasked and the affine S.2 put the
    patient 60 mm off its own atlas (benchmarks/ACCURACY.md, last section)."""
    from GBMMassEffectLib.calibrate import read_patient

    tumor_img = sitk.ReadImage(str(case["tumor"]))
    k, j, i = np.argwhere(sitk.GetArrayFromImage(tumor_img) == 1).mean(0)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(case["atlases"][0])))  # the patient's anatomy
    zz, yy, xx = np.indices(lab.shape)
    r = np.sqrt((zz - k) ** 2 + (yy - j) ** 2 + (xx - i) ** 2)
    # a tumour of radius 8 voxels inside the brain, c > 0.1 within radius 5.5 only
    big = np.where((r <= 8) & (lab > 0), 2, 0).astype(np.uint8)
    big[r <= 5] = 4
    conc = np.where(lab > 0, np.exp(-(r / 3.62) ** 2), 0).astype(np.float32)
    assert (conc > 0.1).sum() < 0.5 * (big > 0).sum()
    labelled, holes = lab.copy(), lab.copy()
    labelled[big > 0] = big[big > 0]
    holes[big > 0] = 0
    _write(conc, tmp_path / "c.nrrd", like=tumor_img)  # the patient's flipped, shifted grid
    for name, tissue in (("labelled", labelled), ("holes", holes)):
        _write(tissue, tmp_path / f"tissue_{name}.nrrd", like=tumor_img)
        job = CalibrateJob.from_dict({"tumor_concentration": str(tmp_path / "c.nrrd"),
                                      "tissue_labels": str(tmp_path / f"tissue_{name}.nrrd"),
                                      "atlas_set": [str(case["atlases"][0])], "grid": 32,
                                      "out": str(tmp_path / "out"), "options": CHEAP})
        p = read_patient(job)
        assert p.whole[big > 0].all(), name
        assert not p.whole[(lab > 0) & (r > 9)].any(), name  # the healthy tissue stays
        assert not p.whole[lab == 0].any(), name  # and so does the outside of the brain


def test_tumour_input_without_edema_is_read_as_not_segmented(case, tmp_path):
    """A label map without the edema label and a core mask without --edema read alike: the
    edema as not segmented (None, so S.3's terms leave the infiltration free rather than
    reading "whole tumour = core"), the same core and whole tumour, and the report's note
    (NO_EDEMA_NOTE) saying κ is not fixed by such data; with the edema, no note."""
    from GBMMassEffectLib.calibrate import NO_EDEMA_NOTE, read_patient

    tumor_img = sitk.ReadImage(str(case["tumor"]))
    t = sitk.GetArrayFromImage(tumor_img)
    assert (t == 2).any()
    _write(np.where(t == 2, 0, t).astype(np.uint8), tmp_path / "no_edema.nrrd", like=tumor_img)
    _write(np.isin(t, (1, 4)).astype(np.uint8), tmp_path / "core.nrrd", like=tumor_img)
    base = {"tissue_labels": str(case["tissue"]), "atlas_set": [str(case["atlases"][0])], "grid": 32,
            "out": str(tmp_path / "out"), "options": CHEAP}
    full = read_patient(CalibrateJob.from_dict({"tumor_labels": str(case["tumor"]), **base}))
    labels = read_patient(CalibrateJob.from_dict({"tumor_labels": str(tmp_path / "no_edema.nrrd"), **base}))
    mask = read_patient(CalibrateJob.from_dict({"tumor_core": str(tmp_path / "core.nrrd"), **base}))
    assert full.edema is not None and full.edema.any() and NO_EDEMA_NOTE not in full.notes
    for p in (labels, mask):
        assert p.edema is None and NO_EDEMA_NOTE in p.notes
        assert np.array_equal(p.core, full.core)
        assert p.whole[p.core > 0.5].all()
    assert np.array_equal(labels.whole, mask.whole)


def test_brats_label_3_is_tumour_core(case, tmp_path):
    """BraTS label 3 is tumour core in both BraTS conventions (non-enhancing core in
    2012-2016, enhancing tumour from 2023: 1 NCR, 2 ED, 3 ET): a BraTS-2023 map reads as
    the same core and whole tumour as its 1/2/4 twin, with a note saying so; where a job
    gives 3 another meaning (a tissue value) the map's 3 is that, not core."""
    from GBMMassEffectLib.calibrate import read_patient

    tumor_img = sitk.ReadImage(str(case["tumor"]))
    t = sitk.GetArrayFromImage(tumor_img)
    t23 = np.where(t == 4, 3, t).astype(np.uint8)
    _write(t23, tmp_path / "brats2023.nrrd", like=tumor_img)
    base = {"tissue_labels": str(case["tissue"]), "atlas_set": [str(case["atlases"][0])], "grid": 32,
            "out": str(tmp_path / "out"), "options": CHEAP}
    p4 = read_patient(CalibrateJob.from_dict({"tumor_labels": str(case["tumor"]), **base}))
    p3 = read_patient(CalibrateJob.from_dict({"tumor_labels": str(tmp_path / "brats2023.nrrd"), **base}))
    assert (t == 4).sum() > 0 and np.array_equal(p3.core, p4.core) and np.array_equal(p3.whole, p4.whole)
    assert np.array_equal(p3.edema, p4.edema)
    assert p4.notes == () and len(p3.notes) == 1 and "label 3 read as tumour core" in p3.notes[0]
    # the tissue map may carry label 3 under the tumour too (tumour labels on top)
    both = sitk.GetArrayFromImage(sitk.ReadImage(str(case["tissue"])))
    both[t23 > 0] = t23[t23 > 0]
    _write(both, tmp_path / "both.nrrd", like=tumor_img)
    pb = read_patient(CalibrateJob.from_dict({**base, "tumor_labels": str(tmp_path / "brats2023.nrrd"),
                                              "tissue_labels": str(tmp_path / "both.nrrd")}))
    assert (pb.whole >= p4.whole).all() and pb.whole[t23 == 3].all()
    # a job that makes 3 a tissue value (gray matter): the tumour map's 3 is no longer core
    job = CalibrateJob.from_dict({**base, "tumor_labels": str(tmp_path / "brats2023.nrrd"),
                                  "tissue_label_values": {"gm": 3, "wm": 6, "vt": 7, "csf": 8}})
    with pytest.raises(io.ImageIOError, match=r"tissue label map .* unknown label value\(s\) 5"):
        read_patient(job)  # (the case's tissue map still says 5 for gray matter)
    from GBMMassEffectLib.calibrate import _core_values
    assert _core_values(job) == [1, 4]


def _gaussian_image(origin, spacing: float, size: int, centre_mm, sigma_mm: float) -> sitk.Image:
    """A Gaussian concentration (peak 1) on a size³ image of the given origin and spacing."""
    ijk = np.indices((size,) * 3)[::-1].reshape(3, -1).astype(float)
    pts = np.asarray(origin, float)[:, None] + spacing * ijk
    c = np.exp(-((pts - np.asarray(centre_mm, float)[:, None]) ** 2).sum(0) / (2 * sigma_mm**2)).reshape((size,) * 3)
    img = sitk.GetImageFromArray(c.astype(np.float32))
    img.SetSpacing((spacing,) * 3)
    img.SetOrigin(tuple(float(v) for v in origin))
    return img


def _index_variance(a) -> np.ndarray:
    """Per-axis variance (voxel²) of a non-negative array read as a distribution."""
    idx = np.indices(a.shape).reshape(3, -1).astype(float)
    w = a.ravel() / a.sum()
    return ((idx - (idx @ w)[:, None]) ** 2) @ w


def test_concentration_is_sampled_at_the_box_nodes_not_averaged():
    """calibrate.concentration_to_box: a tumour concentration on a finer image enters the box
    as point values (the model's grid values are), so a peak one box voxel wide keeps its
    width; the voxel mean (how fractions enter) widens it by h²/12 per axis, which S.3
    read as diffusion (κ 103% over on P1 of ACCURACY.md with the true c0 and atlas)."""
    from GBMMassEffectLib.calibrate import concentration_to_box
    from GBMMassEffectLib.geometry import BoxGeometry

    geom = BoxGeometry(32, 256.0, (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    centre_mm = geom.index_to_physical([16.3, 15.6, 16.45])
    img = _gaussian_image(centre_mm - (96 - 1) / 2 + 0.31, 1.0, 96, centre_mm, geom.spacing)  # σ one box voxel
    sampled = concentration_to_box(img, geom)
    averaged = geom.to_box(img, "fraction", dtype=np.float64)
    assert sampled.dtype == np.float32 and sampled.shape == geom.shape
    assert np.abs(_index_variance(sampled.astype(float)) - 1.0).max() < 0.01  # σ² = 1 voxel²
    assert _index_variance(averaged).min() > 1.0 + 1 / 12 - 0.02  # the bias the sampling avoids
    # through a registration (identity here) the same samples
    reg = types.SimpleNamespace(forward=sitk.Transform(), inverse=sitk.Transform())
    np.testing.assert_allclose(concentration_to_box(img, geom, reg), sampled, atol=1e-6)


def test_concentration_at_the_box_resolution_keeps_its_width_half_a_voxel_off():
    """A concentration given at the box's own resolution (another solver's 64³ patient at
    4 mm) whose voxels sit half a box voxel off the box nodes: sampled by linear
    interpolation each value would be the mean of two neighbours per axis (+¼ voxel² of
    variance per axis, read by S.3 as diffusion); calibrate's cubic B-splines keep the width,
    and the values stay in [0, 1]."""
    from GBMMassEffectLib.calibrate import concentration_to_box
    from GBMMassEffectLib.geometry import BoxGeometry

    geom = BoxGeometry(32, 256.0, (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    origin = geom.index_to_physical([0.5, 0.5, 0.5])  # image voxels halfway between box nodes
    img = _gaussian_image(origin, geom.spacing, 32, geom.index_to_physical([16.0, 15.0, 16.5]), 1.5 * geom.spacing)
    sampled = concentration_to_box(img, geom).astype(float)
    linear = geom.to_box(img, "linear", dtype=np.float64)
    assert np.abs(_index_variance(sampled) - 1.5**2).max() < 0.03
    assert _index_variance(linear).min() > 1.5**2 + 0.2  # the widening the cubic sampling avoids
    assert sampled.min() >= 0.0 and sampled.max() <= 1.0
