"""Backend registry and the automatic choice between backends.

A backend is its op families (``torch.library`` ops, see ``ops.py``; :class:`Backend`) plus the
devices it runs on. ``"auto"`` picks, per device: CUDA -> triton, else the CUDA extension,
else the reference; CPU -> the C++ kernel, else the reference. The environment
variable ``FUSEDLOSS_BACKEND`` overrides ``"auto"``. ``import fusedloss`` loads the backends
that can run on this machine's devices (:func:`preload`); importing one compiles and launches
nothing. The others are loaded on first use.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from .ops import OneTargetOps

BACKENDS = ("reference", "cpu", "triton", "cuda")
BACKEND_ENV = "FUSEDLOSS_BACKEND"

#: Preference order of "auto" per device type.
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


F = TypeVar("F")


@dataclass(frozen=True)
class Backend:
    """A backend: its name, the devices it runs on, and one op family per target form it
    implements, each a small frozen dataclass defined beside that form's op schemas:

    * ``ops.OneTargetOps`` (an integer class per row; every backend has it: :attr:`one_target`),
    * ``ops.ProbsOps`` (class probabilities), ``mixup.TwoTargetOps`` (mixup's two targets),
    * ``ops.SplitVocabOps`` (bce of a vocabulary-parallel row given its global numbers).

    ``family(Kind)`` is the backend's family of that kind, or None. The one fallback rule: a
    form whose family a backend lacks runs that form's PyTorch path, written once beside the
    form (the reference's formulas, around this backend's one-target ops where the form needs
    them): class probabilities the reference's op, mixup two passes of ``one_target.fwd``, the
    vocabulary-parallel bce ``parallel``'s PyTorch passes. A new target form adds its family
    class and PyTorch path beside its reference, and one entry to each backend that has
    kernels for it; this class does not change."""
    name: str
    supports: Callable[[torch.device], bool]
    families: tuple = ()

    def __post_init__(self):
        kinds = [type(f) for f in self.families]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"backend {self.name!r}: one family per kind; got {[k.__name__ for k in kinds]}")
        if OneTargetOps not in kinds:
            raise ValueError(f"backend {self.name!r}: every backend has the one-target ops (ops.OneTargetOps)")

    def family(self, kind: type[F]) -> F | None:
        """This backend's op family ``kind`` (e.g. ``ops.ProbsOps``), or None: the form's PyTorch path."""
        for f in self.families:
            if type(f) is kind:
                return f
        return None

    def without(self, kind: type) -> Backend:
        """This backend less its family ``kind``: the form's PyTorch path (e.g. for a test)."""
        return dataclasses.replace(self, families=tuple(f for f in self.families if type(f) is not kind))

    @property
    def one_target(self) -> OneTargetOps:
        """The one-target ops: fwd, bwd, fused_grad, fwd_inplace."""
        return self.family(OneTargetOps)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why and how to get it."""


def check_smoothing(be: Backend, variant: int, label_smoothing: float) -> None:
    """Raise where ``be`` has not been updated to the expected-loss label smoothing of a loss other
    than ce (its kernels would give the older smoothed-CE term: a silent difference)."""
    if label_smoothing > 0 and variant != 0 and not be.one_target.expected_smoothing:
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


#: (backend, device type, FUSEDLOSS_BACKEND's raw value when backend is "auto") -> ``(fwd, ops)``: the
#: one-target ops that choice resolves to, where they check their own arguments
#: (``OneTargetOps.checked_op``), and the callable of their forward op; else None. What the
#: functional's eager fast path calls (:func:`checked_one_target`): the choice is made once per device
#: type and environment value; :func:`register` clears it.
_checked: dict = {}


def checked_one_target(key: tuple, logits: torch.Tensor) -> tuple[Callable, OneTargetOps] | None:
    """The cached :data:`_checked` entry for ``key`` (``key[0]`` the backend name), resolved on first
    use for ``logits``' device."""
    try:
        return _checked[key]
    except KeyError:
        pass
    one = resolve(key[0], logits.device).one_target
    # An OpOverload's __call__ is one Python frame around its C++ callable: call that.
    entry = (getattr(one.fwd, "_op", one.fwd), one) if one.checked_op else None
    _checked[key] = entry
    return entry


def register(backend: Backend) -> None:
    _registry[backend.name] = backend
    _checked.clear()


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


def preload() -> None:
    """Load, at ``import fusedloss``, every backend that can run on a device this process sees:
    the reference and the C++ extension always, triton where a CUDA device is visible or
    ``TRITON_INTERPRET=1`` is set. A loss whose first call is inside ``torch.compile`` then finds its
    backend registered: Dynamo cannot trace the import that a lazy load would run there."""
    names = ["reference", "cpu"]
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        names.append("triton")
    for name in names:
        _load(name)


def unavailable_reason(name: str, device: torch.device | None = None) -> str | None:
    """Why ``name`` cannot run (on ``device``, if given), or None if it can."""
    if name not in _LOADERS:
        return f"unknown backend {name!r}; choose one of {', '.join(('auto',) + BACKENDS)}"
    be = _load(name)
    hint = _LOADERS[name][1]
    if be is None:
        return f"backend {name!r} is not available ({_load_errors.get(name)}); to get it: {hint}"
    if device is not None and not be.supports(device):
        return f"backend {name!r} does not run on {device.type} tensors{_device_hint(name, device)}"
    return None


def _device_hint(name: str, device: torch.device) -> str:
    """What to do when ``name`` is installed but not for ``device`` (no rebuild, no pip install:
    it is there; the tensors or the machine are not what it runs on)."""
    no_gpu = "" if torch.cuda.is_available() else " and no CUDA device is visible here (torch.cuda.is_available() is False)"
    if name == "cuda":
        return f": it runs on CUDA tensors{no_gpu}"
    if name == "triton":
        return (f": it runs on CUDA tensors{no_gpu}; on CPU tensors only under Triton's interpreter "
                "(TRITON_INTERPRET=1 set before fusedloss is imported; slow, for tests)")
    return f": it runs on {name} tensors" if name == "cpu" else ""


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
