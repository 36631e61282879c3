"""Pallas' Triton backend, imported in one place for every GPU kernel of the package.

jax 0.11 warns that this backend is deprecated.  A jax without it must still import the package
and run everything through the XLA implementations: `plgpu` is then None, `gpu_kernels()` is
False (every "auto" / default choice takes its XLA path, with one warning on a GPU), and a kernel
asked for by name raises a one-line error that names the jax version.
"""

from __future__ import annotations

import warnings

import jax

try:
    from jax.experimental.pallas import triton as plgpu
    _IMPORT_ERROR: str | None = None
except ImportError as err:  # a jax that has dropped (or never had) the Triton backend
    plgpu = None
    _IMPORT_ERROR = f"{type(err).__name__}: {err}"

_warned = False


def available() -> bool:
    """Whether this jax has Pallas' Triton backend (interpreter and GPU kernels need it)."""
    return plgpu is not None


def require(kernel: str) -> None:
    """Raise a clear error when `kernel` (a Pallas Triton kernel) cannot run with this jax."""
    if plgpu is None:
        raise RuntimeError(f"the Pallas kernel {kernel} needs Pallas' Triton backend, which jax "
                           f"{jax.__version__} does not have ({_IMPORT_ERROR}); choose the XLA "
                           f"implementation instead")


def gpu_kernels() -> bool:
    """Whether the defaults should pick the Pallas GPU kernels: the default backend is a GPU and
    the Triton backend imports.  On a GPU without it, warns once that the XLA paths run."""
    global _warned
    if jax.default_backend() != "gpu":
        return False
    if plgpu is None and not _warned:
        _warned = True
        warnings.warn(f"jax {jax.__version__} has no Pallas Triton backend ({_IMPORT_ERROR}): "
                      f"deformable attention, the matcher and SAM's kernels fall back to their "
                      f"XLA implementations, which are slower on a GPU", RuntimeWarning,
                      stacklevel=2)
    return plgpu is not None
