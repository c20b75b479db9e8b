"""Argument checks shared by every backend, raised before any kernel reads memory.

Checks on metadata (shapes, dtypes, devices, strings, hyper-parameters) run in
the functional and cost nothing at run time under ``torch.compile``. The check
of target *values* needs the data, so it lives inside each op's implementation:
on CPU it is always on (it reads host memory, no synchronization); on a GPU it
would cost a host synchronization every step, so there it runs only in strict
mode and otherwise kernels clamp the index and mark the row's loss NaN.
"""
from __future__ import annotations

import math
import os

import torch

LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TARGET_DTYPES = (torch.int64, torch.int32)

#: Environment variable that turns on the synchronous target check on GPUs.
STRICT_ENV = "FUSEDLOSS_STRICT"


def strict_mode() -> bool:
    """Whether GPU ops check target values on the host (``FUSEDLOSS_STRICT=1``)."""
    return os.environ.get(STRICT_ENV, "0") not in ("", "0", "false", "False")


def must_check_targets(device: torch.device) -> bool:
    """CPU: always. Other devices: only in strict mode (the check synchronizes)."""
    return device.type == "cpu" or strict_mode()


def check_target_values(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise ``IndexError`` naming the first bad target (not ``ignore_index``, outside ``[0, C)``)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        first = int(target[bad].reshape(-1)[0])
        raise IndexError(
            f"target contains {first}, outside [0, {num_classes}) for C={num_classes} classes "
            f"(and not ignore_index={ignore_index})"
        )


def finite(value: float) -> bool:
    """``math.isfinite`` for a Python number, written as comparisons: ``torch.compile(dynamic=True)``
    cannot trace ``math.isfinite`` (a call returning a non-tensor) but folds comparisons."""
    return -math.inf < value < math.inf


def check_hyperparameters(alpha: float, beta: float, gamma: float, label_smoothing: float) -> None:
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{name} must be a float; got {type(value).__name__}")
        if not finite(value) or value < 0:
            raise ValueError(f"{name} must be finite and >= 0; got {value}")
    if not isinstance(label_smoothing, (int, float)) or isinstance(label_smoothing, bool):
        raise TypeError(f"label_smoothing must be a float; got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1]; got {label_smoothing}")


def check_z_loss_softcap(z_loss: float, softcap: float | None) -> float:
    """Check PaLM's z-loss weight and Gemma's cap; returns the cap as the ops take it (0.0: none)."""
    if not isinstance(z_loss, (int, float)) or isinstance(z_loss, bool) or not z_loss >= 0:
        raise ValueError(f"z_loss must be a float >= 0; got {z_loss!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or isinstance(softcap, bool)
                                or not softcap > 0):
        raise ValueError(f"softcap must be None or a float > 0; got {softcap!r}")
    if not finite(z_loss) or (softcap is not None and not finite(softcap)):
        raise ValueError(f"z_loss and softcap must be finite; got z_loss={z_loss!r}, softcap={softcap!r}")
    return 0.0 if softcap is None else float(softcap)


def check_logits(logits: object, allow_no_classes: bool = False) -> torch.Tensor:
    """``allow_no_classes``: ``C = 0`` passes (the functional gives PyTorch's answer for it)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor; got {type(logits).__name__}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64; got {logits.dtype}")
    if logits.dim() == 0:
        raise ValueError("logits must have shape (C,), (N, C) or (N, C, d1, ...); got a 0-d tensor")
    if not allow_no_classes and logits.shape[1 if logits.dim() > 1 else 0] == 0:
        raise ValueError(f"logits must have at least one class; got shape {tuple(logits.shape)}")
    return logits


def check_class_target(logits: torch.Tensor, target: object) -> torch.Tensor:
    """Class-index targets: int64/int32, shape ``logits.shape`` without the class dim."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor; got {type(target).__name__}")
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(f"target must be int64, int32 (or uint8) class indices; got {target.dtype}")
    expected = (logits.shape[0],) + tuple(logits.shape[2:]) if logits.dim() > 1 else ()
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target must have shape {expected} for logits of shape {tuple(logits.shape)}; "
            f"got {tuple(target.shape)}"
        )
    _check_same_device("target", target, logits)
    return target


def check_distill_target(target: object, lead_shape: tuple, device: torch.device, lead_name: str) -> None:
    """The distillation forms' hard target: ``None``, or class indices (int64, int32 or uint8) of shape
    ``lead_shape`` (``lead_name``'s shape without its last dim) on ``device``. One check for
    ``fl.distill_loss``, ``fl.linear_distill_loss`` and their vocabulary-parallel forms: a floating
    target is refused (the teacher's distribution is the soft target; class probabilities have no hard
    loss here), whatever the form."""
    if target is None:
        return
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices or None; got {type(target).__name__}")
    if target.dtype not in TARGET_DTYPES + (torch.uint8,):
        raise TypeError(f"target must be int64, int32 (or uint8) class indices or None; got {target.dtype} "
                        "(the teacher's distribution is the soft target; the hard loss takes class indices)")
    if tuple(target.shape) != tuple(lead_shape):
        raise ValueError(f"target must have shape {tuple(lead_shape)} ({lead_name}'s without its last dim); "
                         f"got {tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but {lead_name} is on {device}")


def check_prob_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-probability (soft) targets: floating, same shape as the logits."""
    if target.dtype not in LOGIT_DTYPES:
        raise TypeError(f"target must be int64/int32 class indices or a floating tensor of probabilities; got {target.dtype}")
    if target.shape != logits.shape:
        raise ValueError(
            f"probability target must have the logits' shape {tuple(logits.shape)}; got {tuple(target.shape)}"
        )
    _check_same_device("target", target, logits)
    return target


def check_weight(weight: object, num_classes: int, logits: torch.Tensor) -> torch.Tensor | None:
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None; got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating tensor; got {weight.dtype}")
    if tuple(weight.shape) != (num_classes,):
        raise ValueError(f"weight must have shape ({num_classes},) (one per class); got {tuple(weight.shape)}")
    _check_same_device("weight", weight, logits)
    return weight


def check_ignore_index(ignore_index: object) -> int:
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int; got {type(ignore_index).__name__}")
    return ignore_index


def _check_same_device(name: str, t: torch.Tensor, logits: torch.Tensor) -> None:
    if t.device != logits.device:
        raise ValueError(f"{name} is on {t.device} but logits are on {logits.device}; move them to one device")
