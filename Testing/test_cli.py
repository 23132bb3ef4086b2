"""The command line and the process contract (cli.py, simulate.py, presets.py, progress.py;
ARCHITECTURE.md "The process boundary"). Subprocess runs at --grid 32."""
from __future__ import annotations

import functools
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from GBMMassEffectLib import presets
from GBMMassEffectLib import progress as pg
from cli_helpers import assert_one_line_error, cli_env as _env
from cli_helpers import run_cli as _run_cli
from cli_helpers import signal_cli_when
from glia_data import read_nc

REPO = pathlib.Path(__file__).resolve().parents[1]
OUTPUT_IMAGES = ("initial_condition.nrrd", "predicted_tumor.nrrd", "displacement_norm.nrrd",
                 "displacement.nrrd", "labels.nrrd")


run_cli = functools.partial(_run_cli, timeout=120)


def same_geometry(img, ref):
    assert img.GetSize() == ref.GetSize()
    assert np.allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-6)
    assert np.allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    assert np.allclose(img.GetDirection(), ref.GetDirection(), atol=1e-6)


@pytest.fixture(scope="module")
def atlas_files(glia_testdata, tmp_path_factory):
    """atlas.nc as NIfTI label maps with 4 mm voxels: plain, and with a RAS-like flipped
    direction and a shifted origin (written as NRRD)."""
    d = tmp_path_factory.mktemp("atlas")
    a = read_nc(glia_testdata / "atlas.nc")
    lab = np.asarray(a, dtype=np.float32).round().astype(np.uint8)
    img = sitk.GetImageFromArray(lab)
    img.SetSpacing((4.0, 4.0, 4.0))
    sitk.WriteImage(img, str(d / "atlas.nii.gz"))
    flipped = sitk.GetImageFromArray(lab)
    flipped.SetSpacing((4.0, 4.0, 4.0))
    flipped.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    flipped.SetOrigin((120.0, 130.0, -90.0))
    sitk.WriteImage(flipped, str(d / "atlas_flipped.nrrd"))
    seed_ijk = presets.default_seed_ijk(img)
    return {"dir": d, "nifti": d / "atlas.nii.gz", "nrrd": d / "atlas_flipped.nrrd",
            "labels": lab, "seed_ijk": seed_ijk}


def check_outputs(out, ref_path, events):
    ref = sitk.ReadImage(str(ref_path))
    for name in OUTPUT_IMAGES:
        img = sitk.ReadImage(str(out / name))
        same_geometry(img, ref)
    disp = sitk.ReadImage(str(out / "displacement.nrrd"))
    assert disp.GetNumberOfComponentsPerPixel() == 3
    c1 = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "predicted_tumor.nrrd")))
    c0 = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "initial_condition.nrrd")))
    for c in (c0, c1):
        assert c.min() >= 0.0 and c.max() <= 1.0
    assert c0.max() > 0.5 and c1.max() > 0.5
    assert events[-1] == {"event": "result", "path": str(out / "report.json")}
    fr = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fr == sorted(fr) and fr[-1] == 1.0
    assert not [p for p in os.listdir(out) if ".part" in p]  # no temporary files left
    report = json.loads((out / "report.json").read_text())
    for key in ("parameters", "seed", "box", "max_u_mm", "norms", "solver", "timings", "device",
                "versions", "outputs"):
        assert key in report, key
    assert report["solver"]["steps_completed"] == 26
    assert report["box"]["n"] == 32 and report["box"]["spacing_mm"] == 8.0
    # report.json was committed last
    mtimes = {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out)}
    assert max(mtimes, key=mtimes.get) == "report.json" or \
        mtimes["report.json"] == max(mtimes.values())
    return report, c0, c1


