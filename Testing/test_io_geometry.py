"""Images in and out, and the box ↔ image geometry (io.py, geometry.py; MODEL.md §2)."""
from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from GBMMassEffectLib import io
from GBMMassEffectLib.geometry import (
    BoxGeometry,
    GeometryError,
    anchored_box,
    box_for_image,
    nearest_axes,
    orthonormal_direction,
)
from glia_data import read_nc


# ---- helpers ------------------------------------------------------------------------------
def rotation(axis, angle_deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = math.radians(angle_deg)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * K + (1 - math.cos(a)) * K @ K


DIRECTIONS = {
    "identity": np.eye(3),
    "oblique": rotation((1, 2, 3), 23.0),
    "left_handed": rotation((1, -1, 2), 17.0) @ np.diag([1.0, -1.0, 1.0]),
    "ras_like": np.diag([-1.0, -1.0, 1.0]),
}


def atlas_nifti(glia_testdata, tmp_path, name="atlas.nii.gz"):
    """atlas.nc (64³, labels 0/5/6/7/8) as a NIfTI label map with 4 mm voxels."""
    a = read_nc(glia_testdata / "atlas.nc")
    img = sitk.GetImageFromArray(np.asarray(a, dtype=np.float32).round().astype(np.uint8))
    img.SetSpacing((4.0, 4.0, 4.0))
    path = tmp_path / name
    sitk.WriteImage(img, str(path))
    return path


def label_image(size_ijk, spacing, direction, origin=(10.0, -20.0, 5.0), seed=0, margin=2):
    """Random per-voxel labels from {0, 5, 6, 7, 8} with a background frame."""
    rng = np.random.default_rng(seed)
    shape = tuple(reversed(size_ijk))
    a = np.zeros(shape, np.uint8)
    inner = tuple(slice(margin, s - margin) for s in shape)
    a[inner] = rng.choice(np.array([0, 5, 6, 7, 8], np.uint8), size=a[inner].shape)
    return io.make_image(a, spacing, origin, direction)


def write_nifti_ras(path, data_kji, affine_ras):
    """Minimal NIfTI-1 writer (independent of ITK): uint8 data, sform_code 1 with the given
    4×4 voxel→RAS affine, qform_code 0."""
    data = np.ascontiguousarray(data_kji, dtype=np.uint8)
    nk, nj, ni = data.shape
    hdr = bytearray(352)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, 3, ni, nj, nk, 1, 1, 1, 1)
    struct.pack_into("<hh", hdr, 70, 2, 8)  # datatype uint8, bitpix
    sp = np.linalg.norm(affine_ras[:3, :3], axis=0)
    struct.pack_into("<8f", hdr, 76, 1.0, *sp, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<f", hdr, 108, 352.0)
    struct.pack_into("<f", hdr, 112, 1.0)  # scl_slope
    struct.pack_into("<B", hdr, 123, 2)  # mm
    struct.pack_into("<hh", hdr, 252, 0, 1)  # qform_code 0, sform_code 1
    for r in range(3):
        struct.pack_into("<4f", hdr, 280 + 16 * r, *affine_ras[r])
    hdr[344:348] = b"n+1\x00"
    with open(path, "wb") as f:
        f.write(bytes(hdr))
        f.write(data.tobytes())


def write_nrrd(path, data_kji, space, directions, origin):
    """Minimal NRRD writer: 'space: <space>' with space directions (columns per axis)."""
    data = np.ascontiguousarray(data_kji, dtype=np.uint8)
    nk, nj, ni = data.shape
    dirs = " ".join("(" + ",".join(f"{v:.17g}" for v in col) + ")" for col in directions)
    head = (
        "NRRD0004\ntype: uint8\ndimension: 3\n"
        f"space: {space}\nsizes: {ni} {nj} {nk}\nspace directions: {dirs}\n"
        "kinds: domain domain domain\nencoding: raw\n"
        f"space origin: ({','.join(f'{v:.17g}' for v in origin)})\n\n"
    )
    with open(path, "wb") as f:
        f.write(head.encode())
        f.write(data.tobytes())


# ---- reading errors ---------------------------------------------------------------------
def test_read_errors_are_one_line(tmp_path):
    with pytest.raises(io.ImageIOError, match="not found") as e:
        io.read_image(tmp_path / "missing.nii.gz", "labels")
    assert "\n" not in str(e.value)
    junk = tmp_path / "junk.nrrd"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(io.ImageIOError, match="cannot read") as e:
        io.read_image(junk)
    assert "\n" not in str(e.value)
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkUInt8), str(flat))
    with pytest.raises(io.ImageIOError, match="3-D"):
        io.read_image(flat)
    a = np.ones((6, 7, 8), np.float32)
    a[2, 3, 4] = np.nan
    nan = tmp_path / "nan.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(a), str(nan))
    with pytest.raises(io.ImageIOError, match="1 NaN"):
        io.read_image(nan)


