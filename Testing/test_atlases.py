"""Atlas sets: the bundled default set, manifest validation, MODEL §6 atlas choice."""
from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from GBMMassEffectLib import atlases as A  # noqa: E402
from GBMMassEffectLib.resources import default_atlas_dir  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
BUNDLED = REPO / "Resources" / "Atlases"


# ---------------------------------------------------------------- helpers
def write_labels(path, array, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(np.asarray(array))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path), True)
    return path


def toy_labels(n_vent=8):
    """A 10x12x14 label map with n_vent (multiple of 4) ventricle voxels."""
    a = np.zeros((10, 12, 14), np.uint8)
    a[1:-1, 1:-1, 1:-1] = A.CSF
    a[2:-2, 2:-2, 2:-2] = A.GM
    a[3:-3, 3:-3, 3:-3] = A.WM
    a[4:6, 4:6, 4:4 + n_vent // 4] = A.VT
    return a


def toy_set(tmp_path, entries):
    (tmp_path / "atlases.json").write_text(json.dumps({"atlases": entries}))
    return tmp_path


def toy_atlas(name, vt_ml):
    return A.Atlas(name=name, labels_path=pathlib.Path(f"{name}.nrrd"), ventricle_ml=vt_ml,
                   brain_ml=1400.0, voxel_mm=(1.5, 1.5, 1.5))


@pytest.fixture(scope="module")
def bundled():
    return A.load_atlas_set()


# ---------------------------------------------------------------- bundled set
def test_default_dir_is_repo_resources():
    assert default_atlas_dir() == BUNDLED
    assert (BUNDLED / "atlases.json").is_file()
    assert A.load_atlas_set("bundled").root == BUNDLED


def test_bundled_set_loads_with_provenance(bundled):
    assert len(bundled) >= 8
    assert len(set(bundled.names)) == len(bundled)
    sources = {a.source for a in bundled}
    assert {"mni152", "sri24"} <= sources
    real = [a for a in bundled if not a.synthetic]
    synth = [a for a in bundled if a.synthetic]
    assert len(real) >= 2 and len(synth) >= 5
    for a in bundled:
        assert len(a.provenance) > 80, a.name
        assert a.licence in bundled.licences, a.name
        assert a.t1_path is not None and a.t1_path.is_file()
        assert np.allclose(a.voxel_mm, 1.5)
    for a in synth:
        assert isinstance(a.seed, int) and "SYNTHETIC" in a.provenance
        assert a.extra["deformation"]["min_jacobian"] > 0


def test_bundled_licences(bundled):
    lic = bundled.licences
    assert "McGill University" in lic["MNI-McGill"]["notice"]
    assert "CC BY-SA 3.0" in lic["CC-BY-SA-3.0"]["notice"]
    assert "Rohlfing" in lic["CC-BY-SA-3.0"]["citation"]
    for a in bundled:
        want = "CC-BY-SA-3.0" if a.source == "sri24" else "MNI-McGill"
        assert a.licence == want, a.name
    for entry in lic.values():
        assert (BUNDLED / entry["file"]).is_file()
    assert (BUNDLED / "README.md").is_file()


def test_bundled_labels_and_t1_valid(bundled):
    for a in bundled:
        lab = a.label_array()
        assert set(np.unique(lab).tolist()) == {0, 5, 6, 7, 8}, a.name
        vox = np.prod(a.voxel_mm) / 1000
        assert abs((lab == 7).sum() * vox - a.ventricle_ml) < 1e-6
        t1 = sitk.GetArrayFromImage(a.read_t1())
        assert t1.shape == lab.shape and t1.dtype == np.uint8
        # white matter brighter than grey matter brighter than CSF on a T1
        wm, gm, csf = (np.median(t1[lab == v]) for v in (6, 5, 8))
        assert wm > gm > csf, a.name
        assert 150 < wm < 230, a.name


def test_bundled_volumes_plausible_and_spread(bundled):
    vt = np.array([a.ventricle_ml for a in bundled])
    brain = np.array([a.brain_ml for a in bundled])
    assert np.all((vt > 7) & (vt < 55)), vt
    assert vt.max() / vt.min() > 4.0
    assert np.all((brain > 1100) & (brain < 2300)), brain
    # MNI152 2009a lateral ventricles are about 15-30 mL
    assert 15 < bundled["mni152"].ventricle_ml < 30
    # patients with 10-38 mL ventricles find about 3-4 atlases in the primary window
    patients = np.geomspace(10.0, 38.0, 15)
    counts = [sum(1.0 <= v / p <= 1.3 for v in vt) for p in patients]
    assert min(counts) >= 2 and np.mean(counts) >= 3, counts
    for p in patients:
        sel = A.select_atlases(bundled, float(p))
        assert 4 <= len(sel) <= 8
        assert all(1.0 <= c.ratio <= 1.5 for c in sel) or sel.rule == "widened+nearest"


def test_bundled_size_limit():
    total = sum(p.stat().st_size for p in BUNDLED.rglob("*") if p.is_file())
    assert total <= 20 * 2**20, total


# ---------------------------------------------------------------- atlas choice
def test_select_primary_window():
    atl = [toy_atlas(f"a{v}", v) for v in (19, 20, 22, 24, 26, 27, 30, 40)]
    sel = A.select_atlases(atl, 20.0)
    assert sel.rule == "window"
    assert [a.name for a in sel.atlases] == ["a20", "a22", "a24", "a26"]
    assert all(1.0 <= c.ratio <= 1.3 for c in sel)
    assert "within [1, 1.3]" in sel.choices[0].reason


def test_select_widens_to_1_5():
    atl = [toy_atlas(f"a{v}", v) for v in (20.5, 25, 28, 29, 35, 10)]
    sel = A.select_atlases(atl, 20.0)
    assert sel.rule == "widened"
    assert sorted(a.ventricle_ml for a in sel.atlases) == [20.5, 25, 28, 29]
    reasons = {c.atlas.name: c.reason for c in sel}
    assert "widened" in reasons["a28"] and "within [1, 1.3]" in reasons["a25"]


def test_select_widens_then_adds_nearest():
    atl = [toy_atlas(f"a{v}", v) for v in (21, 29, 40, 18, 12, 50)]
    sel = A.select_atlases(atl, 20.0)
    assert sel.rule == "widened+nearest"
    # 21, 29 qualify; nearest in |ln ratio|: 18 (0.105), then 12 (0.51) before 40 (0.69)
    assert [a.ventricle_ml for a in sel.atlases] == [21, 18, 29, 12]
    assert "nearest" in {c.atlas.name: c.reason for c in sel}["a12"]


def test_select_cap_of_eight():
    atl = [toy_atlas(f"a{i:02d}", 20.0 + 0.5 * i) for i in range(12)]  # all in window
    sel = A.select_atlases(atl, 20.0)
    assert len(sel) == 8 and len(sel.excluded) == 4
    assert [a.ventricle_ml for a in sel.atlases] == [20.0 + 0.5 * i for i in range(8)]
    assert "cap of 8" in sel.excluded[0].reason
    assert len(A.select_atlases(atl, 20.0, max_atlases=3)) == 3


def test_select_by_match_centres_the_window_on_the_best_match():
    atl = [toy_atlas(f"a{v}", v) for v in (12, 20, 22, 30, 40)]
    match = {"a12": 0.70, "a20": 0.80, "a22": 0.75, "a30": 0.78, "a40": 0.79}
    sel = A.select_atlases_by_match(atl, match, n_atlases=2)
    # best match a20; a40 (x2.0) and a30 (x1.5) match better than a22 but lie outside
    # [1/1.3, 1.3] of its 20 mL
    assert [a.name for a in sel.atlases] == ["a20", "a22"] and sel.rule == "registration match"
    assert sel.patient_ventricle_ml == 20 and sel.choices[1].ratio == pytest.approx(1.1)
    assert "best anatomical match" in sel.choices[0].reason and "0.800" in sel.choices[0].reason
    sel4 = A.select_atlases_by_match(atl, match, n_atlases=4)
    # a22 (x1.1) joins inside the window; then the nearest in volume: a30 (x1.5) before a12 (x0.6)
    assert [a.name for a in sel4.atlases] == ["a20", "a22", "a30", "a12"]
    assert "nearest remaining" in sel4.choices[3].reason
    assert {c.atlas.name for c in sel4.excluded} == {"a40"}
    # atlases without a score are not chosen; ties broken by name
    sel1 = A.select_atlases_by_match(atl, {"a30": 0.5, "a22": 0.5}, n_atlases=4)
    assert [a.name for a in sel1.atlases] == ["a22", "a30"]
    for bad in ({"a20": math.nan}, {"a20": "0.5"}, {"a20": True}):
        with pytest.raises(ValueError, match="atlas 'a20'"):
            A.select_atlases_by_match(atl, bad)
    with pytest.raises(A.AtlasError, match="no atlas"):
        A.select_atlases_by_match(atl, {"zz": 0.9})
    assert len(A.select_atlases_by_match(atl, match, n_atlases=9)) == 5  # all there are
    for n in (0, True, 2.5):
        with pytest.raises(ValueError, match="n_atlases"):
            A.select_atlases_by_match(atl, match, n_atlases=n)


def test_select_too_few_atlases_and_bad_input():
    atl = [toy_atlas("x", 30.0), toy_atlas("y", 5.0)]
    sel = A.select_atlases(atl, 20.0)
    assert len(sel) == 2 and sel.rule == "widened+nearest"
    for bad in (0.0, -3.0, math.nan, "20"):
        with pytest.raises(ValueError, match="ventricle volume"):
            A.select_atlases(atl, bad)
    with pytest.raises(ValueError, match="empty"):
        A.select_atlases([], 20.0)


# ---------------------------------------------------------------- validation
def test_missing_manifest_and_bad_json(tmp_path):
    with pytest.raises(A.AtlasError, match="no atlases.json"):
        A.load_atlas_set(tmp_path)
    (tmp_path / "atlases.json").write_text("{ not json")
    with pytest.raises(A.AtlasError, match="not valid JSON"):
        A.load_atlas_set(tmp_path)
    (tmp_path / "atlases.json").write_text(json.dumps({"atlases": []}))
    with pytest.raises(A.AtlasError, match="empty"):
        A.load_atlas_set(tmp_path)


def test_missing_label_file_names_atlas(tmp_path):
    toy_set(tmp_path, [{"name": "ghost", "labels": "ghost_labels.nrrd"}])
    with pytest.raises(A.AtlasError, match=r"'ghost'.*not found"):
        A.load_atlas_set(tmp_path)


def test_labels_outside_numbering(tmp_path):
    a = toy_labels()
    a[0, 0, 0] = 3
    write_labels(tmp_path / "bad_labels.nrrd", a)
    toy_set(tmp_path, [{"name": "bad", "labels": "bad_labels.nrrd"}])
    with pytest.raises(A.AtlasError, match=r"'bad'.*labels 3 outside"):
        A.load_atlas_set(tmp_path)


def test_no_ventricles(tmp_path):
    a = toy_labels()
    a[a == A.VT] = A.WM
    write_labels(tmp_path / "nv_labels.nrrd", a)
    toy_set(tmp_path, [{"name": "nv", "labels": "nv_labels.nrrd"}])
    with pytest.raises(A.AtlasError, match=r"'nv'.*no ventricles"):
        A.load_atlas_set(tmp_path)


def test_not_3d(tmp_path):
    img = sitk.GetImageFromArray(np.full((5, 6), A.VT, np.uint8))
    sitk.WriteImage(img, str(tmp_path / "flat_labels.nrrd"))
    toy_set(tmp_path, [{"name": "flat", "labels": "flat_labels.nrrd"}])
    with pytest.raises(A.AtlasError, match=r"'flat'.*2-D"):
        A.load_atlas_set(tmp_path)


def test_t1_geometry_mismatch(tmp_path):
    write_labels(tmp_path / "s_labels.nrrd", toy_labels())
    write_labels(tmp_path / "s_t1.nrrd", np.ones((10, 12, 14), np.uint8), spacing=(1, 1, 1))
    toy_set(tmp_path, [{"name": "s", "labels": "s_labels.nrrd", "t1": "s_t1.nrrd"}])
    with pytest.raises(A.AtlasError, match=r"'s'.*T1.*geometry.*spacing"):
        A.load_atlas_set(tmp_path)


def test_manifest_volume_mismatch(tmp_path):
    write_labels(tmp_path / "s_labels.nrrd", toy_labels())
    toy_set(tmp_path, [{"name": "s", "labels": "s_labels.nrrd", "ventricle_ml": 25.0}])
    with pytest.raises(A.AtlasError, match=r"'s'.*ventricle_ml 25"):
        A.load_atlas_set(tmp_path)


def test_duplicate_names(tmp_path):
    write_labels(tmp_path / "s_labels.nrrd", toy_labels())
    e = {"name": "s", "labels": "s_labels.nrrd"}
    toy_set(tmp_path, [e, e])
    with pytest.raises(A.AtlasError, match="repeated"):
        A.load_atlas_set(tmp_path)


# ---------------------------------------------------------------- label maps directly
def test_single_label_map_is_an_atlas_set(tmp_path):
    p = write_labels(tmp_path / "subject01.nii.gz", toy_labels(n_vent=8))
    aset = A.load_atlas_set(p)
    assert aset.names == ["subject01"] and aset[0].t1_path is None
    assert aset[0].ventricle_ml == pytest.approx(8 * 8 / 1000)  # 8 voxels of 8 mm³
    assert aset[0].licence == "user-supplied"
    maps = aset[0].tissue_maps()
    assert maps["vt"].sum() == 8 and maps["wm"].dtype == np.float32
    q = write_labels(tmp_path / "subject02.nrrd", toy_labels(n_vent=16))
    two = A.load_atlas_set([p, q])
    assert two.names == ["subject01", "subject02"]
    assert two["subject02"].ventricle_ml == pytest.approx(2 * two["subject01"].ventricle_ml)


def test_bundled_label_map_given_directly():
    aset = A.load_atlas_set(BUNDLED / "mni152_labels.nrrd")
    assert aset.names == ["mni152_labels"]
    assert aset[0].ventricle_ml == pytest.approx(A.load_atlas_set()["mni152"].ventricle_ml)


def test_make_manifest_for_user_folder(tmp_path):
    write_labels(tmp_path / "h1_labels.nrrd", toy_labels(8))
    write_labels(tmp_path / "h1_t1.nrrd", np.ones((10, 12, 14), np.uint8))
    write_labels(tmp_path / "h2_labels.nrrd", toy_labels(12))
    A.make_manifest(tmp_path)
    aset = A.load_atlas_set(tmp_path)
    assert aset.names == ["h1", "h2"]
    assert aset["h1"].t1_path == tmp_path / "h1_t1.nrrd" and aset["h2"].t1_path is None
    with pytest.raises(A.AtlasError, match="exists"):
        A.make_manifest(tmp_path)


def test_ventricle_volume_ml_array_and_image():
    a = toy_labels(8)
    assert A.ventricle_volume_ml(a, (1.5, 1.5, 1.5)) == pytest.approx(8 * 3.375 / 1000)
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((2.0, 1.0, 1.0))
    assert A.ventricle_volume_ml(img) == pytest.approx(8 * 2 / 1000)
    with pytest.raises(ValueError, match="spacing"):
        A.ventricle_volume_ml(a)
