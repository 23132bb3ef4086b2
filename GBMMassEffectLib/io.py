"""Reading and writing NIfTI / NRRD images with their geometry (ARCHITECTURE.md,
"The process boundary": never exchange index-matched arrays).

Images are SimpleITK images, so origin, spacing and direction always travel with the
voxels. Physical coordinates are ITK's LPS millimetres: SimpleITK converts a NIfTI's
RAS sform/qform and an NRRD's "right-anterior-superior" space to LPS on reading (and back
on writing). Every problem with an input (missing, unreadable, not 3-D, NaN, unknown
labels) raises `ImageIOError`, a ValueError with a one-line message naming the file.

Array convention: `array(img)` is sitk.GetArrayFromImage, axis order (k, j, i), i.e. the
last array axis is the first ITK index (the fastest one in the file).
"""
from __future__ import annotations

import gzip
import os
import struct
from typing import Iterable

import numpy as np
import SimpleITK as sitk

#: tissue labels of the label maps (MODEL.md §1; ARCHITECTURE.md job.json)
TISSUE_LABELS = {"gm": 5, "wm": 6, "vt": 7, "csf": 8}
BACKGROUND = 0
#: BraTS tumor labels
BRATS_LABELS = {"necrotic": 1, "edema": 2, "enhancing": 4}

_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class ImageIOError(ValueError):
    """An input image is missing, unreadable or unsuitable (one-line message)."""


def _name(path) -> str:
    return os.fspath(path)


def read_image(path, what: str = "image", allow_vector: bool = False) -> sitk.Image:
    """Read a 3-D NIfTI/NRRD image; check it exists, is 3-D and finite."""
    path = _name(path)
    if not os.path.exists(path):
        raise ImageIOError(f"{what} file not found: {path}")
    if os.path.isdir(path):
        raise ImageIOError(f"{what} path is a folder, not an image file: {path}")
    try:
        img = sitk.ReadImage(path)
    except RuntimeError as exc:  # ITK's messages are multi-line
        first = next((ln.strip() for ln in str(exc).splitlines() if "ERROR" in ln or "rror" in ln), "")
        raise ImageIOError(
            f"cannot read {what} file {path}: not a readable NIfTI/NRRD image"
            + (f" ({first[:160]})" if first else "")
        ) from None
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() != 3:
        raise ImageIOError(
            f"{what} {path} must be a 3-D image, got {img.GetDimension()}-D of size {img.GetSize()}"
        )
    if img.GetNumberOfComponentsPerPixel() != 1 and not allow_vector:
        raise ImageIOError(
            f"{what} {path} must have one component per voxel, got {img.GetNumberOfComponentsPerPixel()}"
        )
    if min(img.GetSize()) < 2:
        raise ImageIOError(f"{what} {path} is degenerate (size {img.GetSize()})")
    check_finite(img, f"{what} {path}")
    if path.endswith((".nii", ".nii.gz")):
        bad = _nifti_nonfinite_count(path)
        if bad:  # ITK's NIfTI reader turns NaN into 0, so look at the file itself
            raise ImageIOError(f"{what} {path} contains {bad} NaN or infinite voxel(s)")
    return img