def test_label_checks(tmp_path):
    a = np.zeros((6, 7, 8), np.float32)
    a[2:4, 2:4, 2:4] = 6
    a[3, 3, 3] = 3
    p = tmp_path / "bad.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(a), str(p))
    with pytest.raises(io.ImageIOError, match=r"unknown label value\(s\) 3"):
        io.read_label_map(p)
    a[3, 3, 3] = 5.5
    sitk.WriteImage(sitk.GetImageFromArray(a), str(p))
    with pytest.raises(io.ImageIOError, match="non-integer"):
        io.read_label_map(p)
    a[3, 3, 3] = 5
    sitk.WriteImage(sitk.GetImageFromArray(a), str(p))
    img = io.read_label_map(p)
    assert img.GetPixelID() == sitk.sitkUInt8
    assert sorted(np.unique(io.array(img)).tolist()) == [0, 5, 6]
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 7, 8), np.uint8)), str(p))
    with pytest.raises(io.ImageIOError, match="empty"):
        io.read_label_map(p)


# ---- geometry of the box ------------------------------------------------------------------
def test_orthonormal_direction_keeps_handedness():
    D = DIRECTIONS["left_handed"] + 1e-5 * np.arange(9).reshape(3, 3)
    Q = orthonormal_direction(D)
    assert np.allclose(Q.T @ Q, np.eye(3), atol=1e-12)
    assert np.linalg.det(Q) == pytest.approx(-1.0)
    assert np.abs(Q - DIRECTIONS["left_handed"]).max() < 1e-4


@pytest.mark.parametrize("dname", list(DIRECTIONS))
def test_box_axes_follow_image_direction(dname):
    D = DIRECTIONS[dname]
    img = label_image((20, 16, 12), (1.0, 1.5, 2.5), D)
    geom = box_for_image(img, n=32, box_mm=64.0)
    assert np.allclose(geom.D, D, atol=1e-12)  # no rotation, no flip
    # the centre voxel n/2 sits on the centre of the label bounding box
    a = io.array(img) != 0
    nz = np.argwhere(a)
    c_ijk = ((nz.min(0) + nz.max(0)) / 2)[::-1]
    c = np.array(img.TransformContinuousIndexToPhysicalPoint(c_ijk.tolist()))
    assert np.allclose(geom.index_to_physical([16, 16, 16]), c, atol=1e-9)
    # box reference image agrees with the geometry's own point mapping
    ref = geom.reference_image()
    assert np.allclose(ref.TransformContinuousIndexToPhysicalPoint([3.5, 7.0, 30.0]),
                       geom.index_to_physical([3.5, 7.0, 30.0]), atol=1e-9)
    # domain coordinates: array axis a is ITK index axis 2 − a, x = h·index
    p = geom.index_to_physical([1.0, 2.0, 3.0])
    assert np.allclose(geom.physical_to_domain(p), np.array([3.0, 2.0, 1.0]) * geom.h)
    assert np.allclose(geom.domain_to_physical(geom.physical_to_domain(p)), p)


@pytest.mark.parametrize("dname", list(DIRECTIONS))
def test_labels_round_trip_exactly(dname):
    """image → box (finer) → image: nearest-neighbour labels come back unchanged."""
    img = label_image((40, 30, 20), (1.0, 1.5, 2.5), DIRECTIONS[dname], seed=3)
    geom = box_for_image(img, n=128, box_mm=64.0)  # 0.5 mm < every image spacing
    box = geom.to_box(img, "label")
    assert box.dtype == np.uint8 and box.shape == (128, 128, 128)
    assert sorted(np.unique(box).tolist()) == [0, 5, 6, 7, 8]
    back = geom.from_box(box, img, "label")
    assert io.same_geometry(back, img)
    assert np.array_equal(io.array(back), io.array(img))


