"""Backend registry and the automatic choice between backends.

A backend is a pair of ``torch.library`` ops (see ``ops.py``) plus the devices it
runs on. ``"auto"`` picks, per device: CUDA -> triton, else the CUDA extension,
else the reference; CPU -> the C++ kernel, else the reference. The environment
variable ``FUSEDLOSS_BACKEND`` overrides ``"auto"``. Kernel backends are loaded
lazily on first use, so importing fusedloss never compiles or launches anything.
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
BACKEND_ENV = "FUSEDLOSS_BACKEND"

#: Preference order of "auto" per device type.
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


@dataclass(frozen=True)
class Backend:
    name: str
    fwd: Callable            # fusedloss::<name>_fwd
    bwd: Callable            # fusedloss::<name>_bwd
    supports: Callable[[torch.device], bool]
    fused_grad: bool = False  # forward can return the gradient (compute_grad=True)
    # inplace_backward=True: (logits, target, weight, <scalars>) -> loss, differentiable; the
    # forward writes the gradient into the logits' storage (the logits are consumed).
    fwd_inplace: Callable | None = None
    # Class-probability targets (ce): fusedloss::<name>_soft_fwd / _soft_bwd (ops.SOFT_*_SCHEMA);
    # None: the functional runs the reference's on this device.
    soft_fwd: Callable | None = None
    # Class-probability targets for every loss (the expected loss): fusedloss::<name>_soft_loss_fwd
    # (ops.SOFT_LOSS_*_SCHEMA); None: the functional runs the reference's on this device.
    soft_loss_fwd: Callable | None = None
    # Whether fwd/mix_fwd give label smoothing's term for loss != 'ce' as the expected loss
    # (eps / C) sum_k w_k L(x, k) (docs/losses.md). False: the functional raises NotImplementedError
    # for label_smoothing > 0 with loss != 'ce' on this backend (never the older smoothed-CE number).
    expected_smoothing: bool = False
    # Mixup's two targets: fusedloss::<name>_mix_fwd (mixup.MIX_FWD_SCHEMA); None: two passes.
    mix_fwd: Callable | None = None
    # Which (variant, softcap) the mix op fuses; the others run two passes of fwd.
    mix_fuses: Callable[[int, float], bool] = lambda variant, softcap: True
    # bce of a vocabulary-parallel row given its global numbers (ops.BCE_PARTIAL_SCHEMA,
    # ops.BCE_GLOBAL_BWD_SCHEMA); None: parallel.py's PyTorch passes.
    bce_partial: Callable | None = None
    bce_global_bwd: Callable | None = None


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why and how to get it."""


def check_smoothing(be: Backend, variant: int, label_smoothing: float) -> None:
    """Raise where ``be`` has not been updated to the expected-loss label smoothing of a loss other
    than ce (its kernels would give the older smoothed-CE term: a silent difference)."""
    if label_smoothing > 0 and variant != 0 and not be.expected_smoothing:
        raise NotImplementedError(
            f"label_smoothing > 0 with a loss other than 'ce' is not implemented by backend {be.name!r} yet "
            "(label smoothing is the expected loss (eps / C) sum_k w_k L(x, k) for every loss, docs/losses.md); "
            "use backend='cpu' (CPU tensors) or backend='reference' (any device), or label_smoothing=0")


_registry: dict[str, Backend] = {}
_load_errors: dict[str, str] = {}
_warned: set[str] = set()

# Modules whose import registers a backend (they call register()).
_LOADERS: dict[str, tuple[str, str]] = {
    "reference": ("fusedloss._reference_backend", "always available"),
    "cpu": ("fusedloss._cpp_backend", "build the C++ extension: `pip install -e . --no-build-isolation` with a C++ compiler"),
    "cuda": ("fusedloss._cpp_backend", "build the extension with nvcc and a CUDA build of torch (FUSEDLOSS_BUILD_CUDA=1)"),
    "triton": ("fusedloss.triton_kernels.backend", "`pip install triton` and run on a CUDA GPU (or set TRITON_INTERPRET=1 for the CPU interpreter)"),
}


def register(backend: Backend) -> None:
    _registry[backend.name] = backend


def _load(name: str) -> Backend | None:
    if name in _registry:
        return _registry[name]
    if name in _load_errors:
        return None
    module, _ = _LOADERS[name]
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "not available", with the reason kept
        _load_errors[name] = f"{type(e).__name__}: {e}"
        return None
    if name not in _registry:
        _load_errors[name] = "not built into this install"
    return _registry.get(name)


def unavailable_reason(name: str, device: torch.device | None = None) -> str | None:
    """Why ``name`` cannot run (on ``device``, if given), or None if it can."""
    if name not in _LOADERS:
        return f"unknown backend {name!r}; choose one of {', '.join(('auto',) + BACKENDS)}"
    be = _load(name)
    hint = _LOADERS[name][1]
    if be is None:
        return f"backend {name!r} is not available ({_load_errors.get(name)}); to get it: {hint}"
    if device is not None and not be.supports(device):
        return f"backend {name!r} does not run on {device.type} tensors; to get it: {hint}"
    return None


def available_backends() -> list[str]:
    """The backends this install can run on at least one of its devices, e.g.
    ``["reference", "cpu", "triton", "cuda"]``."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [n for n in BACKENDS if any(unavailable_reason(n, d) is None for d in devices)]


def resolve(backend: str, device: torch.device) -> Backend:
    """The backend to run for ``device``: ``backend`` itself, or the automatic choice."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string; got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto") or "auto"
    if backend != "auto":
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise BackendUnavailableError(reason)
        return _registry[backend]
    order = AUTO_ORDER.get(device.type, ("reference",))
    for name in order:
        if unavailable_reason(name, device) is None:
            if name == "reference" and order[0] != "reference":
                _warn_fallback_once(order[0], device)
            return _registry[name]
    raise BackendUnavailableError(f"no backend runs on {device}")  # reference runs anywhere: unreachable


def _warn_fallback_once(preferred: str, device: torch.device) -> None:
    if device.type in _warned:
        return
    _warned.add(device.type)
    warnings.warn(
        f"fusedloss: no fused kernel for {device.type} tensors ({unavailable_reason(preferred, device)}); "
        "using the exact PyTorch reference backend",
        stacklevel=4,
    )