def _nifti_nonfinite_count(path: str) -> int:
    """Count NaN/inf voxels of a float NIfTI-1/-2 file by reading its raw data (SimpleITK
    silently reads NaN as 0 from NIfTI). Returns 0 for integer types or unparsable files."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(540)
            for endian in ("<", ">"):
                (size,) = struct.unpack_from(endian + "i", head, 0)
                if size in (348, 540):
                    break
            else:
                return 0
            if size == 348:
                dims = struct.unpack_from(endian + "8h", head, 40)
                datatype = struct.unpack_from(endian + "h", head, 70)[0]
                offset = int(struct.unpack_from(endian + "f", head, 108)[0])
            else:
                datatype = struct.unpack_from(endian + "h", head, 12)[0]
                dims = struct.unpack_from(endian + "8q", head, 16)
                offset = int(struct.unpack_from(endian + "q", head, 168)[0])
            dtype = {16: "f4", 64: "f8"}.get(datatype)
            if dtype is None or not 1 <= dims[0] <= 7:
                return 0
            count = int(np.prod([max(1, d) for d in dims[1 : dims[0] + 1]]))
            f.seek(offset)
            data = np.frombuffer(f.read(count * int(dtype[1])), dtype=endian + dtype)
    except (OSError, EOFError, struct.error, ValueError):
        return 0
    return int(data.size - np.isfinite(data).sum())


def check_finite(img: sitk.Image, what: str = "image") -> None:
    a = sitk.GetArrayViewFromImage(img)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        bad = int(np.size(a) - np.isfinite(a).sum())
        raise ImageIOError(f"{what} contains {bad} NaN or infinite voxel(s)")


def read_label_map(
    path, allowed: Iterable[int] = (0, 5, 6, 7, 8), what: str = "label map"
) -> sitk.Image:
    """Read an integer label map (UInt8 image); unknown or non-integer values are errors."""
    img = read_image(path, what)
    check_labels(img, allowed, f"{what} {_name(path)}")
    out = sitk.Cast(img, sitk.sitkUInt8) if img.GetPixelID() != sitk.sitkUInt8 else img
    return out


def check_labels(img: sitk.Image, allowed: Iterable[int], what: str = "label map") -> None:
    a = sitk.GetArrayViewFromImage(img)
    allowed = sorted(int(v) for v in allowed)
    if a.dtype.kind == "f" and not np.array_equal(a, np.round(a)):
        raise ImageIOError(f"{what} has non-integer values; expected labels {allowed}")
    values = np.unique(a)
    unknown = [v for v in values.tolist() if int(v) not in allowed]
    if unknown:
        shown = ", ".join(str(int(v)) for v in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        raise ImageIOError(f"{what} has unknown label value(s) {shown}; allowed labels are {allowed}")
    if not (values != BACKGROUND).any():
        raise ImageIOError(f"{what} is empty (only background label 0)")


def write_image(img: sitk.Image, path, compress: bool = True) -> str:
    """Write an image (format from the extension). Not atomic by itself: use
    progress.OutputSet.write(path, lambda tmp: write_image(img, tmp)) for outputs."""
    path = _name(path)
    if not path.endswith(_SUFFIXES):
        raise ImageIOError(f"unsupported output format for {path}; use .nrrd or .nii(.gz)")
    sitk.WriteImage(img, path, compress)
    return path


def array(img: sitk.Image) -> np.ndarray:
    """Voxel array in (k, j, i) order (a copy)."""
    return sitk.GetArrayFromImage(img)


def image_like(arr: np.ndarray, reference: sitk.Image, is_vector: bool = False) -> sitk.Image:
    """Wrap a (k, j, i) array into an image with reference's origin, spacing, direction."""
    arr = np.asarray(arr)
    if arr.shape[:3] != tuple(reversed(reference.GetSize())):
        raise ValueError(
            f"array shape {arr.shape[:3]} does not match the reference image size "
            f"{reference.GetSize()} in (k, j, i) order"
        )
    img = sitk.GetImageFromArray(arr, isVector=is_vector)
    img.CopyInformation(reference)
    return img


def make_image(arr: np.ndarray, spacing, origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    """A 3-D image from a (k, j, i) array with explicit LPS geometry (direction row-major)."""
    img = sitk.GetImageFromArray(np.asarray(arr))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    if direction is not None:
        img.SetDirection([float(d) for d in np.asarray(direction, dtype=float).ravel()])
    return img


def geometry_dict(img: sitk.Image) -> dict:
    """Size, spacing, origin, direction of an image (for reports and comparisons)."""
    return {
        "size": list(img.GetSize()),
        "spacing": list(img.GetSpacing()),
        "origin": list(img.GetOrigin()),
        "direction": list(img.GetDirection()),
    }


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-6) -> bool:
    """True when a and b share size and (to tol) spacing, origin and direction."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol, rtol=0)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol * 1e3, rtol=0)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol, rtol=0)
    )


def ras_to_lps(point) -> np.ndarray:
    """RAS millimetres (Slicer) → LPS millimetres (ITK): negate x and y."""
    p = np.asarray(point, dtype=float)
    return p * np.array([-1.0, -1.0, 1.0])


lps_to_ras = ras_to_lps