@pytest.mark.parametrize("dname", ["oblique", "left_handed"])
def test_smooth_field_to_interpolation_accuracy(dname):
    """A smooth field of physical position survives image → box → image to O(h²)."""
    size, spacing = (36, 30, 24), (2.0, 2.5, 3.0)
    D = DIRECTIONS[dname]
    img0 = io.make_image(np.zeros(tuple(reversed(size)), np.float32), spacing, (3.0, -7.0, 11.0), D)
    kji = np.indices(tuple(reversed(size))).reshape(3, -1).astype(float)
    ijk = kji[::-1]
    pts = np.asarray(img0.GetOrigin())[:, None] + D @ (np.asarray(spacing)[:, None] * ijk)
    center = pts.mean(1)
    wav = 2 * math.pi / 40.0  # 40 mm wavelength

    def f(p):
        q = p - center[:, None]
        return np.sin(wav * q[0]) * np.cos(0.7 * wav * q[1]) + 0.5 * np.sin(0.9 * wav * q[2])

    img = io.image_like(f(pts).reshape(tuple(reversed(size))).astype(np.float32), img0)
    geom = box_for_image(img, n=64, box_mm=128.0, center=center, mask=np.zeros(0))
    box = geom.to_box(img, "linear", dtype=np.float64)
    # box values equal the field at the box voxels' physical positions (interior only)
    bidx = np.indices(geom.shape).reshape(3, -1)[::-1].astype(float)  # ITK (i, j, k)
    bpts = geom.origin[:, None] + geom.D @ (geom.spacing * bidx)
    inside = np.all(np.abs(np.linalg.solve(D, bpts - pts[:, [0]]) / np.asarray(spacing)[:, None]
                           - (np.asarray(size)[:, None] - 1) / 2)
                    < (np.asarray(size)[:, None] - 1) / 2 - 1, axis=0)
    err_box = np.abs(box.ravel()[inside] - f(bpts[:, inside])).max()
    bound = (wav**2) * max(spacing) ** 2 / 8 * 2.5  # 3 second derivatives, h²/8 each
    assert inside.sum() > 5000
    assert err_box < bound
    back = geom.from_box(box, img, "linear")
    assert io.same_geometry(back, img)
    inner = (slice(2, -2),) * 3
    err_back = np.abs(io.array(back)[inner] - io.array(img)[inner]).max()
    assert err_back < bound + (wav**2) * geom.spacing**2 / 8 * 2.5
    assert err_back > 0  # it really was resampled


def test_nifti_ras_and_lps_files_agree(tmp_path):
    """A NIfTI written by hand with a RAS sform and an NRRD in RAS space are read as the
    LPS geometry SimpleITK writes; a seed in RAS mm lands on the right box voxel."""
    R = rotation((0.3, 1.0, -0.2), 12.0) @ np.diag([1.0, 1.0, -1.0])  # oblique, left-handed
    spacing = np.array([1.2, 0.9, 2.0])
    A_ras = np.eye(4)
    A_ras[:3, :3] = R * spacing
    A_ras[:3, 3] = [-40.0, 25.0, -10.0]
    data = np.zeros((14, 22, 18), np.uint8)  # (k, j, i)
    data[2:-2, 2:-2, 2:-2] = 6
    seed_ijk = (7, 11, 5)
    data[seed_ijk[2], seed_ijk[1], seed_ijk[0]] = 5  # a single marker voxel
    data[3, 4, 5] = 8
    write_nifti_ras(tmp_path / "ras.nii", data, A_ras)
    lps = io.read_image(tmp_path / "ras.nii")
    flip = np.diag([-1.0, -1.0, 1.0])
    D_lps = flip @ R
    assert np.allclose(lps.GetSpacing(), spacing, atol=1e-5)
    assert np.allclose(np.reshape(lps.GetDirection(), (3, 3)), D_lps, atol=1e-5)
    assert np.allclose(lps.GetOrigin(), flip @ A_ras[:3, 3], atol=1e-4)
    assert np.array_equal(io.array(lps), data)
    # the same volume as an NRRD in RAS space, and as SimpleITK's own LPS NIfTI / NRRD
    write_nrrd(tmp_path / "ras.nrrd", data, "right-anterior-superior", (R * spacing).T, A_ras[:3, 3])
    sitk.WriteImage(lps, str(tmp_path / "lps.nii.gz"))
    sitk.WriteImage(lps, str(tmp_path / "lps.nrrd"))
    for other in ("ras.nrrd", "lps.nii.gz", "lps.nrrd"):
        img = io.read_image(tmp_path / other)
        assert io.same_geometry(img, lps, tol=1e-5), other
        assert np.array_equal(io.array(img), data), other
    # seed given in RAS mm at the marker voxel's centre
    seed_ras = A_ras @ np.array([*seed_ijk, 1.0])
    seed_lps = io.ras_to_lps(seed_ras[:3])
    assert np.allclose(lps.TransformPhysicalPointToContinuousIndex(seed_lps.tolist()), seed_ijk,
                       atol=1e-4)
    geom = box_for_image(lps, n=64, box_mm=64.0)  # 1 mm box voxels
    x = geom.physical_to_domain(seed_lps)
    kji = np.rint(x / geom.h).astype(int)
    assert np.allclose(x / geom.h, kji, atol=0.5)
    box = geom.to_box(lps, "label")
    assert box[tuple(kji)] == 5


