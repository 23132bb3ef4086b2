"""The solver's periodic box ↔ a patient image (MODEL.md §2; ARCHITECTURE.md "grid").

The box is n³ voxels of isotropic spacing s = L/n (L = `box_mm`, default 256 mm, fixed at
every n, so one domain unit is L/2π mm and κ, ρ, γ keep their paper units). Its index axes
are the image's own direction cosines (orthonormalised; a left-handed, negative-determinant
direction stays left-handed), so an axial scan is not rotated and nothing is flipped; the
centre voxel (index n/2 on every axis) sits on `center` (LPS mm), by default the centre of
the bounding box of the non-background labels. Outside the image the box is background.

Conventions (keep them everywhere in the solver):
* Box ITK index (i, j, k) ↔ physical p = origin + D·(s·(i, j, k)), D the 3×3 direction
  (columns = index axes in LPS), origin = center − D·(s·n/2, s·n/2, s·n/2).
* Solver arrays are sitk.GetArrayFromImage order (k, j, i): array axis a is ITK index axis
  2 − a. Domain coordinate along array axis a: x_a = h·index_{2−a}, h = 2π/n, so x_a = i·h
  of spectral.coordinates() with i the array index along axis a.
* A box vector field u (3, n, n, n), component a along array axis a, in domain units, is
  u_mm = (L/2π)·D_box·u with D_box = D[:, ::-1] (the direction columns in array-axis
  order); u_mm's components are LPS (x = L, y = P, z = S) millimetres.
* Images → box: labels nearest-neighbour, intensities linear (sitk.Resample onto the box
  reference), tissue fractions linear with sub-voxel averaging where the box is coarser
  than the image (kind 'fraction'); box → image: sitk.Resample with the original image as the
  reference, so results land on the original grid exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

_INTERP = {
    "label": sitk.sitkNearestNeighbor,
    "nearest": sitk.sitkNearestNeighbor,
    "linear": sitk.sitkLinear,
    "cubic": sitk.sitkBSpline,  # interpolating cubic B-spline (ITK prefilters the samples)
}


class GeometryError(ValueError):
    """The image cannot be placed in the box (e.g. the brain does not fit)."""


def orthonormal_direction(direction) -> np.ndarray:
    """Nearest orthonormal matrix (polar factor) to a 3×3 direction; keeps det's sign."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    u, sv, vt = np.linalg.svd(d)
    if sv.min() < 1e-6 * sv.max():
        raise GeometryError(f"image direction matrix is singular: {d.ravel().tolist()}")
    return u @ vt


