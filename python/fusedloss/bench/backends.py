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

# The losses' hyper-parameters, fixed at the defaults of docs/losses.md so that
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


class _CompiledReference(torch.autograd.Function):
    """The reference backend's forward and backward, each through ``torch.compile``.

    Compiling ``fl.softmax_loss(..., backend="reference")`` itself would time
    nothing new: the reference is a ``torch.library`` op, opaque to Dynamo, so
    Inductor would just call it. Compiling the op's two Python bodies
    (``fusedloss.reference.forward``/``backward``) lets Inductor fuse the same
    math into its own loops: that is the "what does the compiler buy you" row.
    """

    @staticmethod
    def forward(ctx, x, t, variant: int, reduction: int, fns: tuple):  # type: ignore[override]
        fwd, bwd = fns
        loss, stats = fwd(x, t, None, variant, reduction, -100, 0.0, HYPER["alpha"], HYPER["beta"], HYPER["gamma"])
        ctx.save_for_backward(x, t, stats)
        ctx.args = (variant, reduction, bwd)
        return loss

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, t, stats = ctx.saved_tensors
        variant, reduction, bwd = ctx.args
        g = bwd(grad, x, t, None, stats, variant, reduction, -100, 0.0,
                HYPER["alpha"], HYPER["beta"], HYPER["gamma"])
        return g, None, None, None, None


_COMPILED_FNS: tuple | None = None


def _compile(loss: str) -> LossFn:
    # dynamic=False makes Dynamo specialise on each shape, as a fixed-shape
    # training loop would see; the compile happens during warm-up, outside the
    # timing. The sweep recompiles once per (shape, dtype, variant, reduction),
    # far past the default recompile limit of 8, after which Dynamo would
    # silently fall back to eager and we would time the wrong thing.
    global _COMPILED_FNS
    import torch._dynamo as dynamo

    from fusedloss import reference
    from fusedloss.variants import reduction_id, variant_id

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, knob):
            setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), 256))
    if _COMPILED_FNS is None:
        _COMPILED_FNS = (torch.compile(reference.forward, dynamic=False),
                         torch.compile(reference.backward, dynamic=False))
    fns, variant = _COMPILED_FNS, int(variant_id(loss))

    def fn(x: torch.Tensor, t: torch.Tensor, reduction: str) -> torch.Tensor:
        return _CompiledReference.apply(x, t, variant, int(reduction_id(reduction)), fns)

    return fn


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
    "compile": Backend("compile", "baseline", "torch.compile of the reference forward and backward",
                       False, _compile),
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
        # The library's reason for this device first: "available" somewhere is
        # not available here (triton on a CPU run).
        reason = _dispatch_reason(name, device)
        if reason is None and name not in fl.available_backends():
            reason = f"not in fl.available_backends() = {fl.available_backends()}"
        return reason or _probe(backend, device)
    if backend.kind == "peer":
        # The device first: an install hint is only worth giving where the peer could then run.
        if device.type != "cuda":
            return f"runs on CUDA tensors only, this run is on {device.type}"
        module, hint = _PEER_MODULES[name]
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - broken installs count as missing too
            return f"not installed ({hint})"
        return _probe(backend, device)
    if name == "naive":
        try:
            importlib.import_module("fusedloss.reference").naive_loss  # noqa: B018
        except (ImportError, AttributeError):
            return "fusedloss.reference.naive_loss is missing"
    return None
