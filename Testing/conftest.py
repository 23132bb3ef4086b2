"""Shared pytest fixtures: paths to the reference test data and small helpers."""
from __future__ import annotations

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _find_reference() -> pathlib.Path | None:
    for cand in (
        REPO / "Testing" / "Data" / "glia-testdata",
        REPO.parent / "shared" / "reference" / "glia-testdata",
    ):
        if (cand / "sinusoid.nc").exists():
            return cand
    return None


@pytest.fixture(scope="session")
def glia_testdata() -> pathlib.Path:
    path = _find_reference()
    if path is None:
        pytest.fail("reference test data (glia-testdata) not found")
    return path