@dataclass(frozen=True)
class BoxGeometry:
    """Placement of the n³ periodic box in the patient's physical (LPS) space."""

    n: int
    box_mm: float
    center: tuple  # LPS mm, position of box index (n/2, n/2, n/2)
    direction: tuple  # 9 floats, row-major like sitk (columns = box index axes)

    # ---- derived quantities -------------------------------------------------------
    @property
    def spacing(self) -> float:
        """Box voxel size in mm (L/n)."""
        return self.box_mm / self.n

    @property
    def h(self) -> float:
        """Voxel size in domain units (2π/n)."""
        return 2.0 * math.pi / self.n

    @property
    def domain_unit_mm(self) -> float:
        """One domain unit in mm, L/2π."""
        return self.box_mm / (2.0 * math.pi)

    @property
    def D(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def D_box(self) -> np.ndarray:
        """Direction columns in solver array-axis order (k, j, i): D[:, ::-1]."""
        return self.D[:, ::-1]

    @property
    def origin(self) -> np.ndarray:
        return np.asarray(self.center, float) - self.D @ np.full(3, self.spacing * self.n / 2)

    @property
    def shape(self) -> tuple:
        return (self.n, self.n, self.n)

    # ---- points -----------------------------------------------------------------------
    def physical_to_index(self, point) -> np.ndarray:
        """LPS mm → continuous box ITK index (i, j, k)."""
        p = np.asarray(point, float)
        return np.linalg.solve(self.D, p - self.origin) / self.spacing

    def index_to_physical(self, index) -> np.ndarray:
        return self.origin + self.D @ (np.asarray(index, float) * self.spacing)

    def physical_to_domain(self, point) -> np.ndarray:
        """LPS mm → domain coordinates (x_0, x_1, x_2) in solver array-axis order."""
        return self.physical_to_index(point)[::-1] * self.h

    def domain_to_physical(self, x) -> np.ndarray:
        return self.index_to_physical(np.asarray(x, float)[::-1] / self.h)

    # ---- images -----------------------------------------------------------------------
    def reference_image(self, pixel_id=sitk.sitkFloat32) -> sitk.Image:
        img = sitk.Image([self.n] * 3, pixel_id)
        self._stamp(img)
        return img

    def _stamp(self, img: sitk.Image) -> sitk.Image:
        img.SetSpacing([self.spacing] * 3)
        img.SetOrigin([float(v) for v in self.origin])
        img.SetDirection([float(v) for v in self.direction])
        return img

    def refined(self, m: int) -> "BoxGeometry":
        """The box of (m·n)³ voxels whose m³ sub-voxels tile each voxel of this box."""
        shift = self.D @ np.full(3, self.spacing * (-0.5 + 0.5 / m))
        return BoxGeometry(self.n * m, self.box_mm, tuple(np.asarray(self.center) + shift),
                           self.direction)

    def image(self, array, is_vector: bool = False) -> sitk.Image:
        """Wrap a box array (k, j, i) [or (k, j, i, c) with is_vector] into an sitk image
        carrying the box geometry."""
        a = np.asarray(array)
        if a.shape[:3] != self.shape:
            raise ValueError(f"box array has shape {a.shape}, expected {self.shape}")
        img = sitk.GetImageFromArray(a, isVector=is_vector)
        return self._stamp(img)

    def to_box(self, image: sitk.Image, kind: str = "linear", default: float = 0.0,
               dtype=np.float32, supersample: int | None = None) -> np.ndarray:
        """Resample an image into the box; returns the (k, j, i) array. kind: 'label'
        (nearest neighbour, keeps the input's integer type), 'linear', or 'fraction'
        (partial volumes: linear onto an m-times finer box, then the mean over each box
        voxel's m³ sub-voxels; m = ceil(box voxel / finest image voxel), at most 4, so a
        box coarser than the image averages instead of sampling)."""
        if kind == "fraction":
            m = supersample or int(min(4, max(1, math.ceil(self.spacing / min(image.GetSpacing()) - 1e-9))))
            if m == 1:
                return self.to_box(image, "linear", default, dtype)
            fine = self.refined(m)
            a = fine.to_box(image, "linear", default, np.float64)
            n = self.n
            return a.reshape(n, m, n, m, n, m).mean(axis=(1, 3, 5)).astype(dtype)
        interp = _INTERP[kind]
        if kind in ("label", "nearest"):
            out_type = image.GetPixelID()
        else:
            out_type = sitk.sitkFloat64 if np.dtype(dtype) == np.float64 else sitk.sitkFloat32
        ref = self.reference_image(out_type)
        res = sitk.Resample(image, ref, sitk.Transform(), interp, float(default), out_type)
        a = sitk.GetArrayFromImage(res)
        return a if kind in ("label", "nearest") else a.astype(dtype, copy=False)

    def label_fraction(self, labels: sitk.Image, values, dtype=np.float32) -> np.ndarray:
        """Partial-volume fraction in the box of the voxels whose label is in values (e.g.
        the tumor core {1, 4}): the one-hot map resampled with kind 'fraction'."""
        a = sitk.GetArrayViewFromImage(labels)
        onehot = sitk.GetImageFromArray(np.isin(a, list(values)).astype(np.float32))
        onehot.CopyInformation(labels)
        return self.to_box(onehot, "fraction", dtype=dtype)

    def from_box(self, array, reference: sitk.Image, kind: str = "linear",
                 default: float = 0.0, pixel_id=None) -> sitk.Image:
        """Resample a box array (k, j, i) onto the reference image's grid (exactly its
        size, origin, spacing, direction)."""
        a = np.asarray(array)
        if pixel_id is None:
            pixel_id = sitk.sitkUInt8 if kind in ("label", "nearest") and a.dtype.kind in "iub" \
                else sitk.sitkFloat32
        box = self.image(a)
        return sitk.Resample(box, reference, sitk.Transform(), _INTERP[kind], float(default), pixel_id)

    def displacement_to_mm(self, u) -> np.ndarray:
        """Box displacement (3, n, n, n) in domain units, component a along array axis a,
        → (3, n, n, n) LPS millimetres: u_mm = (L/2π)·D_box·u."""
        u = np.asarray(u, dtype=np.float64)
        return self.domain_unit_mm * np.einsum("pa,a...->p...", self.D_box, u)

    def vector_from_box(self, u, reference: sitk.Image) -> sitk.Image:
        """Box displacement (domain units) → 3-component image on the reference grid,
        in LPS mm (ITK displacement-field convention), linear interpolation."""
        u_mm = self.displacement_to_mm(u)
        comps = [self.from_box(u_mm[p].astype(np.float32), reference, "linear") for p in range(3)]
        return sitk.Compose(comps)

    # ---- report -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "box_mm": self.box_mm,
            "spacing_mm": self.spacing,
            "domain_unit_mm": self.domain_unit_mm,
            "center_lps": [float(v) for v in self.center],
            "origin_lps": [float(v) for v in self.origin],
            "direction": [float(v) for v in self.direction],
            "array_axes": "(k, j, i) = sitk.GetArrayFromImage order",
        }

    @classmethod
    def from_dict(cls, d: dict) -> "BoxGeometry":
        return cls(int(d["n"]), float(d["box_mm"]), tuple(d["center_lps"]), tuple(d["direction"]))


