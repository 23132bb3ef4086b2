"""Array backend: one code path over numpy or cupy (ARCHITECTURE.md, "Backends").

`get_backend("auto"|"cpu"|"gpu", precision)` returns a `Backend` whose `xp` is the array
module, with FFTs that use all CPU cores on numpy and cuFFT on CuPy.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np


class DeviceError(RuntimeError):
    """The requested device cannot be used (e.g. device='gpu' without a working CuPy)."""


@dataclass(frozen=True)
class Backend:
    name: str  # "cpu" or "gpu"
    xp: ModuleType
    fft: ModuleType
    ndimage: ModuleType
    dtype: np.dtype
    fft_workers: int | None = None
    device_name: str = field(default="CPU")

    @property
    def complex_dtype(self):
        return np.result_type(self.dtype, np.complex64)

    def rfftn(self, a):
        """Real FFT over the last three axes (leading axes are batch)."""
        kw = {"workers": self.fft_workers} if self.fft_workers else {}
        return self.fft.rfftn(a, axes=(-3, -2, -1), **kw)

    def irfftn(self, a, n: int):
        kw = {"workers": self.fft_workers} if self.fft_workers else {}
        return self.fft.irfftn(a, s=(n, n, n), axes=(-3, -2, -1), **kw)

    def asarray(self, a):
        return self.xp.asarray(a, dtype=self.dtype)

    def to_numpy(self, a):
        return to_numpy(a)

    def synchronize(self):
        if self.name == "gpu":
            self.xp.cuda.Device().synchronize()


def to_numpy(a):
    """Host copy of an array from either backend."""
    if hasattr(a, "get"):
        return a.get()
    return np.asarray(a)


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one working CUDA device."""
    try:
        import cupy  # noqa: F401

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False
        cupy.zeros(1).sum().item()
        return True
    except Exception:
        return False


def _cpu_workers() -> int:
    env = os.environ.get("GBM_FFT_WORKERS")
    if env:
        return max(1, int(env))
    return os.cpu_count() or 1


def get_backend(device: str = "auto", precision: str = "float32") -> Backend:
    """Pick numpy or cupy. device: 'auto' (GPU when CuPy finds one), 'cpu', or 'gpu'."""
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be 'float32' or 'float64', not {precision!r}")
    dtype = np.dtype(precision)
    device = (device or "auto").lower()
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', not {device!r}")
    if device in ("auto", "gpu") and gpu_available():
        import cupy
        import cupyx.scipy.fft as cufft
        import cupyx.scipy.ndimage as cundimage

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        return Backend("gpu", cupy, cufft, cundimage, dtype, None, name)
    if device == "gpu":
        raise DeviceError(
            "device 'gpu' was requested but no usable CUDA GPU was found "
            "(install the 'gpu' extra, e.g. cupy-cuda12x, on a machine with an NVIDIA GPU, "
            "or use --device cpu)"
        )
    import scipy.fft
    import scipy.ndimage

    return Backend("cpu", np, scipy.fft, scipy.ndimage, dtype, _cpu_workers(), "CPU")
