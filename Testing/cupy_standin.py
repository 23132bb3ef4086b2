"""A strict CuPy stand-in on numpy: the GPU code path, tested without a GPU.

`install(monkeypatch)` puts fake `cupy`, `cupyx.scipy.fft` and `cupyx.scipy.ndimage` modules
into sys.modules, so `backend.get_backend("gpu")` takes its CuPy branch for real. The arrays
are `cupy.ndarray` wrappers around numpy arrays that refuse what CuPy refuses, so host/device
mix-ups fail here as they would on a GPU instead of passing silently on numpy:

- implicit conversion to numpy (`np.asarray(a)`, `np.array(a)`) raises TypeError; `a.get()`
  is the explicit copy (backend.to_numpy uses it);
- a host numpy array (ndim ≥ 1) or a list as an operand of a device ufunc, operator or
  function, or as the value of `a[...] = v`, raises TypeError (CuPy: "Unsupported type");
  `cupy.asarray`/`cupy.array`/`cupy.ascontiguousarray` are the explicit host → device copy;
- reductions return 0-d device arrays, not numpy scalars (`float()`, `bool()`, `.item()`
  work, as on CuPy);
- `cupyx.scipy.fft` takes no `workers`; `cupy.ElementwiseKernel` runs the one kernel the
  package defines (interpolation's "gbm_cubic_lagrange") with numpy, checking its argument
  types, so the kernel's call is exercised too (its CUDA source is not compiled here).

What it cannot catch: CUDA compilation, device memory limits, speed, and numpy functions
CuPy lacks. It is a test helper, not a backend.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import scipy.fft
import scipy.ndimage

NAME = "CuPy stand-in (numpy, strict)"


def _host_error(where: str, x) -> TypeError:
    return TypeError(f"Unsupported type {type(x)} in {where}: a host array where CuPy needs a device array "
                     "(use cupy.asarray)")


def _unwrap(x, where: str, host_ok: bool = False):
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        if x.ndim > 0 and not host_ok:
            raise _host_error(where, x)
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, where, host_ok) for v in x)
    return x


def _wrap(r):
    if isinstance(r, np.ndarray):
        return ndarray(r)
    if isinstance(r, np.generic) and not isinstance(r, (np.str_, np.bytes_)):
        return ndarray(np.asarray(r))  # CuPy reductions give 0-d device arrays
    if isinstance(r, tuple):
        return tuple(_wrap(v) for v in r)
    if isinstance(r, list):
        return [_wrap(v) for v in r]
    return r


def _operand(x, where: str):
    if isinstance(x, list):
        raise TypeError(f"Unsupported type {type(x)} in {where} (CuPy takes no lists here)")
    return _unwrap(x, where)


def _call(f, args, kwargs, where: str):
    """f on the unwrapped (strictly: no host arrays) arguments, its result wrapped."""
    return _wrap(f(*_unwrap(args, where), **{k: _unwrap(v, where) for k, v in kwargs.items()}))


def _ufunc_call(ufunc, args, kwargs, where):
    a = [_operand(v, where) for v in args]
    kw = {k: _unwrap(v, where) for k, v in kwargs.items()}
    return _wrap(ufunc(*a, **kw))


class ndarray:  # noqa: N801 (CuPy's name)
    """A device array: a numpy array that refuses implicit host conversion."""

    __slots__ = ("_a",)
    __array_priority__ = 1000.0
    __hash__ = None

    def __init__(self, a):
        object.__setattr__(self, "_a", a)

    # -- explicit transfer and scalars ------------------------------------------------
    def get(self, stream=None, order="C", out=None):
        return np.array(self._a, order=order)

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
                        "construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        where = f"numpy.{ufunc.__name__}.{method}"
        a = [_operand(v, where) for v in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(_unwrap(v, where) for v in kwargs["out"])
        return _wrap(getattr(ufunc, method)(*a, **kwargs))

    def __array_function__(self, func, types_, args, kwargs):
        return _call(func, args, kwargs, f"numpy.{func.__name__}")

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __index__(self):
        return self._a.__index__()

    def __complex__(self):
        return complex(self._a)

    def __bool__(self):
        return bool(self._a)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        for v in self._a:
            yield _wrap(v)

    def __repr__(self):
        return f"stand-in device {self._a!r}"

    # -- indexing ----------------------------------------------------------------------
    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key, "indexing", host_ok=True)])

    def __setitem__(self, key, value):
        self._a[_unwrap(key, "indexing", host_ok=True)] = _operand(value, "__setitem__")

    # -- everything else the array has: unwrap the arguments strictly, wrap the result ----
    def __getattr__(self, name):
        if name == "_a" or name.startswith("__"):  # _a not yet set (copy, pickle); no
            raise AttributeError(name)  # __array_interface__ & co.: numpy would read them
        v = getattr(self._a, name)
        if callable(v):
            return lambda *args, **kwargs: _call(v, args, kwargs, f"ndarray.{name}")
        return _wrap(v)

    def __setattr__(self, name, value):
        setattr(self._a, name, _unwrap(value, f"ndarray.{name}"))


def _binary(ufunc, reflected=False):
    def op(self, other):
        args = (other, self) if reflected else (self, other)
        return _ufunc_call(ufunc, args, {}, f"operator {ufunc.__name__}")
    return op


def _inplace(ufunc):
    def op(self, other):
        ufunc(self._a, _operand(other, f"operator {ufunc.__name__}="), out=self._a)
        return self
    return op


for _name, _uf in {"add": np.add, "sub": np.subtract, "mul": np.multiply, "truediv": np.true_divide,
                   "floordiv": np.floor_divide, "mod": np.remainder, "pow": np.power, "matmul": np.matmul,
                   "and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor}.items():
    setattr(ndarray, f"__{_name}__", _binary(_uf))
    setattr(ndarray, f"__r{_name}__", _binary(_uf, reflected=True))
    if _name != "matmul":
        setattr(ndarray, f"__i{_name}__", _inplace(_uf))
for _name, _uf in {"lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
                   "eq": np.equal, "ne": np.not_equal}.items():
    setattr(ndarray, f"__{_name}__", _binary(_uf))
ndarray.__neg__ = lambda self: ndarray(-self._a)
ndarray.__pos__ = lambda self: ndarray(+self._a)
ndarray.__abs__ = lambda self: ndarray(abs(self._a))
ndarray.__invert__ = lambda self: ndarray(~self._a)
ndarray.__module__ = "cupy"  # what the package's "is this a CuPy array" checks look at


# ---- the module functions ---------------------------------------------------------------
_TRANSFER = {"asarray", "array", "asanyarray", "ascontiguousarray", "asfortranarray"}


def _function(name, f):
    if name in _TRANSFER:
        def transfer(a, *args, **kwargs):
            if isinstance(a, ndarray):
                return _wrap(f(a._a, *args, **kwargs))
            if isinstance(a, (list, tuple)) and any(isinstance(v, ndarray) for v in a):
                raise TypeError("Implicit conversion to a NumPy array is not allowed (a list holding device arrays; "
                                "use cupy.stack)")
            return ndarray(np.array(f(a, *args, **kwargs), copy=True))  # host → device: a copy
        return transfer
    if isinstance(f, np.ufunc):
        def call_ufunc(*args, **kwargs):
            return _ufunc_call(f, args, kwargs, f"cupy.{name}")
        return call_ufunc

    return lambda *args, **kwargs: _call(f, args, kwargs, f"cupy.{name}")


def _module_getattr(name):
    f = getattr(np, name)  # AttributeError for what numpy lacks
    if isinstance(f, type) or not callable(f):
        return f  # dtypes (cupy.float32 is numpy.float32), constants
    return _function(name, f)


def _cubic_lagrange(f, base, w, npts, pstride, out):
    """interpolation._cupy_kernel's loop over i, in numpy."""
    f, base, w, out_a = (_unwrap(v, "ElementwiseKernel") for v in (f, base, w, out))
    if not (f.dtype == w.dtype == out_a.dtype):
        raise TypeError(f"ElementwiseKernel: T must be one type, got f {f.dtype}, w {w.dtype}, out {out_a.dtype}")
    if base.dtype != np.int64 or base.shape != out_a.shape:
        raise TypeError(f"ElementwiseKernel: base must be int64 shaped like out, got {base.dtype} {base.shape}")
    if not isinstance(npts, (int, np.integer)) or not isinstance(pstride, (int, np.integer)):
        raise TypeError("ElementwiseKernel: npts and pstride must be integers")
    i = np.arange(out_a.size)
    acc0 = np.zeros(out_a.size, f.dtype)
    for a in range(4):
        acc1 = np.zeros(out_a.size, f.dtype)
        for b in range(4):
            o = base.ravel() + a * pstride * pstride + b * pstride
            acc2 = sum(f[o + c] * w[(8 + c) * npts + i] for c in range(4))
            acc1 += acc2 * w[(4 + b) * npts + i]
        acc0 += acc1 * w[a * npts + i]
    out_a[...] = acc0.reshape(out_a.shape)