def bounding_box_center(image: sitk.Image, mask: np.ndarray | None = None) -> np.ndarray:
    """Physical (LPS) centre of the index bounding box of mask (default: image != 0)."""
    m = sitk.GetArrayViewFromImage(image) != 0 if mask is None else np.asarray(mask, bool)
    nz = np.argwhere(m)
    if nz.size == 0:
        raise GeometryError("the label map has no non-background voxels to centre the box on")
    kji = (nz.min(0) + nz.max(0)) / 2.0
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in kji[::-1]]))


def mask_extent_in_box(geom: BoxGeometry, image: sitk.Image, mask: np.ndarray) -> tuple:
    """(lo, hi) continuous box ITK indices spanned by the voxels of mask (voxel cells,
    i.e. their centres ± half an image voxel, through the 8 corners of the bounding box)."""
    nz = np.argwhere(np.asarray(mask, bool))
    lo_kji, hi_kji = nz.min(0) - 0.5, nz.max(0) + 0.5
    corners = []
    for ck in (lo_kji[0], hi_kji[0]):
        for cj in (lo_kji[1], hi_kji[1]):
            for ci in (lo_kji[2], hi_kji[2]):
                p = image.TransformContinuousIndexToPhysicalPoint([float(ci), float(cj), float(ck)])
                corners.append(geom.physical_to_index(p))
    corners = np.array(corners)
    return corners.min(0), corners.max(0)


def _inside(geom: BoxGeometry, lo, hi, margin_voxels: float) -> bool:
    """Whether continuous box indices lo … hi (per axis) keep margin_voxels from the faces."""
    lim_lo, lim_hi = -0.5 + margin_voxels, geom.n - 0.5 - margin_voxels
    return not ((np.asarray(lo) < lim_lo - 1e-9).any() or (np.asarray(hi) > lim_hi + 1e-9).any())


def check_fits(geom: BoxGeometry, image: sitk.Image, mask: np.ndarray, margin_voxels: float = 1.0,
               what: str = "brain") -> None:
    """Raise GeometryError unless mask's voxels lie inside the box with margin_voxels
    of background on every side (periodic box: opposite faces touch)."""
    lo, hi = mask_extent_in_box(geom, image, mask)
    if not _inside(geom, lo, hi, margin_voxels):
        extent = (hi - lo) * geom.spacing
        raise GeometryError(
            f"the {what} (extent {extent[0]:.0f} x {extent[1]:.0f} x {extent[2]:.0f} mm along the "
            f"box axes) does not fit in the {geom.box_mm:g} mm box with {margin_voxels:g} voxel(s) "
            f"of margin ({geom.n}^3 voxels of {geom.spacing:.3g} mm); it touches the domain edge: "
            "increase --box-mm or move the centre"
        )


def _check_box(n: int, box_mm: float) -> None:
    if int(n) != n or n < 8 or n % 2:
        raise GeometryError(f"grid size must be an even integer >= 8, got {n}")
    if not (box_mm > 0 and math.isfinite(box_mm)):
        raise GeometryError(f"box edge must be a positive length in mm, got {box_mm}")


def nearest_axes(direction) -> np.ndarray:
    """The signed permutation of the LPS axes nearest to a direction matrix (each image
    axis onto the LPS axis it is closest to, one each): an oblique image's anatomical axes."""
    from scipy.optimize import linear_sum_assignment

    D = orthonormal_direction(direction)
    rows, cols = linear_sum_assignment(-np.abs(D))  # LPS axis rows[k] ↔ image axis cols[k]
    P = np.zeros((3, 3))
    P[rows, cols] = np.where(D[rows, cols] < 0, -1.0, 1.0)
    return P