def test_simulate_gamma0(atlas_files, tmp_path):
    out = tmp_path / "g0"
    seed = ",".join(f"{v:g}" for v in atlas_files["seed_ijk"])
    proc, events = run_cli("simulate", "--labels", atlas_files["nifti"], "--seed-ijk", seed,
                           "--gamma", "0", "--kappa", "0.025", "--rho", "12", "--grid", "32",
                           "--device", "cpu", "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report, c0, c1 = check_outputs(out, atlas_files["nifti"], events)
    assert report["max_u_mm"] == 0.0 and report["norms"]["u_norm"] == 0.0
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement_norm.nrrd"))).max() == 0.0
    assert report["parameters"]["gamma"] == 0.0
    # the seed voxel holds the peak of c0 (to within the box's 8 mm voxels)
    i, j, k = np.rint(atlas_files["seed_ijk"]).astype(int)
    assert c0[k, j, i] > 0.6
    assert report["seed"]["ijk"] == [float(v) for v in atlas_files["seed_ijk"]]


def test_simulate_c0_max_scales_the_seed(atlas_files):
    """--c0-max sets the seed's peak: c0 is c0_max times the §5 atom (max 1), same place."""
    from GBMMassEffectLib.backend import get_backend
    from GBMMassEffectLib.geometry import box_for_image
    from GBMMassEffectLib.io import read_label_map
    from GBMMassEffectLib.simulate import box_tissues, initial_condition, seed_point
    from GBMMassEffectLib.spectral import SpectralOps

    labels = read_label_map(atlas_files["nifti"])
    geom = box_for_image(labels, 32, 256.0)
    ops = SpectralOps(32, get_backend("cpu", "float64"))
    tissues = box_tissues(geom, labels, ops)
    seed_lps, _ = seed_point(labels, atlas_files["seed_ijk"], None)
    c1, x1 = initial_condition(ops, geom, tissues, seed_lps, 1.0)
    cq, xq = initial_condition(ops, geom, tissues, seed_lps, 1.0, c0_max=1 / 64)
    assert float(c1.max()) == pytest.approx(1.0) and float(cq.max()) == pytest.approx(1 / 64)
    assert np.allclose(cq, c1 / 64, atol=1e-12) and np.allclose(xq, x1)


def test_simulate_gamma_large_in_flipped_geometry(atlas_files, tmp_path):
    """γ 1.2 on an NRRD with a flipped (RAS-like) direction, seed given in RAS mm."""
    ref = sitk.ReadImage(str(atlas_files["nrrd"]))
    lps = ref.TransformContinuousIndexToPhysicalPoint([float(v) for v in atlas_files["seed_ijk"]])
    ras = (-lps[0], -lps[1], lps[2])
    out = tmp_path / "g12"
    proc, events = run_cli("simulate", "--labels", atlas_files["nrrd"],
                           "--seed-ras", ",".join(f"{v:.6f}" for v in ras), "--gamma", "1.2",
                           "--rho", "10", "--grid", "32", "--device", "cpu", "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report, c0, c1 = check_outputs(out, atlas_files["nrrd"], events)
    assert np.allclose(report["seed"]["ijk"], atlas_files["seed_ijk"], atol=1e-6)
    assert report["max_u_mm"] > 8.0  # clearly non-zero: more than one 8 mm box voxel
    unorm = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement_norm.nrrd")))
    disp = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nrrd")))
    assert np.allclose(np.sqrt((disp.astype(np.float64) ** 2).sum(-1)), unorm, rtol=1e-5, atol=1e-4)
    assert 0.8 * report["max_u_mm"] < unorm.max() <= report["max_u_mm"] * 1.001
    assert report["max_u_mm"] == pytest.approx(report["max_u_domain"] * 256 / (2 * np.pi))
    # the tissue is pushed away from the tumor: the displacement at a voxel a few voxels
    # beside the seed points away from it (LPS mm)
    i, j, k = np.rint(atlas_files["seed_ijk"]).astype(int)
    p_seed = np.array(lps)
    p_off = np.array(ref.TransformIndexToPhysicalPoint((int(i), int(j), int(k + 5))))
    assert np.dot(disp[k + 5, j, i], p_off - p_seed) > 0
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nrrd")))
    assert set(np.unique(labels).tolist()) <= {0, 1, 5, 6, 7, 8}
    assert (labels == 1).sum() > 10
    assert report["solver"]["total_elasticity_iterations"] > 0


def test_preset_writes_synthetic_patient(atlas_files, tmp_path):
    out = tmp_path / "tcb"
    proc, events = run_cli("simulate", "--labels", atlas_files["nifti"], "--preset", "tc-b",
                           "--grid", "32", "--device", "cpu", "--seed", "3", "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report, c0, c1 = check_outputs(out, atlas_files["nifti"], events)
    ref = sitk.ReadImage(str(atlas_files["nifti"]))
    for name in ("patient_labels.nrrd", "tumor_labels.nrrd", "t1.nrrd", "tumor_concentration.nrrd"):
        same_geometry(sitk.ReadImage(str(out / name)), ref)
    truth = json.loads((out / "ground_truth.json").read_text())
    assert (truth["kappa"], truth["rho"], truth["gamma"]) == (0.025, 12.0, 0.4)
    assert truth["max_u_mm"] == report["max_u_mm"] > 0
    # the seed drawn with --seed 3 lies in white matter
    i, j, k = np.rint(truth["seed"]["ijk"]).astype(int)
    assert atlas_files["labels"][k, j, i] == 6
    pl = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "patient_labels.nrrd")))
    assert set(np.unique(pl).tolist()) <= {0, 1, 2, 4, 5, 6, 7, 8}
    for label in (1, 2, 4):
        assert (pl == label).sum() > 0, label
    tl = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "tumor_labels.nrrd")))
    assert set(np.unique(tl).tolist()) == {0, 1, 2, 4}
    # the patient's tissue is the input anatomy moved at the input's resolution, not the
    # argmax of the 8 mm box (labels.nrrd): where the tissue barely moved it is the input's
    un = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement_norm.nrrd")))
    healthy = atlas_files["labels"]
    still = (un < 0.5) & (tl == 0) & (healthy > 0)  # moved < 1/8 of the input's 4 mm voxel
    assert still.sum() > 1000
    assert np.array_equal(pl[still], healthy[still])
    box = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nrrd")))
    assert (box[still] != healthy[still]).mean() > 0.25  # (the box argmax is not)
    assert (pl == 7).sum() > (box == 7).sum()  # and it keeps the thin ventricles
    assert np.array_equal(pl[tl > 0], tl[tl > 0])
    assert truth["brats_label_voxels"]["edema"] == int((tl == 2).sum())
    # BraTS thresholds on c(1)
    c = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "tumor_concentration.nrrd")))
    assert (c[pl == 1] > 0.8).all() and ((c[pl == 4] > 0.4) & (c[pl == 4] <= 0.8)).all()
    assert ((c[pl == 2] > 0.02) & (c[pl == 2] <= 0.4)).all()
    t1 = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "t1.nrrd")))
    wm = t1[pl == 6].mean()
    assert wm > t1[pl == 5].mean() > t1[pl == 8].mean() > t1[atlas_files["labels"] == 0].mean()


