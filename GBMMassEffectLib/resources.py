"""Where the bundled resources live (the default atlas set).

The bundled atlas set is found relative to this package, in this order:
  1. <package>/Resources/Atlases  -- a 3D Slicer extension install, where CMake copies
     the repository's Resources/Atlases next to the Python package;
  2. <repo>/Resources/Atlases     -- running from a source checkout or an editable
     (pip install -e) install, where the package sits in <repo>/GBMMassEffectLib.
A folder counts only when it holds an atlases.json manifest.
"""
from __future__ import annotations

import pathlib

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
MANIFEST_NAME = "atlases.json"


def atlas_dir_candidates() -> tuple[pathlib.Path, ...]:
    """The folders searched for the bundled atlas set, in search order."""
    return (
        PACKAGE_DIR / "Resources" / "Atlases",
        PACKAGE_DIR.parent / "Resources" / "Atlases",
    )


def default_atlas_dir() -> pathlib.Path:
    """Path of the bundled default atlas set (a folder with atlases.json).

    Raises FileNotFoundError naming the folders searched when none has a manifest."""
    for cand in atlas_dir_candidates():
        if (cand / MANIFEST_NAME).is_file():
            return cand
    searched = ", ".join(str(c) for c in atlas_dir_candidates())
    raise FileNotFoundError(
        f"the bundled atlas set was not found (no {MANIFEST_NAME} in: {searched}); "
        "give an atlas folder or label-map files explicitly, or rebuild it with "
        "scripts/build_atlases.py")