def snapped_to_image(geom: BoxGeometry, image: sitk.Image, margin_voxels: float = 1.0) -> BoxGeometry:
    """geom moved by less than one image voxel so that its voxels tile the image's: with box
    spacing k image voxels (k integer) each box voxel covers exactly k³ of them, with k = 1
    the box nodes are the image's voxel centres (nothing is interpolated or averaged across
    voxels). Only for a box along the image's axes with an isotropic image; otherwise, or when
    the moved box would not fit, geom unchanged. For an atlas box: a box straddling the
    atlas's voxels blurs its tissue maps by up to half an image voxel per axis (the reference
    solver's 4 mm atlas in a 64³ box half a voxel off: γ 4.7% under with its own c0 and data,
    benchmarks/glia_patient.py --data-path)."""
    sp = np.asarray(image.GetSpacing(), float)
    D_img = orthonormal_direction(image.GetDirection())
    if not (np.allclose(sp, sp[0], rtol=1e-6) and np.allclose(np.asarray(geom.direction, float).reshape(3, 3), D_img,
                                                                atol=1e-6)):
        return geom
    k = geom.spacing / sp[0]
    half = (round(k) - 1) / 2.0 if abs(k - round(k)) < 1e-6 else 0.0
    idx = np.asarray(image.TransformPhysicalPointToContinuousIndex([float(v) for v in geom.center]), float)
    idx = np.round(idx - half) + half
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx]), float)
    moved = BoxGeometry(geom.n, geom.box_mm, tuple(float(v) for v in centre), geom.direction)
    m = sitk.GetArrayViewFromImage(image) != 0
    if m.any() and not _inside(moved, *mask_extent_in_box(moved, image, m), margin_voxels):
        return geom
    return moved


def anchored_box(image: sitk.Image, n: int, box_mm: float, mask: np.ndarray,
                 margin_voxels: float = 1.0) -> BoxGeometry:
    """Box of n³ voxels and edge box_mm anchored to the physical (LPS) frame: axes along the
    image's nearest LPS axes (nearest_axes), centre on the LPS bounding box of mask's voxel
    centres rounded to a multiple of two box voxels. Its voxel centres then lie on the fixed
    lattice (L/n)·Z³ shifted by the centre, and its even-index voxels (S.1's candidate
    lattice, MODEL §5) on (2L/n)·Z³, for n divisible by 4, whatever the image's storage:
    oblique, flipped, permuted or with another field of view, one anatomy gets one box.
    (Aligned with each image's own axes, the 32³ demo patient stored obliquely gave γ 19% under
    where the same patient stored straight gave 3% over: S.1's c0 moved with the lattice.)
    Falls back to box_for_image's image-aligned box when the anchored one does not fit."""
    _check_box(n, box_mm)
    from scipy import ndimage

    m = np.asarray(mask, bool)
    nz = np.argwhere(m & ~ndimage.binary_erosion(m))  # the boundary has the mask's extent
    if nz.size == 0:
        raise GeometryError("the label map has no non-background voxels to centre the box on")
    D_img = np.asarray(image.GetDirection(), float).reshape(3, 3)
    sp, org = np.asarray(image.GetSpacing(), float), np.asarray(image.GetOrigin(), float)
    pts = org + (nz[:, ::-1] * sp) @ D_img.T  # (k, j, i) → physical LPS
    centre = (pts.min(0) + pts.max(0)) / 2.0
    step = 2.0 * box_mm / n
    centre = np.round(centre / step) * step
    P = nearest_axes(image.GetDirection())
    geom = BoxGeometry(int(n), float(box_mm), tuple(float(v) for v in centre), tuple(float(v) for v in P.ravel()))
    # the mask's voxel cells in box indices (an oblique image's index bounding box, which
    # check_fits uses, reaches further out along the box axes than its voxels do)
    idx = (pts - geom.origin) @ P / geom.spacing
    half = 0.5 * np.abs(P.T @ D_img) @ sp / geom.spacing
    if not _inside(geom, idx.min(0) - half, idx.max(0) + half, margin_voxels):
        return box_for_image(image, n, box_mm, mask=m, margin_voxels=margin_voxels)
    return geom


def box_for_image(image: sitk.Image, n: int, box_mm: float = 256.0, center=None,
                  mask: np.ndarray | None = None, margin_voxels: float = 1.0) -> BoxGeometry:
    """Box of n³ voxels and edge box_mm aligned with image's direction, centred on center
    (LPS mm) or on the bounding box of mask (default: non-zero voxels of image); checks
    that the masked region fits (GeometryError otherwise)."""
    _check_box(n, box_mm)
    D = orthonormal_direction(image.GetDirection())
    m = sitk.GetArrayViewFromImage(image) != 0 if mask is None else np.asarray(mask, bool)
    if center is None:
        center = bounding_box_center(image, m)
    center = np.asarray(center, dtype=float)
    if center.shape != (3,) or not np.isfinite(center).all():
        raise GeometryError(f"box centre must be three finite numbers (LPS mm), got {center}")
    geom = BoxGeometry(int(n), float(box_mm), tuple(float(v) for v in center),
                       tuple(float(v) for v in D.ravel()))
    if m.any():
        check_fits(geom, image, m, margin_voxels)
    return geom
