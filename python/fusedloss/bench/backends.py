"""The things we time: fused backends, PyTorch baselines and peer libraries.

Each backend turns a loss name into a callable ``fn(logits, target, reduction)``
that returns the loss and is differentiable w.r.t. ``logits``. Fused backends
are whatever ``fl.available_backends()`` reports; baselines and peers are
defined here. Peer libraries are imported lazily: a missing one is reported as
"not installed", never an import error.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import fusedloss as fl
import fusedloss.dispatch as _dispatch

LossFn = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]

# The losses' hyper-parameters, fixed at the defaults of docs/LOSSES.md so that
# every backend computes the same function.
HYPER = {"alpha": 1.5, "beta": 1.0, "gamma": 2.0}

# Fused backends the project knows of; which ones exist on this machine is
# fl.available_backends()' call, not ours.
FUSED_NAMES = tuple(b for b in getattr(_dispatch, "BACKENDS", ("cpu", "triton", "cuda")) if b != "reference")
BASELINES = ("torch", "reference", "naive", "compile")
PEERS = ("liger", "quack")


@dataclass(frozen=True)
class Backend:
    """One row group of the table: a name, what it is, and how to build its loss callable."""

    name: str
    kind: str  # "fused" | "baseline" | "peer"
    description: str
    ce_only: bool
    build: Callable[[str], LossFn]

    def supports(self, loss: str) -> bool:
        return not self.ce_only or loss == "ce"

    @property
    def label(self) -> str:
        """Name as shown in tables; CE-only backends are marked so a reader never
        compares a CE-only number against another loss by accident."""
        return f"{self.name} (ce only)" if self.ce_only else self.name


def _fused(name: str) -> Callable[[str], LossFn]:
    def build(loss: str) -> LossFn:
        def fn(x: torch.Tensor, t: torch.Tensor, reduction: str) -> torch.Tensor:
            return fl.softmax_loss(x, t, loss, reduction=reduction, backend=name, **HYPER)

        return fn

    return build


def _torch(loss: str) -> LossFn:
    del loss  # CE only; the caller has checked
    return lambda x, t, reduction: F.cross_entropy(x, t, reduction=reduction)


def _naive(loss: str) -> LossFn:
    from fusedloss.reference import naive_loss

    return lambda x, t, reduction: naive_loss(x, t, loss, reduction=reduction, **HYPER)


_COMPILED: dict[str, LossFn] = {}


def _compile(loss: str) -> LossFn:
    # One compiled wrapper per loss, reused across cells. dynamic=False makes
    # Dynamo specialise on each shape, as a user of a fixed-shape training loop
    # would see; the compile itself happens during warm-up, outside the timing.
    # The sweep recompiles once per (shape, dtype, reduction), far past the
    # default recompile limit of 8, after which Dynamo would silently fall back
    # to eager and we would time the wrong thing.
    import torch._dynamo as dynamo

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, knob):
            setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), 256))
    if loss not in _COMPILED:

        def reference(x: torch.Tensor, t: torch.Tensor, reduction: str) -> torch.Tensor:
            return fl.softmax_loss(x, t, loss, reduction=reduction, backend="reference", **HYPER)

        _COMPILED[loss] = torch.compile(reference, dynamic=False)
    return _COMPILED[loss]


def _liger(loss: str) -> LossFn:
    del loss
    from liger_kernel.transformers import LigerCrossEntropyLoss

    modules = {r: LigerCrossEntropyLoss(reduction=r) for r in ("mean", "sum", "none")}
    # Liger writes the gradient into the logits' storage during the forward;
    # the sweep hands every backend its own copy for the accuracy check.
    return lambda x, t, reduction: modules[reduction](x, t)


def _quack(loss: str) -> LossFn:
    del loss
    from quack.cross_entropy import cross_entropy

    return lambda x, t, reduction: cross_entropy(x, t, reduction=reduction)


_BASELINE_TABLE: dict[str, Backend] = {
    "torch": Backend("torch", "baseline", "torch.nn.functional.cross_entropy", True, _torch),
    "reference": Backend("reference", "baseline", "fusedloss exact formulas in plain PyTorch",
                         False, _fused("reference")),
    "naive": Backend("naive", "baseline", "textbook formula (fusedloss.reference.naive_loss)",
                     False, _naive),
    "compile": Backend("compile", "baseline", "torch.compile of the reference backend", False, _compile),
    "liger": Backend("liger", "peer", "Liger-Kernel cross entropy (Triton)", True, _liger),
    "quack": Backend("quack", "peer", "QuACK cross entropy (CuTe DSL)", True, _quack),
}

_PEER_MODULES = {"liger": ("liger_kernel", "pip install liger-kernel"), "quack": ("quack", "pip install quack-kernels")}


def known_backends() -> tuple[str, ...]:
    """Every name ``--backend`` accepts, available here or not."""
    fused = [b for b in fl.available_backends() if b != "reference"]
    return tuple(dict.fromkeys([*fused, *FUSED_NAMES, *BASELINES, *PEERS]))


def get_backend(name: str) -> Backend:
    if name in _BASELINE_TABLE:
        return _BASELINE_TABLE[name]
    return Backend(name, "fused", f"fusedloss backend '{name}'", False, _fused(name))


def _dispatch_reason(name: str, device: torch.device | None) -> str | None:
    """The library's own explanation (it includes how to get the backend)."""
    try:
        return _dispatch.unavailable_reason(name, device)
    except Exception as exc:  # noqa: BLE001 - an old/new dispatch API must not break the bench
        return f"{type(exc).__name__}: {exc}"


def _probe(backend: Backend, device: torch.device) -> str | None:
    """Run a tiny forward+backward; returns the first line of the error, if any."""
    loss = "ce"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, generator=g).to(device).requires_grad_()
    t = torch.randint(0, 16, (4,), generator=g).to(device)
    try:
        backend.build(loss)(x, t, "mean").backward()
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"fails on {device.type}: {first[:120]}"
    return None


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """``None`` when ``name`` can run on ``device``, else a short reason."""
    backend = get_backend(name)
    if backend.kind == "fused":
        if name not in fl.available_backends():
            return _dispatch_reason(name, None) or "not in fl.available_backends()"
        # Available somewhere is not available on this device (triton on a CPU run).
        return _dispatch_reason(name, device) or _probe(backend, device)
    if backend.kind == "peer":
        module, hint = _PEER_MODULES[name]
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - broken installs count as missing too
            return f"not installed ({hint})"
        if device.type != "cuda":
            return "needs a CUDA device"
        return _probe(backend, device)
    if name == "naive":
        try:
            importlib.import_module("fusedloss.reference").naive_loss  # noqa: B018
        except (ImportError, AttributeError):
            return "fusedloss.reference.naive_loss is missing"
    return None