class ElementwiseKernel:
    KERNELS = {"gbm_cubic_lagrange": _cubic_lagrange}
    calls = 0  # launches, over all kernels (a test can check the kernel path was taken)

    def __init__(self, in_params, out_params, operation, name="kernel", **kwargs):
        if name not in self.KERNELS:
            raise NotImplementedError(f"the CuPy stand-in has no kernel {name!r}")
        self.name = name

    def __call__(self, *args):
        ElementwiseKernel.calls += 1
        return self.KERNELS[self.name](*args)


def _fft_module():
    m = types.ModuleType("cupyx.scipy.fft")

    def make(name):
        f = getattr(scipy.fft, name)

        def fft(x, *args, **kwargs):
            if "workers" in kwargs:
                raise TypeError(f"cupyx.scipy.fft.{name}() got an unexpected keyword argument 'workers'")
            return _wrap(f(_unwrap(x, f"cupyx.scipy.fft.{name}"), *args, **kwargs))
        return fft

    for name in ("fftn", "ifftn", "rfftn", "irfftn", "fft", "ifft", "rfft", "irfft"):
        setattr(m, name, make(name))
    return m


def _ndimage_module():
    m = types.ModuleType("cupyx.scipy.ndimage")

    def getattr_(name):
        f = getattr(scipy.ndimage, name)

        return lambda *args, **kwargs: _call(f, args, kwargs, f"cupyx.scipy.ndimage.{name}")
    m.__getattr__ = getattr_
    return m


