"""Healthy-brain atlas sets and the atlas choice of MODEL.md §6 (stage S.2).

An atlas set is either
  * a folder with a manifest ``atlases.json`` (see Resources/Atlases/README.md):
        {"licences": {...}, "atlases": [{"name": ..., "labels": "x_labels.nrrd",
          "t1": "x_t1.nrrd", "ventricle_ml": ..., "brain_ml": ..., "voxel_mm": [...],
          "source": ..., "synthetic": false, "seed": null, "provenance": ...,
          "licence": ...}, ...]}
    where only "name" and "labels" are required, paths are relative to the folder; or
  * one or more label-map files given directly (NRRD, NIfTI, MHA: anything SimpleITK
    reads), each one atlas named after its file.
Label maps use the project numbering 0 background, 5 gm, 6 wm, 7 (lateral) ventricles,
8 other CSF. Loading validates every atlas and raises AtlasError (a ValueError) naming
the atlas and the problem.

Atlas choice (MODEL §6, S.2): atlases whose ventricle volume is within [1, 1.3]x the
patient's; only when fewer than 4 qualify, widen to [1, 1.5]x, then add the nearest
(smallest |ln(V_atlas / V_patient)|) until 4; at most 8, nearest first.

When the tumour hides part of the patient's ventricles, select_atlases_by_match chooses by
how well each atlas's anatomy matches the patient's outside the tumour (a deviation from §6;
see its docstring).
"""
from __future__ import annotations

import json
import math
import pathlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from .resources import MANIFEST_NAME, default_atlas_dir

BACKGROUND, GM, WM, VT, CSF = 0, 5, 6, 7, 8
LABEL_VALUES = {"background": BACKGROUND, "gm": GM, "wm": WM, "vt": VT, "csf": CSF}
VALID_LABELS = frozenset(LABEL_VALUES.values())

WINDOW = (1.0, 1.3)      # primary ventricle-volume ratio window (atlas / patient)
WIDE_WINDOW = (1.0, 1.5)  # widened window, used when fewer than MIN_ATLASES qualify
MIN_ATLASES = 4
MAX_ATLASES = 8
MATCH_WINDOW = 1.3       # registration-match choice: V_atlas / V_best within [1/1.3, 1.3]
VOLUME_RTOL = 0.02       # manifest ventricle_ml vs the label map
BUNDLED_NAMES = ("bundled", "default")
_EXTS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class AtlasError(ValueError):
    """An atlas set or one of its atlases is unusable; the message says which and why."""


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError as exc:  # pragma: no cover - SimpleITK is a runtime dependency
        raise AtlasError("reading atlases needs SimpleITK (pip install SimpleITK)") from exc
    return sitk


# ---------------------------------------------------------------- one atlas
@dataclass(frozen=True)
class Atlas:
    """One healthy atlas: a label map (0/5/6/7/8), an optional T1 and its provenance."""

    name: str
    labels_path: pathlib.Path
    ventricle_ml: float
    brain_ml: float
    voxel_mm: tuple[float, float, float]
    t1_path: pathlib.Path | None = None
    source: str = "user"
    synthetic: bool = False
    seed: int | None = None
    provenance: str = ""
    licence: str = ""
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def read_labels(self):
        """The label map as a SimpleITK image (uint8, 3-D)."""
        return _read_labels(self.labels_path, self.name)[0]

    def read_t1(self):
        """The T1 image (SimpleITK) or None when the atlas has none."""
        if self.t1_path is None:
            return None
        return _squeeze(_sitk().ReadImage(str(self.t1_path)), self.name, "T1")

    def label_array(self) -> np.ndarray:
        """Labels as a numpy uint8 array, axis order (z, y, x)."""
        return _sitk().GetArrayFromImage(self.read_labels())

    def tissue_maps(self, dtype=np.float32) -> dict[str, np.ndarray]:
        """Indicator maps {"wm", "gm", "vt", "csf"} (MODEL §1 m), axis order (z, y, x)."""
        lab = self.label_array()
        return {k: (lab == LABEL_VALUES[k]).astype(dtype) for k in ("wm", "gm", "vt", "csf")}


