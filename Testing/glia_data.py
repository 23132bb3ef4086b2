"""The reference solver's test volumes (glia-testdata, netCDF 64³): one reader for the tests."""
from __future__ import annotations

import numpy as np
import scipy.io


def read_nc(path, dtype=None) -> np.ndarray:
    """The `data` variable of a glia-testdata .nc file in GLIA's array axes, native byte order
    (stored big-endian), as `dtype` when given."""
    with scipy.io.netcdf_file(path, "r", mmap=False) as f:
        data = f.variables["data"].data
        return np.asarray(data, dtype=dtype or data.dtype.newbyteorder("="))