def modules() -> dict:
    """The fake modules, by import name."""
    cupy = types.ModuleType("cupy")
    cupy.__getattr__ = _module_getattr
    cupy.__version__ = "stand-in"
    cupy.ndarray = ndarray
    cupy.ElementwiseKernel = ElementwiseKernel
    cuda = types.ModuleType("cupy.cuda")
    runtime = types.ModuleType("cupy.cuda.runtime")
    runtime.getDeviceCount = lambda: 1
    runtime.getDeviceProperties = lambda i: {"name": NAME.encode()}

    class Device:
        def __init__(self, i=0):
            self.id = i

        def synchronize(self):
            pass
    cuda.runtime, cuda.Device = runtime, Device
    cupy.cuda = cuda
    cupyx = types.ModuleType("cupyx")
    sp = types.ModuleType("cupyx.scipy")
    fft, ndi = _fft_module(), _ndimage_module()
    sp.fft, sp.ndimage = fft, ndi
    cupyx.scipy = sp
    return {"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.runtime": runtime, "cupyx": cupyx,
            "cupyx.scipy": sp, "cupyx.scipy.fft": fft, "cupyx.scipy.ndimage": ndi}


def install(monkeypatch) -> None:
    """Make `import cupy` (and cupyx.scipy.fft / .ndimage) give the stand-in for one test."""
    for name, mod in modules().items():
        monkeypatch.setitem(sys.modules, name, mod)


def activate() -> None:
    """Install the stand-in for the rest of this process (for a script or a subprocess)."""
    sys.modules.update(modules())


if __name__ == "__main__":  # python Testing/cupy_standin.py ARGS: gbm-calibrate ARGS on the stand-in
    activate()
    from GBMMassEffectLib.cli import main

    sys.exit(main(sys.argv[1:]))
