"""Checkpoints for ``fusedloss.train``: atomic writes, RNG capture, and the checks a resume needs."""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from fusedloss.train.data import TrainInputError

FORMAT = "fusedloss.train/1"
LAST = "checkpoint.pt"
BEST = "best.pt"


def save_atomic(obj: Any, path: str) -> None:
    """Write ``obj`` to ``path`` so that ``path`` is always a complete checkpoint, old or new.

    The bytes go to a temporary file in the same directory (so the rename stays
    on one file system), are flushed to disk, and then ``os.replace`` swaps it in,
    which is atomic on POSIX and Windows. A run killed mid-write leaves the previous
    checkpoint intact and at worst a stray ``*.tmp.<pid>`` file.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def capture_rng(device: torch.device, loaders: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """This process's random states: Python, NumPy, torch CPU, (on GPU) the device's generator and
    the data loaders' own generators (``Loaders.generators()``).

    NumPy's state is stored as plain types so the checkpoint loads with ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "loaders": {name: gen.get_state() for name, gen in (loaders or {}).items()},
    }
    return state


def restore_rng(state: dict[str, Any], device: torch.device,
                loaders: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`capture_rng` (a checkpoint without loader states leaves ``loaders`` alone)."""
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    saved = state.get("loaders", {})
    for name, gen in (loaders or {}).items():
        if name in saved:
            gen.set_state(saved[name])


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load a checkpoint written by this script, on the CPU, without unpickling arbitrary objects."""
    if not os.path.isfile(path):
        raise TrainInputError(f"--resume {path!r}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, foreign pickle, ...: all the same to the user
        raise TrainInputError(f"--resume {path!r}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise TrainInputError(f"--resume {path!r}: not a fusedloss.train checkpoint (format {FORMAT!r} expected)")
    return ckpt


def check_resume_compatible(ckpt: dict[str, Any], path: str, arch: str, classes: list[str]) -> None:
    """Refuse to resume into a different architecture or a different set of classes."""
    if ckpt["arch"] != arch:
        raise TrainInputError(f"--resume {path!r}: checkpoint is a {ckpt['arch']}, but --arch is {arch}")
    if ckpt["num_classes"] != len(classes):
        raise TrainInputError(
            f"--resume {path!r}: class count mismatch: the checkpoint's model has {ckpt['num_classes']} classes, "
            f"the data has {len(classes)}")
    if ckpt["classes"] != classes:
        raise TrainInputError(
            f"--resume {path!r}: the data's class folders differ from the checkpoint's "
            f"(same count, {len(classes)}, but different names or order)")


def load_training_state(ckpt: dict[str, Any], path: str, optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler, ema: Any | None) -> None:
    """Restore the optimizer, the LR scheduler and the EMA weights (when both sides have them).

    The optimizer's parameter groups (``--norm-weight-decay``) and the scheduler's kind
    (``--lr-scheduler``, ``--lr-warmup-epochs``) must be those the checkpoint was written with;
    a mismatch is an input error naming the flags, not a traceback.
    """
    saved = ckpt.get("args", {})
    flags = ", ".join(f"--{k.replace('_', '-')} {saved[k]}" for k in ("norm_weight_decay", "lr_scheduler",
                                                                    "lr_warmup_epochs") if k in saved)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    except (ValueError, KeyError, TypeError) as err:
        raise TrainInputError(f"--resume {path!r}: the optimizer or LR schedule differs from the checkpoint's "
                              f"({flags or 'older flags'}): {err}") from None
    if ema is not None and "model_ema" in ckpt:
        ema.averaged.load_state_dict(ckpt["model_ema"])