def test_displacement_to_mm(tmp_path):
    """u (domain units, array-axis components) → LPS mm with u_mm = (L/2π)·D_box·u:
    moving a point by u_mm moves its domain coordinates by u."""
    for D in DIRECTIONS.values():
        geom = BoxGeometry(16, 200.0, (1.0, 2.0, 3.0), tuple(D.ravel()))
        u = np.array([0.3, -0.1, 0.05])
        U = np.broadcast_to(u[:, None, None, None], (3, 16, 16, 16))
        u_mm = geom.displacement_to_mm(U)[:, 5, 6, 7]
        p = np.array([10.0, -4.0, 7.0])
        assert np.allclose(geom.physical_to_domain(p + u_mm) - geom.physical_to_domain(p), u)
        assert np.linalg.norm(u_mm) == pytest.approx(np.linalg.norm(u) * 200.0 / (2 * math.pi))
    # a vector image on the reference grid, in mm
    img = label_image((10, 12, 8), (2.0, 2.0, 3.0), DIRECTIONS["oblique"])
    geom = box_for_image(img, n=16, box_mm=64.0)
    vec = geom.vector_from_box(np.broadcast_to(u[:, None, None, None], (3, 16, 16, 16)), img)
    assert vec.GetNumberOfComponentsPerPixel() == 3
    assert io.same_geometry(vec, img)
    v = sitk.GetArrayFromImage(vec)[4, 5, 6]
    assert np.allclose(v, geom.displacement_to_mm(u[:, None, None, None])[:, 0, 0, 0], atol=1e-5)


def test_atlas_as_4mm_nifti(glia_testdata, tmp_path):
    path = atlas_nifti(glia_testdata, tmp_path)
    img = io.read_label_map(path)
    assert img.GetSize() == (64, 64, 64) and img.GetSpacing() == (4.0, 4.0, 4.0)
    for n in (32, 64):
        geom = box_for_image(img, n=n)
        labels = geom.to_box(img, "label")
        assert sorted(np.unique(labels).tolist()) == [0, 5, 6, 7, 8]
        # the box has background on every face (brain centred, not touching the edge)
        for axis in range(3):
            assert not labels.take(0, axis).any() and not labels.take(n - 1, axis).any()
        # volumes are preserved roughly by nearest-neighbour resampling at 4-8 mm
        wm_img = (io.array(img) == 6).sum() * 64.0
        wm_box = (labels == 6).sum() * geom.spacing**3
        assert abs(wm_box / wm_img - 1) < 0.15
    with pytest.raises(GeometryError, match="does not fit"):
        box_for_image(img, n=32, box_mm=200.0)
    with pytest.raises(GeometryError, match="even integer"):
        box_for_image(img, n=31)


