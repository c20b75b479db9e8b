"""Knowledge distillation in ``fusedloss.train``: ``--teacher CHECKPOINT`` (DeiT's soft distillation).

The student is trained on ``(1 - W) H + W D`` per image, ``W = --kd-weight``, ``H`` the hard loss
(``--loss`` with its options, against the labels, or against the mixed targets with
mixup/cutmix exactly as without a teacher), ``D = T^2 divergence(softmax(teacher / T),
softmax(student / T))``, ``T = --distill-temperature`` (:func:`fusedloss.distill_loss`,
docs/distillation.md). The mean is over the batch's images: DeiT's ``DistillationLoss``
('soft') divides its summed KL by ``N x C`` (``outputs_kd.numel()``), which makes its
distillation term C times smaller than the per-image KL of Hinton et al.; here ``D`` is
per image (``F.kl_div(..., reduction='batchmean')``), so ``--kd-weight`` means what it says.

The teacher is any torchvision classification model (``--teacher-arch``) with its weights read
from a file: a bare ``state_dict`` (torchvision's downloadable ``.pth`` files), a dict holding one
under ``"model"`` (torchvision's reference ``train.py``, DeiT) or ``"state_dict"``, or this
command's own ``checkpoint.pt`` / ``best.pt``. It runs in eval mode, without gradients, on the
same (augmented, mixed) batch as the student, under the same autocast.
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

import fusedloss as fl
from fusedloss.train.ckpt import FORMAT
from fusedloss.train.data import TrainInputError
from fusedloss.train.recipe import MixedTarget, explicit_dests

DIVERGENCES = ("kl", "reverse_kl", "jsd")
#: The flags that mean nothing without --teacher (their ``dest``).
_TEACHER_ONLY = ("teacher_arch", "distill_temperature", "distill_divergence", "distill_jsd_beta", "kd_weight")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The distillation flags, in their own group of ``--help``."""
    g = p.add_argument_group("knowledge distillation (DeiT's soft distillation; docs/training.md)")
    g.add_argument("--teacher", metavar="CHECKPOINT", default=None,
                   help="train the student against this teacher: a state_dict file, a dict with one under 'model' "
                        "or 'state_dict', or a checkpoint.pt/best.pt of this command (default: none, no distillation)")
    g.add_argument("--teacher-arch", metavar="NAME", default=None,
                   help="the teacher's torchvision model name (default: the architecture a checkpoint of this "
                        "command records, else --arch)")
    g.add_argument("--distill-temperature", metavar="T", type=float, default=1.0,
                   help="softmax temperature of teacher and student in the divergence (scaled by T^2)")
    g.add_argument("--distill-divergence", choices=DIVERGENCES, default="kl",
                   help="kl: KL(teacher || student); reverse_kl: KL(student || teacher); jsd: the generalized "
                        "Jensen-Shannon divergence")
    g.add_argument("--distill-jsd-beta", metavar="B", type=float, default=0.5,
                   help="--distill-divergence jsd: the teacher's share of the mixture, in (0, 1)")
    g.add_argument("--kd-weight", metavar="W", type=float, default=0.5,
                   help="the student's loss is (1 - W) x hard loss + W x T^2 x divergence, W in [0, 1]")


def check_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None, args: argparse.Namespace) -> None:
    """Distillation flags without ``--teacher`` are an error (they would be silently ignored)."""
    if args.teacher is not None:
        return
    given = sorted(explicit_dests(parser, argv) & set(_TEACHER_ONLY))
    if given:
        flags = ", ".join("--" + d.replace("_", "-") for d in given)
        raise TrainInputError(f"{flags} given without --teacher: distillation needs a teacher checkpoint")