@dataclass(frozen=True)
class AtlasSet:
    """A validated, ordered collection of atlases (from a manifest or label maps)."""

    atlases: tuple[Atlas, ...]
    root: pathlib.Path | None = None
    licences: dict = field(default_factory=dict)
    description: str = ""

    def __len__(self) -> int:
        return len(self.atlases)

    def __iter__(self) -> Iterator[Atlas]:
        return iter(self.atlases)

    def __getitem__(self, key: int | str) -> Atlas:
        if isinstance(key, str):
            for a in self.atlases:
                if a.name == key:
                    return a
            raise KeyError(f"no atlas named {key!r} (have: {', '.join(self.names)})")
        return self.atlases[key]

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.atlases]


# ---------------------------------------------------------------- volumes
def ventricle_volume_ml(labels, spacing: Sequence[float] | None = None,
                        label: int = VT) -> float:
    """Volume of `label` (default 7, ventricles) in mL.

    `labels` is a SimpleITK image (spacing from its header) or a numpy array with
    `spacing` in mm."""
    if hasattr(labels, "GetSpacing"):
        spacing = labels.GetSpacing()
        labels = _sitk().GetArrayViewFromImage(labels)
    if spacing is None:
        raise ValueError("ventricle_volume_ml: give the voxel spacing (mm) with an array")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return float(np.count_nonzero(np.asarray(labels) == label)) * voxel_ml


# ---------------------------------------------------------------- reading / checks
def _squeeze(img, name: str, what: str):
    sitk = _sitk()
    while img.GetDimension() > 3 and img.GetSize()[-1] == 1:
        size = list(img.GetSize())
        img = sitk.Extract(img, size[:-1] + [0], [0] * len(size))
    if img.GetDimension() != 3:
        raise AtlasError(f"atlas {name!r}: {what} is {img.GetDimension()}-D "
                         f"(size {img.GetSize()}); a 3-D image is needed")
    return img


def _read_labels(path: pathlib.Path, name: str):
    sitk = _sitk()
    if not path.is_file():
        raise AtlasError(f"atlas {name!r}: label map file {path} not found")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise AtlasError(f"atlas {name!r}: label map {path} cannot be read "
                         f"({str(exc).strip().splitlines()[-1]})") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise AtlasError(f"atlas {name!r}: label map {path.name} has "
                         f"{img.GetNumberOfComponentsPerPixel()} components per voxel")
    img = _squeeze(img, name, f"label map {path.name}")
    a = sitk.GetArrayViewFromImage(img)
    values = np.unique(a)
    if a.dtype.kind == "f" and not np.all(values == np.round(values)):
        raise AtlasError(f"atlas {name!r}: label map {path.name} has non-integer values")
    bad = sorted(set(values.astype(np.int64).tolist()) - VALID_LABELS)
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (" ..." if len(bad) > 8 else "")
        raise AtlasError(
            f"atlas {name!r}: label map {path.name} has labels {shown} outside "
            "{0 background, 5 gm, 6 wm, 7 ventricles, 8 csf}; relabel it to this numbering")
    if VT not in values:
        raise AtlasError(f"atlas {name!r}: label map {path.name} has no ventricles "
                         "(no voxel labelled 7); the atlas choice needs a ventricle volume")
    if a.dtype != np.uint8:
        img = sitk.Cast(img, sitk.sitkUInt8)
    return img, values