def test_fractions_are_partial_volumes(glia_testdata, tmp_path):
    """kind 'fraction': a box four times as coarse as the image, with cells aligned to the
    image voxels, gets exactly the 4×4×4 block means of the one-hot map (linear sampling
    at the cell centres only sees the central 2×2×2)."""
    img = io.read_label_map(atlas_nifti(glia_testdata, tmp_path))  # 4 mm, 64³
    a = io.array(img)
    onehot = (a == 7).astype(np.float32)  # ventricles: small and thin, aliasing shows
    # box of 16 voxels of 16 mm whose cell I covers image voxels 4I … 4I+3 on every axis
    c = img.TransformContinuousIndexToPhysicalPoint([33.5, 33.5, 33.5])  # box voxel 8
    geom = BoxGeometry(16, 256.0, tuple(c), img.GetDirection())
    assert np.allclose(geom.index_to_physical([0, 0, 0]),
                       img.TransformContinuousIndexToPhysicalPoint([1.5, 1.5, 1.5]))
    frac = geom.to_box(io.image_like(onehot, img), "fraction", dtype=np.float64)
    blocks = onehot.reshape(16, 4, 16, 4, 16, 4).mean(axis=(1, 3, 5))
    assert np.abs(frac - blocks).max() < 1e-6
    assert frac.sum() * 16**3 == pytest.approx(onehot.sum() * 4**3)
    sampled = geom.to_box(io.image_like(onehot, img), "linear", dtype=np.float64)
    assert np.abs(sampled - blocks).max() > 0.2
    assert 0.0 <= frac.min() and frac.max() <= 1.0


def test_box_tissues_counts_tumor_as_white_matter(glia_testdata, tmp_path):
    from GBMMassEffectLib.backend import get_backend
    from GBMMassEffectLib.simulate import box_tissues
    from GBMMassEffectLib.spectral import SpectralOps

    img = io.read_label_map(atlas_nifti(glia_testdata, tmp_path))
    a = io.array(img)
    a2 = a.copy()
    a2[30:36, 30:36, 30:36] = np.array([1, 2, 4, 4, 1, 2], np.uint8)[None, None, :]
    img2 = io.image_like(a2, img)
    geom = box_for_image(img, n=32)
    ops = SpectralOps(32, get_backend("cpu", "float64"))
    t_ref = box_tissues(geom, img, ops)
    t_tum = box_tissues(geom, img2, ops, tumor_as="wm")
    h3 = geom.spacing**3
    # total fractions match the labelled volumes (partial volumes; smoothing keeps sums)
    assert t_ref.wm.sum() * h3 == pytest.approx((a == 6).sum() * 64.0, rel=2e-3)
    assert t_ref.gm.sum() * h3 == pytest.approx((a == 5).sum() * 64.0, rel=2e-3)
    assert t_tum.wm.sum() * h3 == pytest.approx(np.isin(a2, (1, 2, 4, 6)).sum() * 64.0, rel=2e-3)
    assert 0.0 <= t_ref.bg.min() and t_ref.bg.max() <= 1.0 + 1e-9
    core = geom.label_fraction(img2, (1, 4))
    assert core.sum() * h3 == pytest.approx(np.isin(a2, (1, 4)).sum() * 64.0, rel=2e-3)


def _stored(img: sitk.Image, direction, spacing, interp=sitk.sitkNearestNeighbor) -> sitk.Image:
    """img resampled onto a grid with the given direction and spacing covering it."""
    import itertools

    D = np.asarray(direction, float)
    size = np.asarray(img.GetSize())
    corners = np.array([img.TransformContinuousIndexToPhysicalPoint([float(c) for c in cc])
                        for cc in itertools.product(*[(-0.5, s - 0.5) for s in size])]) @ D
    lo, hi = corners.min(0), corners.max(0)
    sp = np.asarray(spacing, float)
    ref = sitk.Image([int(v) for v in np.ceil((hi - lo) / sp)], img.GetPixelID())
    ref.SetSpacing(sp.tolist())
    ref.SetDirection(D.ravel().tolist())
    ref.SetOrigin((D @ (lo + sp / 2)).tolist())
    return sitk.Resample(img, ref, sitk.Transform(), interp, 0)