def test_preset_default_seed_is_deterministic(atlas_files):
    img = sitk.ReadImage(str(atlas_files["nifti"]))
    a = presets.default_seed_ijk(img)
    assert np.array_equal(a, presets.default_seed_ijk(img))
    i, j, k = a.astype(int)
    assert atlas_files["labels"][k, j, i] == 6
    b = presets.default_seed_ijk(img, np.random.default_rng(1))
    c = presets.default_seed_ijk(img, np.random.default_rng(1))
    assert np.array_equal(b, c)


def _nan_image(path):
    a = np.zeros((20, 20, 20), np.float32)
    a[5:15, 5:15, 5:15] = 6
    a[10, 10, 10] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(a), str(path))


def test_bad_inputs_give_one_json_error(atlas_files, tmp_path):
    out = tmp_path / "bad"
    common = ("--grid", "32", "--device", "cpu", "--out", out)
    seed = ",".join(f"{v:g}" for v in atlas_files["seed_ijk"])
    proc, ev = run_cli("simulate", "--labels", tmp_path / "nope.nii.gz", "--seed-ijk", seed, *common)
    assert_one_line_error(proc, ev, 2, "not found")
    bad = atlas_files["labels"].copy()
    bad[30, 30, 30] = 3
    sitk.WriteImage(sitk.GetImageFromArray(bad), str(tmp_path / "bad.nii.gz"))
    proc, ev = run_cli("simulate", "--labels", tmp_path / "bad.nii.gz", "--seed-ijk", seed, *common)
    assert_one_line_error(proc, ev, 2, "unknown label value(s) 3")
    proc, ev = run_cli("simulate", "--labels", atlas_files["nifti"], "--seed-ijk", "1,1,1", *common)
    assert_one_line_error(proc, ev, 2, "outside the brain")
    proc, ev = run_cli("simulate", "--labels", atlas_files["nifti"], "--seed-ijk", "99,1,1", *common)
    assert_one_line_error(proc, ev, 2, "outside the image")
    proc, ev = run_cli("simulate", "--labels", atlas_files["nifti"], "--seed-ras", "-500,-1.5,-2", *common)
    assert_one_line_error(proc, ev, 2, "RAS -500.0, -1.5, -2.0 mm) is outside the image")
    _nan_image(tmp_path / "nan.nii.gz")
    proc, ev = run_cli("simulate", "--labels", tmp_path / "nan.nii.gz", "--seed-ijk", "10,10,10", *common)
    assert_one_line_error(proc, ev, 2, "NaN")
    proc, ev = run_cli("simulate", "--labels", atlas_files["nifti"], "--seed-ijk", seed,
                       "--box-mm", "150", *common)
    assert_one_line_error(proc, ev, 2, "touches the domain edge")
    proc, ev = run_cli("simulate", "--labels", atlas_files["nifti"], "--seed-ijk", seed, "--grid", "33",
                       "--out", out)
    assert_one_line_error(proc, ev, 2, "even integer")
    proc, ev = run_cli("simulate", "--labels", atlas_files["nifti"], "--seed-ijk", seed, "--c0-max", "1.5", *common)
    assert_one_line_error(proc, ev, 2, "--c0-max must be a number in (0, 1]")
    proc, ev = run_cli("simulate", "--seed-ijk", seed, "--out", out)
    assert_one_line_error(proc, ev, 2, "--labels")
    proc, ev = run_cli("simulate", "--labels", atlas_files["nifti"], "--seed-ijk", "1,2", "--out", out)
    assert_one_line_error(proc, ev, 2, "three")
    assert not out.exists() or not os.listdir(out)
    # calibrate without a job.json, a cohort without job folders: bad input, no Dask started
    proc, ev = run_cli("calibrate", "--job", tmp_path)
    assert_one_line_error(proc, ev, 2, "no job.json")
    proc, ev = run_cli("cohort", "--jobs", tmp_path / "nowhere")
    assert_one_line_error(proc, ev, 2, "does not exist")
    proc, ev = run_cli("cohort", "--jobs", tmp_path, "--out", tmp_path / "co")
    assert_one_line_error(proc, ev, 2, "no job.json and no sub-folder with one")
    (tmp_path / "badjob").mkdir()
    (tmp_path / "badjob" / "job.json").write_text("[]")
    proc, ev = run_cli("cohort", "--jobs", tmp_path / "badjob", "--out", tmp_path / "co")
    assert_one_line_error(proc, ev, 2, "no valid job: badjob: job.json must hold a JSON object")
    assert not (tmp_path / "co").exists()