def _check_t1_geometry(t1_path: pathlib.Path, labels, name: str) -> None:
    sitk = _sitk()
    if not t1_path.is_file():
        raise AtlasError(f"atlas {name!r}: T1 file {t1_path} not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(t1_path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise AtlasError(f"atlas {name!r}: T1 {t1_path} cannot be read") from None
    size = tuple(reader.GetSize())
    while len(size) > 3 and size[-1] == 1:
        size = size[:-1]
    dim = len(size)
    if dim != 3:
        raise AtlasError(f"atlas {name!r}: T1 {t1_path.name} is {dim}-D; a 3-D image is needed")
    checks = (
        ("size", size, labels.GetSize(), 0),
        ("spacing", reader.GetSpacing()[:3], labels.GetSpacing(), 1e-4),
        ("origin", reader.GetOrigin()[:3], labels.GetOrigin(), 1e-3),
        ("direction", _dir3(reader.GetDirection()), labels.GetDirection(), 1e-4),
    )
    for what, got, want, tol in checks:
        if len(got) != len(want) or not np.allclose(got, want, atol=tol, rtol=0):
            raise AtlasError(
                f"atlas {name!r}: T1 {t1_path.name} does not match the label map geometry "
                f"({what} {tuple(np.round(got, 4))} vs {tuple(np.round(want, 4))}); "
                "resample the T1 onto the label map grid")


def _dir3(direction):
    d = np.asarray(direction, float)
    n = int(round(math.sqrt(d.size)))
    return tuple(d.reshape(n, n)[:3, :3].ravel())


def _stem(path: pathlib.Path) -> str:
    name = path.name
    for ext in _EXTS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _make_atlas(name: str, labels_path: pathlib.Path, t1_path: pathlib.Path | None,
                meta: dict) -> Atlas:
    img, _ = _read_labels(labels_path, name)
    if t1_path is not None:
        _check_t1_geometry(t1_path, img, name)
    spacing = tuple(float(s) for s in img.GetSpacing())
    vt_ml = ventricle_volume_ml(img)
    a = _sitk().GetArrayViewFromImage(img)
    brain_ml = float(np.count_nonzero(a)) * float(np.prod(spacing)) / 1000.0

    if meta.get("ventricle_ml") is not None:
        claimed = _number(meta["ventricle_ml"], name, "ventricle_ml")
        if abs(claimed - vt_ml) > VOLUME_RTOL * vt_ml + 0.05:
            raise AtlasError(
                f"atlas {name!r}: manifest ventricle_ml {claimed:g} mL but the label map "
                f"{labels_path.name} has {vt_ml:.2f} mL of label 7; fix or drop ventricle_ml")
    if meta.get("voxel_mm") is not None:
        vox = meta["voxel_mm"]
        vox = [vox] * 3 if isinstance(vox, (int, float)) else vox
        if (not isinstance(vox, list) or len(vox) != 3
                or not np.allclose([_number(v, name, "voxel_mm") for v in vox], spacing,
                                   atol=1e-3)):
            raise AtlasError(f"atlas {name!r}: manifest voxel_mm {meta['voxel_mm']} but "
                             f"the label map spacing is {spacing}")
    seed = meta.get("seed")
    if seed is not None and not isinstance(seed, int):
        raise AtlasError(f"atlas {name!r}: seed must be an integer or null, got {seed!r}")
    synthetic = meta.get("synthetic", False)
    if not isinstance(synthetic, bool):
        raise AtlasError(f"atlas {name!r}: synthetic must be true or false, got {synthetic!r}")
    known = {"name", "labels", "t1", "ventricle_ml", "brain_ml", "voxel_mm", "source",
             "synthetic", "seed", "provenance", "licence"}
    return Atlas(
        name=name, labels_path=labels_path, t1_path=t1_path, ventricle_ml=vt_ml,
        brain_ml=brain_ml, voxel_mm=spacing, source=str(meta.get("source", "user")),
        synthetic=synthetic, seed=seed, provenance=str(meta.get("provenance", "")),
        licence=str(meta.get("licence", "")),
        extra={k: v for k, v in meta.items() if k not in known})


def _number(v, name, what) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise AtlasError(f"atlas {name!r}: {what} must be a finite number, got {v!r}")
    return float(v)


# ---------------------------------------------------------------- loading
def load_manifest(path: str | pathlib.Path) -> AtlasSet:
    """Load and validate an atlas set from atlases.json (or the folder holding it)."""
    path = pathlib.Path(path)
    manifest = path / MANIFEST_NAME if path.is_dir() else path
    if not manifest.is_file():
        raise AtlasError(f"atlas set {path}: no {MANIFEST_NAME} found. Write one (see "
                         "Resources/Atlases/README.md, or `python -m "
                         "GBMMassEffectLib.atlases make-manifest FOLDER`) or give the "
                         "label-map files directly")
    root = manifest.parent
    try:
        doc = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AtlasError(f"atlas manifest {manifest} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("atlases"), list):
        raise AtlasError(f"atlas manifest {manifest}: needs an object with an "
                         "\"atlases\" list")
    if not doc["atlases"]:
        raise AtlasError(f"atlas manifest {manifest}: the \"atlases\" list is empty")
    atlases, seen = [], set()
    for i, entry in enumerate(doc["atlases"]):
        if not isinstance(entry, dict):
            raise AtlasError(f"atlas manifest {manifest}: entry {i} is not an object")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise AtlasError(f"atlas manifest {manifest}: entry {i} has no \"name\"")
        if name in seen:
            raise AtlasError(f"atlas manifest {manifest}: atlas name {name!r} repeated")
        seen.add(name)
        if not isinstance(entry.get("labels"), str):
            raise AtlasError(f"atlas {name!r} in {manifest}: no \"labels\" file given")
        t1 = entry.get("t1")
        if t1 is not None and not isinstance(t1, str):
            raise AtlasError(f"atlas {name!r} in {manifest}: \"t1\" must be a file name")
        atlases.append(_make_atlas(name, root / entry["labels"],
                                   root / t1 if t1 else None, entry))
    lic = doc.get("licences", {})
    return AtlasSet(tuple(atlases), root, lic if isinstance(lic, dict) else {},
                    str(doc.get("description", "")))


def load_label_maps(paths: Iterable[str | pathlib.Path]) -> AtlasSet:
    """An atlas set from label-map files given directly (one atlas per file, no T1)."""
    atlases, names = [], set()
    for p in paths:
        p = pathlib.Path(p)
        name = base = _stem(p)
        k = 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.add(name)
        atlases.append(_make_atlas(name, p, None, {
            "source": "user", "provenance": f"label map given directly: {p}",
            "licence": "user-supplied"}))
    if not atlases:
        raise AtlasError("no atlas label maps given")
    return AtlasSet(tuple(atlases), None, {}, "label maps given directly")


def load_atlas_set(source=None) -> AtlasSet:
    """Load and validate an atlas set.

    source: None or "bundled"/"default" (the bundled default set), a folder with
    atlases.json, a manifest file (*.json), one label-map file, or a list of label-map
    files."""
    if source is None or (isinstance(source, str) and source in BUNDLED_NAMES):
        return load_manifest(default_atlas_dir())
    if isinstance(source, AtlasSet):
        return source
    if isinstance(source, (str, pathlib.Path)):
        p = pathlib.Path(source)
        if p.is_dir() or p.suffix.lower() == ".json":
            return load_manifest(p)
        if not p.exists():
            raise AtlasError(f"atlas set {p}: no such file or folder")
        return load_label_maps([p])
    return load_label_maps(list(source))


# ---------------------------------------------------------------- atlas choice (§6)
@dataclass(frozen=True)
class AtlasChoice:
    """One chosen atlas, its ventricle ratio V_atlas / V_patient and why it was chosen."""

    atlas: Atlas
    ratio: float
    reason: str


@dataclass(frozen=True)
class AtlasSelection:
    """The atlases chosen for one patient (nearest first) and the rule that applied."""

    choices: tuple[AtlasChoice, ...]
    patient_ventricle_ml: float
    rule: str  # "window", "widened" or "widened+nearest"; "registration match" (see
    # select_atlases_by_match, where patient_ventricle_ml is the best-matching atlas's volume)
    excluded: tuple[AtlasChoice, ...] = ()

    @property
    def atlases(self) -> list[Atlas]:
        return [c.atlas for c in self.choices]

    def __iter__(self) -> Iterator[AtlasChoice]:
        return iter(self.choices)

    def __len__(self) -> int:
        return len(self.choices)

    def summary(self) -> str:
        lines = [f"patient ventricles {self.patient_ventricle_ml:.1f} mL; rule: {self.rule}"]
        lines += [f"  {c.atlas.name}: {c.ratio * self.patient_ventricle_ml:.1f} mL (x{c.ratio:.2f}) - "
                  f"{c.reason}" for c in self.choices]
        return "\n".join(lines)


def select_atlases(atlas_set, patient_ventricle_ml: float,
                   max_atlases: int = MAX_ATLASES,
                   min_atlases: int = MIN_ATLASES) -> AtlasSelection:
    """MODEL §6 atlas choice by ventricle volume.

    Take atlases with V_atlas / V_patient in [1, 1.3]; only when fewer than
    `min_atlases` (4) qualify, widen to [1, 1.5], then add the nearest remaining ones
    (smallest |ln ratio|) up to `min_atlases`; keep at most `max_atlases` (8), nearest
    to the patient first (ties by name)."""
    atlases = list(atlas_set.atlases if isinstance(atlas_set, AtlasSet) else atlas_set)
    if not atlases:
        raise AtlasError("select_atlases: the atlas set is empty")
    v = patient_ventricle_ml
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"select_atlases: patient ventricle volume must be a positive "
                         f"number of mL, got {v!r}")
    if int(max_atlases) != max_atlases or max_atlases < 1:
        raise ValueError(f"select_atlases: max_atlases must be a positive integer, "
                         f"got {max_atlases!r}")
    need = min(int(min_atlases), int(max_atlases), len(atlases))

    def ratio(a):
        return float(a.ventricle_ml) / v

    def key(a):
        return (abs(math.log(ratio(a))) if ratio(a) > 0 else math.inf, a.name)

    def within(a, win):
        return win[0] <= ratio(a) <= win[1]

    lo, hi = WINDOW
    reasons = {a.name: f"ventricle ratio {ratio(a):.2f} within [{lo:g}, {hi:g}]"
               for a in atlases if within(a, WINDOW)}
    rule = "window"
    if len(reasons) < need:
        rule = "widened"
        wlo, whi = WIDE_WINDOW
        for a in atlases:
            if a.name not in reasons and within(a, WIDE_WINDOW):
                reasons[a.name] = (f"ventricle ratio {ratio(a):.2f} within widened "
                                   f"[{wlo:g}, {whi:g}] (fewer than {need} in "
                                   f"[{lo:g}, {hi:g}])")
        if len(reasons) < need:
            rule = "widened+nearest"
            rest = sorted((a for a in atlases if a.name not in reasons), key=key)
            for a in rest[: need - len(reasons)]:
                reasons[a.name] = (f"nearest remaining, ventricle ratio {ratio(a):.2f} "
                                   f"(fewer than {need} in [{wlo:g}, {whi:g}])")
    chosen = sorted((a for a in atlases if a.name in reasons), key=key)
    keep, drop = chosen[: int(max_atlases)], chosen[int(max_atlases):]
    return AtlasSelection(
        tuple(AtlasChoice(a, ratio(a), reasons[a.name]) for a in keep), float(v), rule,
        tuple(AtlasChoice(a, ratio(a), f"beyond the cap of {int(max_atlases)} atlases")
              for a in drop))


def select_atlases_by_match(atlas_set, match: Mapping[str, float], n_atlases: int = MIN_ATLASES,
                            window: float = MATCH_WINDOW) -> AtlasSelection:
    """Atlas choice when a tumour hides part of the patient's ventricles (a deviation from §6).

    §6 compares ventricle volumes, and a hidden part makes the patient's short. Comparing
    the visible part with each atlas's ventricles outside the registered tumour is biased
    too: the mass effect pushes ventricle out from under the tumour, so the patient's own
    atlas keeps 0.43-1.00 of the visible volume there, below 1 on ten synthetic patients
    (benchmarks/ACCURACY.md), and [1, 1.3] then picks atlases with larger ventricles.
    Here match (name -> score, higher is better; calibrate passes the mean Dice of the
    tissue channels outside the tumour after S.2's affine registration) finds the
    best-matching atlas, whose whole ventricle volume V_best stands for the patient's before
    the tumour; the others come from those with V_atlas / V_best in [1/window, window],
    best match first, then the nearest in volume (|ln ratio|) up to n_atlases (calibrate:
    --atlases K, or MIN_ATLASES). Atlases without a score are left out. AtlasChoice.ratio
    is V_atlas / V_best."""
    atlases = list(atlas_set.atlases if isinstance(atlas_set, AtlasSet) else atlas_set)
    if isinstance(n_atlases, bool) or int(n_atlases) != n_atlases or n_atlases < 1:
        raise ValueError(f"select_atlases_by_match: n_atlases must be a positive integer, got {n_atlases!r}")
    if not (isinstance(window, (int, float)) and window >= 1):
        raise ValueError(f"select_atlases_by_match: window must be a number >= 1, got {window!r}")
    for name, sc in match.items():
        if isinstance(sc, bool) or not isinstance(sc, (int, float)) or not math.isfinite(sc):
            raise ValueError(f"select_atlases_by_match: the match score of atlas {name!r} must be a finite "
                             f"number, got {sc!r}")
    scored = [a for a in atlases if a.name in match]
    if not scored:
        raise AtlasError("select_atlases_by_match: no atlas of the set has a match score")
    scored.sort(key=lambda a: (-match[a.name], a.name))
    best = scored[0]
    v_ref = float(best.ventricle_ml)

    def ratio(a):
        return float(a.ventricle_ml) / v_ref

    inside = [a for a in scored if 1 / window <= ratio(a) <= window]
    keep = inside[: int(n_atlases)]
    reasons = {a.name: (f"best anatomical match (score {match[a.name]:.3f}); its {v_ref:.1f} mL ventricles stand "
                        f"for the patient's" if a is best else
                        f"match score {match[a.name]:.3f}, ventricles x{ratio(a):.2f} the best match's "
                        f"(within [{1 / window:.2f}, {window:g}])") for a in keep}
    if len(keep) < n_atlases:
        rest = sorted((a for a in scored if a.name not in reasons), key=lambda a: (abs(math.log(ratio(a))), a.name))
        for a in rest[: int(n_atlases) - len(keep)]:
            reasons[a.name] = (f"nearest remaining in ventricle volume (x{ratio(a):.2f} the best match's), "
                               f"match score {match[a.name]:.3f}")
            keep.append(a)
    excluded = tuple(AtlasChoice(a, ratio(a), "not chosen: other atlases match better")
                     for a in scored if a.name not in reasons)
    return AtlasSelection(tuple(AtlasChoice(a, ratio(a), reasons[a.name]) for a in keep), v_ref,
                          "registration match", excluded)


# ---------------------------------------------------------------- user folders
def make_manifest(folder: str | pathlib.Path, pattern: str = "*_labels.*",
                  licence: str = "user-supplied", overwrite: bool = False) -> pathlib.Path:
    """Write atlases.json for a folder of the user's own healthy subjects.

    Every file matching `pattern` is one atlas (named by the part before "_labels");
    a file with "_labels" replaced by "_t1" is its T1. Each is validated as on load."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise AtlasError(f"make_manifest: {folder} is not a folder")
    out = folder / MANIFEST_NAME
    if out.exists() and not overwrite:
        raise AtlasError(f"make_manifest: {out} exists (pass overwrite=True to replace it)")
    files = sorted(p for p in folder.glob(pattern) if p.is_file())
    if not files:
        raise AtlasError(f"make_manifest: no label maps matching {pattern!r} in {folder}")
    entries = []
    for p in files:
        stem = _stem(p)
        name = stem[: -len("_labels")] if stem.endswith("_labels") else stem
        t1 = next((q for q in (p.with_name(p.name.replace("_labels", "_t1", 1)),)
                   if q != p and q.is_file()), None)
        a = _make_atlas(name, p, t1, {})
        entries.append({
            "name": name, "labels": p.name, "t1": t1.name if t1 else None,
            "ventricle_ml": round(a.ventricle_ml, 2), "brain_ml": round(a.brain_ml, 2),
            "voxel_mm": list(a.voxel_mm), "source": "user", "synthetic": False,
            "seed": None, "provenance": "user-supplied healthy subject", "licence": licence})
    out.write_text(json.dumps({"format": "GBMMassEffect atlas set", "format_version": 1,
                               "label_values": LABEL_VALUES, "licences": {},
                               "atlases": entries}, indent=2) + "\n")
    return out


def _main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m GBMMassEffectLib.atlases",
                                 description="Inspect atlas sets or write a manifest.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("show", help="validate an atlas set and list it")
    s.add_argument("source", nargs="*", help="folder, manifest or label maps (default: bundled)")
    s.add_argument("--patient-ventricle-ml", type=float, help="also show the §6 atlas choice")
    m = sub.add_parser("make-manifest", help="write atlases.json for a folder of label maps")
    m.add_argument("folder")
    m.add_argument("--pattern", default="*_labels.*")
    m.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "make-manifest":
            print(make_manifest(args.folder, args.pattern, overwrite=args.overwrite))
            return 0
        src = None if not args.source else (args.source[0] if len(args.source) == 1
                                             else args.source)
        aset = load_atlas_set(src)
        for a in aset:
            print(f"{a.name:16s} vt {a.ventricle_ml:6.1f} mL  brain {a.brain_ml:7.1f} mL  "
                  f"{'synthetic' if a.synthetic else 'real':9s} {a.source}")
        if args.patient_ventricle_ml:
            print(select_atlases(aset, args.patient_ventricle_ml).summary())
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