def test_anchored_box_is_one_box_for_every_storage_of_one_anatomy(glia_testdata, tmp_path):
    """calibrate's patient box (anchored_box): the same anatomy stored straight, flipped,
    with another field of view, or oblique, left-handed and anisotropic gets the same box
    centre, axes that are a signed permutation of LPS, voxel centres on one physical
    lattice and S.1's even-index lattice on (2L/n)·Z³; the tissue it samples agrees."""
    img = io.read_label_map(atlas_nifti(glia_testdata, tmp_path))  # 4 mm, 64³, identity
    a = io.array(img)
    flipped = io.make_image(a[:, ::-1, ::-1], img.GetSpacing(),
                            img.TransformIndexToPhysicalPoint((63, 63, 0)), DIRECTIONS["ras_like"])
    padded = sitk.ConstantPad(img, (5, 0, 3), (0, 7, 2), 0)  # another field of view
    oblique = _stored(img, DIRECTIONS["left_handed"] @ DIRECTIONS["oblique"], (3.0, 4.5, 2.5))
    n, L = 32, 256.0
    boxes = {name: anchored_box(im, n, L, io.array(im) > 0)
             for name, im in [("straight", img), ("flipped", flipped), ("padded", padded), ("oblique", oblique)]}
    h = L / n
    ref_labels = boxes["straight"].to_box(img, "label")
    for name, geom in boxes.items():
        assert np.allclose(geom.center, boxes["straight"].center, atol=1e-6), name
        assert np.allclose(np.abs(geom.D), np.abs(geom.D).round()) and abs(abs(np.linalg.det(geom.D)) - 1) < 1e-9
        even = np.array([geom.index_to_physical(ijk) for ijk in [(0, 0, 0), (2, 4, 6), (30, 16, 8)]])
        assert np.allclose(even / (2 * h), np.round(even / (2 * h)), atol=1e-6), name
        # the same physical sample points: resampling the straight image onto each box gives
        # the straight box's labels, up to the box's axis order and signs
        mine = geom.to_box(img, "label")
        assert sorted(np.unique(mine).tolist()) == [0, 5, 6, 7, 8]
        assert np.array_equal(np.sort(mine.ravel()), np.sort(ref_labels.ravel())), name
    # the oblique copy's own labels (nearest neighbour at 3 × 4.5 × 2.5 mm) sample the same tissue
    agree = (boxes["oblique"].to_box(oblique, "label") == boxes["oblique"].to_box(img, "label")).mean()
    assert agree > 0.9
    # the image-aligned box of the oblique copy is oblique and off the lattice
    assert not np.allclose(np.abs(box_for_image(oblique, n, L, mask=io.array(oblique) > 0).D).round(),
                           np.abs(box_for_image(oblique, n, L, mask=io.array(oblique) > 0).D), atol=1e-3)


def test_anchored_box_falls_back_when_the_rounded_centre_does_not_fit():
    """A brain that fits only when the box is centred on it exactly gets box_for_image's box."""
    a = np.zeros((20, 20, 40), np.uint8)
    a[5:15, 5:15, 5:30] = 6  # 25 voxels of 2 mm: x from 10 to 60 mm, centre 35 mm
    img = io.make_image(a, (2.0, 2.0, 2.0), origin=(1.0, 1.0, 1.0))
    # 4 mm box voxels, the centre at index 8: with one voxel of margin the brain may reach
    # 30 mm below and 26 mm above the centre; rounded to 32 mm it would reach 28 mm above
    n, L = 16, 64.0
    geom = anchored_box(img, n, L, a > 0)
    exact = box_for_image(img, n, L, mask=a > 0)
    assert geom.center[0] == pytest.approx(35.0) and np.allclose(geom.center, exact.center)
    assert np.allclose(geom.D, exact.D)
    a[5:15, 5:15, 8:20] = 0
    a[5:15, 5:15, 8:9] = 6  # same extent; the anchored box fits when its rounded centre is near
    img2 = io.make_image(a, (2.0, 2.0, 2.0), origin=(-3.0, 1.0, 1.0))  # x centre 31 mm → 32
    assert anchored_box(img2, n, L, a > 0).center[0] == pytest.approx(32.0)
    with pytest.raises(GeometryError, match="even integer"):
        anchored_box(img, 15, L, a > 0)


def test_nearest_axes():
    assert np.array_equal(nearest_axes(DIRECTIONS["ras_like"]), np.diag([-1.0, -1.0, 1.0]))
    P = nearest_axes(DIRECTIONS["left_handed"])
    assert np.array_equal(P, np.diag([1.0, -1.0, 1.0]))
    perm = np.array([[0.0, 1, 0], [0, 0, -1], [1, 0, 0]])
    assert np.array_equal(nearest_axes(rotation((1, 1, 1), 10.0) @ perm), perm)