def check_args(args: argparse.Namespace) -> None:
    """Everything about the teacher that can be checked before data and devices: the numbers, the
    file's existence, the architecture's name, and the distillation loss's own checks."""
    if args.teacher is None:
        return
    import torchvision

    t, w, b = args.distill_temperature, args.kd_weight, args.distill_jsd_beta
    if not (math.isfinite(t) and t > 0):
        raise TrainInputError(f"--distill-temperature must be a finite number > 0; got {t}")
    if not 0.0 <= w <= 1.0:
        raise TrainInputError(f"--kd-weight must be in [0, 1]; got {w}")
    if not 0.0 < b < 1.0:
        raise TrainInputError(f"--distill-jsd-beta must be in (0, 1); got {b}")
    if not os.path.isfile(args.teacher):
        raise TrainInputError(f"--teacher {args.teacher!r}: no such file")
    if args.teacher_arch is not None:
        archs = torchvision.models.list_models(module=torchvision.models)
        if args.teacher_arch not in archs:
            close = difflib.get_close_matches(args.teacher_arch, archs, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise TrainInputError(f"--teacher-arch {args.teacher_arch!r}: not a torchvision classification model{hint}")
    # The loss library's own checks of the combination (e.g. the hard loss's options), on a 2-row probe.
    logits = torch.zeros(2, 2)
    try:
        fl.distill_loss(logits, logits, torch.arange(2), args.loss, backend="reference", **distill_kwargs(args))
    except (ValueError, NotImplementedError) as err:
        raise TrainInputError(f"--teacher with --loss {args.loss}: {err}") from None


def distill_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``fl.distill_loss``'s keywords but the hard loss's name: the divergence's and the hard loss's options
    (only those of ``--loss``: ``crl`` alpha/beta, ``focal`` gamma, and label smoothing when set)."""
    kw: dict[str, Any] = dict(temperature=args.distill_temperature, divergence=args.distill_divergence,
                              jsd_beta=args.distill_jsd_beta, kd_weight=args.kd_weight)
    if args.loss == "crl":
        kw.update(alpha=args.alpha, beta=args.beta)
    elif args.loss == "focal":
        kw.update(gamma=args.gamma)
    if args.label_smoothing:
        kw.update(label_smoothing=args.label_smoothing)
    return kw


# ---------------------------------------------------------------------------------------------
# the teacher


def _read_weights(path: str) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """``(state_dict, our checkpoint or None)`` from any of the accepted file layouts."""
    try:
        # torchvision's reference train.py pickles its argparse.Namespace beside the weights.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, foreign pickle, ...: all the same to the user
        raise TrainInputError(f"--teacher {path!r}: not a readable weights file ({type(err).__name__}: {err})") from None
    ours = obj if isinstance(obj, dict) and obj.get("format") == FORMAT else None
    state = obj
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for key in ("model", "state_dict"):
            if _is_state_dict(obj.get(key)):
                state = obj[key]
                break
    if not _is_state_dict(state):
        raise TrainInputError(f"--teacher {path!r}: holds no state_dict (expected a dict of tensors, or one under "
                              f"'model' or 'state_dict')")
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, ours


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def load_teacher(args: argparse.Namespace, classes: list[str], device: torch.device) -> tuple[nn.Module, str]:
    """The teacher model (eval mode, no gradients, on ``device``) and its architecture's name."""
    from fusedloss.train.cli import build_model

    state, ours = _read_weights(args.teacher)
    arch = args.teacher_arch or (ours["arch"] if ours is not None else args.arch)
    if ours is not None:
        if args.teacher_arch is not None and ours["arch"] != args.teacher_arch:
            raise TrainInputError(f"--teacher {args.teacher!r}: the checkpoint is a {ours['arch']}, but --teacher-arch "
                                  f"is {args.teacher_arch}")
        if ours.get("classes") != classes:
            raise TrainInputError(f"--teacher {args.teacher!r}: the teacher was trained on other classes "
                                  f"({len(ours.get('classes') or [])}: {_short(ours.get('classes'))}) than the data's "
                                  f"({len(classes)}: {_short(classes)}); the class order must match too")
    model = build_model(arch, len(classes))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    wrong = [k for k in shapes if k in state and state[k].shape != shapes[k]]
    if missing or unexpected or wrong:
        if wrong and not missing and not unexpected and len({state[k].shape[0] for k in wrong}) == 1 and all(
                state[k].shape[1:] == shapes[k][1:] for k in wrong):
            raise TrainInputError(f"--teacher {args.teacher!r}: the teacher's classifier has {state[wrong[0]].shape[0]} "
                                  f"outputs, the data has {len(classes)} classes")
        parts = [f"{what} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("of other shapes", wrong)) if keys]
        raise TrainInputError(f"--teacher {args.teacher!r}: its weights are not a {arch}'s (--teacher-arch): "
                              f"parameters {'; '.join(parts)}")
    model.load_state_dict(state)
    model.eval().requires_grad_(False)
    model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    return model, arch


def _short(names: list[str] | None) -> str:
    names = list(names or [])
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


class Distiller:
    """The training loss with a teacher: ``distiller(images, logits, target)``.

    ``target`` as the loop hands it: class indices (one fused ``fl.distill_loss`` call, hard loss
    and divergence in one pass) or a :class:`MixedTarget` (mixup/cutmix: the hard loss through
    ``criterion``, exactly the route without a teacher, plus ``W`` times the divergence of
    ``fl.distill_loss`` without targets). Both are ``mean_i [(1 - W) H_i + W D_i]``.
    """

    def __init__(self, teacher: nn.Module, arch: str, criterion: nn.Module, args: argparse.Namespace) -> None:
        self.teacher, self.arch, self.criterion = teacher, arch, criterion
        self.loss = args.loss
        self.kw = distill_kwargs(args)
        self.kd_weight = args.kd_weight

    def describe(self, path: str) -> str:
        kw = self.kw
        div = kw["divergence"] + (f" (beta {kw['jsd_beta']:g})" if kw["divergence"] == "jsd" else "")
        return (f"teacher {self.arch} from {path}: (1 - {self.kd_weight:g}) x {self.loss} + {self.kd_weight:g} x "
                f"T^2 {div} at T {kw['temperature']:g}")

    def __call__(self, images: Tensor, logits: Tensor, target: Tensor | MixedTarget) -> Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        if isinstance(target, MixedTarget):
            hard = self.criterion(logits, target)
            soft_kw = {k: v for k, v in self.kw.items() if k in ("temperature", "divergence", "jsd_beta")}
            soft = fl.distill_loss(logits, teacher_logits, None, **soft_kw)
            return (1.0 - self.kd_weight) * hard + self.kd_weight * soft
        return fl.distill_loss(logits, teacher_logits, target, self.loss, **self.kw)