def test_sigterm_stops_and_leaves_nothing(atlas_files, tmp_path):
    out = tmp_path / "cancel"
    seed = ",".join(f"{v:g}" for v in atlas_files["seed_ijk"])
    proc, lines, elapsed, err, _ = signal_cli_when(
        ["simulate", "--labels", atlas_files["nifti"], "--seed-ijk", seed, "--gamma", "1.2", "--grid", "32",
         "--nt", "400", "--dt", "0.0025", "--device", "cpu", "--out", out],
        lambda e: e.get("stage") == "forward", timeout=10)
    assert proc.returncode == pg.EXIT_CANCELLED
    # the forward polls cancel() every step; the watchdog forces a stop 3 s after the signal
    assert elapsed < 6.0, lines[-1]
    assert lines[-1]["event"] == "error" and lines[-1].get("cancelled") is True
    assert not any(e["event"] == "result" for e in lines)
    assert "Traceback" not in err
    assert os.listdir(out) == []


# ---- progress.py ------------------------------------------------------------------------------
def test_emit_json_lines(capsys):
    pg.progress("S.3", 1.7, "x\ny", atlas=2, value=np.float32(0.5), bad=float("nan"))
    pg.error("two\nlines")
    pg.result(pathlib.Path("/a/b.json"))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    e = [json.loads(x) for x in lines]
    assert e[0] == {"event": "progress", "stage": "S.3", "fraction": 1.0, "message": "x\ny",
                    "atlas": 2, "value": 0.5, "bad": None}
    assert e[1] == {"event": "error", "message": "two lines"}
    assert e[2] == {"event": "result", "path": "/a/b.json"}


def test_output_set_atomic_and_rollback(tmp_path):
    outs = pg.OutputSet(tmp_path / "o")
    seen = {}

    def writer(tmp):
        seen["tmp"] = tmp
        assert tmp.endswith(".nrrd") and os.path.dirname(tmp) == str(tmp_path / "o")
        assert not (tmp_path / "o" / "a.nrrd").exists()  # not visible before the rename
        sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkUInt8), tmp)

    outs.write(tmp_path / "o" / "a.nrrd", writer)
    outs.write_json(tmp_path / "o" / "r.json", {"x": np.int64(3)})
    assert json.loads((tmp_path / "o" / "r.json").read_text()) == {"x": 3}
    assert sorted(os.listdir(tmp_path / "o")) == ["a.nrrd", "r.json"]
    assert not os.path.exists(seen["tmp"])

    def failing(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        outs.write(tmp_path / "o" / "b.nrrd", failing)
    assert sorted(os.listdir(tmp_path / "o")) == ["a.nrrd", "r.json"]
    outs.rollback()
    assert os.listdir(tmp_path / "o") == []


def test_watchdog_ends_a_process_that_never_polls(tmp_path):
    code = (
        "import time, pathlib\n"
        "from GBMMassEffectLib import progress as pg\n"
        f"o = pg.OutputSet({str(tmp_path)!r})\n"
        f"o.write_text({str(tmp_path / 'a.txt')!r}, 'x')\n"
        "pg.install_signal_handlers(outputs=lambda: o, grace_s=0.5)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=_env(), cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert (tmp_path / "a.txt").exists()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == pg.EXIT_CANCELLED
    assert json.loads(rest.splitlines()[-1])["event"] == "error"
    assert os.listdir(tmp_path) == []


def test_cancel_token():
    tok = pg.CancelToken()
    assert tok() is False
    tok.check()
    tok.set(signal.SIGTERM)
    assert tok() is True and tok.exit_code == 143
    with pytest.raises(pg.Cancelled):
        tok.check()
    with pytest.raises(pg.Cancelled):
        pg.check_cancel(tok)