def _second_moments(c):
    """Per-axis variance (voxel²) of a non-negative array."""
    idx = np.indices(c.shape).reshape(3, -1).astype(float)
    w = c.ravel() / c.sum()
    mu = idx @ w
    return ((idx - mu[:, None]) ** 2) @ w


@pytest.mark.parametrize("dname", ["identity", "oblique"])
def test_cubic_from_box_keeps_a_peaked_field(dname):
    """simulate draws c0 and c(1) onto the input image with 'cubic': an atom one box voxel
    wide comes back at the box nodes within 1% (relative 2-norm) and with its width, where
    'linear' puts a kink at every node (its node samples read as a blur)."""
    geom = BoxGeometry(32, 256.0, (0.0, 0.0, 0.0), tuple(DIRECTIONS[dname].ravel()))
    x = np.indices(geom.shape).astype(float)
    centre = np.array([16.3, 15.6, 16.45])
    box = np.exp(-((x - centre[:, None, None, None]) ** 2).sum(0) / 2.0)  # σ = 1 box voxel
    # a finer image (1.5 mm, its voxel centres off the box nodes) around the peak
    fine_dir = DIRECTIONS["identity"]
    origin = geom.index_to_physical(centre[::-1] - 5.0) + 0.37
    fine = io.make_image(np.zeros((72, 72, 72), np.float32), (1.5, 1.5, 1.5), origin, fine_dir)
    errs, widths = {}, {}
    for kind in ("cubic", "linear"):
        img = sitk.Clamp(geom.from_box(box.astype(np.float32), fine, kind), sitk.sitkFloat32, 0.0, 1.0)
        back = geom.to_box(img, "linear", dtype=np.float64)  # point samples at the box nodes
        near = np.zeros(geom.shape, bool)
        near[12:21, 11:20, 12:21] = True  # the nodes the fine image covers with a margin
        errs[kind] = np.linalg.norm((back - box)[near]) / np.linalg.norm(box[near])
        widths[kind] = _second_moments(np.where(near, back, 0.0)) - _second_moments(np.where(near, box, 0.0))
    assert errs["cubic"] < 0.01, errs  # measured 0.6-0.7%
    assert np.abs(widths["cubic"]).max() < 0.015, widths  # voxel²; measured 0.006
    assert widths["linear"].min() > 0.03, widths  # the test tells the two apart (0.05-0.07)


def test_snapped_box_tiles_the_image_voxels():
    """geometry.snapped_to_image (the atlas box): moved by less than one image voxel so that
    box voxels tile the image's: at the image's own spacing the box nodes are its voxel
    centres, at twice it each box voxel covers exactly 2³ of them; an oblique box is left as
    it is."""
    from GBMMassEffectLib.geometry import snapped_to_image

    arr = np.zeros((64, 64, 64), np.uint8)
    arr[10:49, 12:52, 8:57] = 6  # bounding-box centres on, between and on voxel centres
    img = io.make_image(arr, (4.0, 4.0, 4.0), origin=(-126.0, -101.3, 7.7))
    for n, frac in ((64, 0.0), (32, 0.5)):
        geom = box_for_image(img, n, 256.0)
        snapped = snapped_to_image(geom, img)
        shift = np.asarray(snapped.center) - np.asarray(geom.center)
        assert np.abs(shift).max() <= 4.0 / 2 + 1e-9  # less than one image voxel
        idx = np.asarray(img.TransformPhysicalPointToContinuousIndex([float(v) for v in snapped.index_to_physical([0, 0, 0])]))
        np.testing.assert_allclose(idx - np.floor(idx), frac, atol=1e-9)
        before = np.asarray(img.TransformPhysicalPointToContinuousIndex([float(v) for v in geom.index_to_physical([0, 0, 0])]))
        assert not np.allclose(before - np.floor(before), frac)  # the test's box did straddle the voxels
    c, s_ = math.cos(0.3), math.sin(0.3)
    oblique = io.make_image(arr, (4.0, 4.0, 4.0), direction=(c, -s_, 0, s_, c, 0, 0, 0, 1))
    geom = box_for_image(oblique, 64, 256.0)
    assert snapped_to_image(geom, io.make_image(arr, (4.0, 4.0, 4.0))) == geom
