"""The modern-recipe pieces of ``fusedloss.train``: named recipes, mixup/cutmix with the loss routing,
model EMA, the learning-rate schedule with warmup, and the weight-decay groups.

Flag names and defaults are those of torchvision's ``references/classification/train.py``;
the code is ours.
"""
from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fusedloss as fl
from fusedloss import dispatch, mixup
from fusedloss.variants import variant_id

# torchvision's ResNet-50 "v2" weights (IMAGENET1K_V2, 80.858 top-1), from the command line published
# with them (the torchvision blog "How to Train State-Of-The-Art Models Using TorchVision's Latest
# Primitives" and references/classification/README.md), 8 GPUs x batch 128. Our --batch-size is the
# global batch, hence 1024. Its --ra-sampler --ra-reps 4 (repeated augmentation) is not implemented here.
RECIPES: dict[str, dict[str, Any]] = {
    "torchvision-v2": dict(
        arch="resnet50", batch_size=1024, epochs=600, lr=0.5, lr_scheduler="cosineannealinglr",
        lr_warmup_epochs=5, lr_warmup_method="linear", lr_warmup_decay=0.01, label_smoothing=0.1,
        mixup_alpha=0.2, cutmix_alpha=1.0, auto_augment="ta_wide", random_erase=0.1, wd=2e-5,
        norm_weight_decay=0.0, train_crop_size=176, val_resize_size=232, val_crop_size=224,
        model_ema=True, model_ema_steps=32, model_ema_decay=0.99998,
    ),
}

# --lr-schedule (this script's first name for it) -> torchvision's --lr-scheduler names.
LR_SCHEDULE_ALIASES = {"step": "multisteplr", "cosine": "cosineannealinglr"}
LR_SCHEDULERS = ("steplr", "multisteplr", "cosineannealinglr", "exponentiallr")


def lr_schedule_alias(value: str) -> str:
    """argparse ``type`` of the deprecated ``--lr-schedule step|cosine``: stores the torchvision name."""
    if value not in LR_SCHEDULE_ALIASES:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from 'step', 'cosine')")
    return LR_SCHEDULE_ALIASES[value]


_UNSET = object()


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The ``dest`` of every option given on the command line (argparse fills a default only into a
    namespace attribute that does not exist yet, so a pre-filled marker survives where nothing was given)."""
    marked = argparse.Namespace(**{a.dest: _UNSET for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, marked)
    return {dest for dest, value in vars(marked).items() if value is not _UNSET}


def resolve_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, then fill in ``--recipe`` and the ``--image-size`` alias wherever no flag was given.

    Precedence: an explicit flag > the ``--image-size`` alias > the recipe > the parser's default.
    """
    args = parser.parse_args(argv)
    given = explicit_dests(parser, argv)
    if args.recipe is not None:
        for dest, value in RECIPES[args.recipe].items():
            if dest not in given:
                setattr(args, dest, value)
    if args.image_size is not None:  # the old single size: both crops, and the reference 256/224 resize ratio
        for dest in ("train_crop_size", "val_crop_size"):
            if dest not in given:
                setattr(args, dest, args.image_size)
        if "val_resize_size" not in given:
            args.val_resize_size = round(args.image_size * 256 / 224)
    return args


# ---------------------------------------------------------------------------------------------
# mixup / cutmix and the loss routing


class MixedTarget(NamedTuple):
    """A batch of mixed targets in the two-target form: row i is ``lam[i]`` of ``y_a[i]`` and
    ``1 - lam[i]`` of ``y_b[i]``. ``lam`` is float64: the very number the transform drew."""

    y_a: Tensor
    y_b: Tensor
    lam: Tensor

    def dominant(self) -> Tensor:
        """The class with the larger share: what torchvision's reference scores top-1 against."""
        return torch.where(self.lam >= 0.5, self.y_a, self.y_b)

    def soft(self, num_classes: int) -> Tensor:
        """The float32 class probabilities torchvision's v2 MixUp/CutMix would have returned, bit for bit:
        it computes ``onehot(partner) * fp32(1 - lam) + onehot(self) * fp32(lam)`` in float32."""
        w_a, w_b = self.lam.float()[:, None], (1.0 - self.lam).float()[:, None]
        return F.one_hot(self.y_b, num_classes).float().mul_(w_b).add_(F.one_hot(self.y_a, num_classes).float().mul_(w_a))


class BatchMix:
    """torchvision's ``RandomChoice([MixUp(mixup_alpha), CutMix(cutmix_alpha)])`` applied to a batch,
    returning the mixed images and a :class:`MixedTarget` instead of soft targets.

    Why not soft targets: for every loss but ``ce`` the library needs ``(y_a, y_b, lam)`` (a soft
    target has no definition there), and from float32 soft targets ``lam`` comes back only to one
    float32 ulp. So the transform is handed, in place of the labels, the batch's float64 identity
    matrix as "probability labels" (allowed since torchvision 0.19): it mixes that matrix exactly as
    it mixes one-hot labels, so row i comes back as ``lam`` on the diagonal and ``1 - lam`` in the
    column of the image pasted into image i. That gives the pairing and ``lam`` exactly (float64 holds
    the Python float the transform drew), without relying on how torchvision pairs the images (today
    ``roll(1, 0)``, documented as an implementation detail). Same calls, same random numbers as the
    reference's collate function: a run draws the same mixes as torchvision's script would.

    Applied on the device after the copy, in the training loop (the reference does it in the
    DataLoader's collate function): no (N, C) targets cross the bus and ``--dummy`` batches mix too.
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float) -> None:
        from torchvision.transforms import v2

        choices = []
        if mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=mixup_alpha))
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cutmix_alpha))
        if not choices:
            raise ValueError("BatchMix needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.transform = v2.RandomChoice(choices)

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, MixedTarget]:
        n = labels.shape[0]
        eye = torch.eye(n, dtype=torch.float64, device=labels.device)
        mixed, pairs = self.transform(images, eye)
        return mixed, split_pairs(pairs, labels)


def split_pairs(pairs: Tensor, labels: Tensor) -> MixedTarget:
    """(y_a, y_b, lam) from the mixed identity matrix: ``lam`` on the diagonal, the partner where the
    rest of the row's mass is. A row with no partner (``lam == 1``: a CutMix box of zero area) keeps
    its own label twice."""
    lam = pairs.diagonal().clone()
    off = pairs.clone()
    off.fill_diagonal_(0.0)
    share, partner = off.max(dim=1)
    partner = torch.where(share > 0, partner, torch.arange(labels.shape[0], device=labels.device))
    return MixedTarget(labels, labels[partner], lam)


def loss_kwargs(criterion: fl.SoftmaxLoss, **override: Any) -> dict[str, Any]:
    """The keyword arguments of ``fl.softmax_loss`` that ``criterion`` was built with."""
    kw = dict(weight=criterion.weight, ignore_index=criterion.ignore_index, reduction=criterion.reduction,
              label_smoothing=criterion.label_smoothing, alpha=criterion.alpha, beta=criterion.beta,
              gamma=criterion.gamma, backend=criterion.backend)
    for name in ("z_loss", "softcap"):  # options newer versions of the module carry
        if hasattr(criterion, name):
            kw[name] = getattr(criterion, name)
    kw.update(override)
    return kw


def has_two_target_form(criterion: fl.SoftmaxLoss) -> bool:
    """Whether ``fl.softmax_loss`` takes ``target=(y_a, y_b, lam)`` (the fused mixup form) for this loss.

    Probed on CPU tensors with the reference backend: what the library accepts does not depend on
    the backend, and the criterion's own (``backend="triton"``, or ``FUSEDLOSS_BACKEND``) may not run
    on the CPU."""
    x = torch.zeros(2, 3)
    y_a, y_b, lam = torch.tensor([0, 1]), torch.tensor([2, 1]), torch.tensor([0.25, 1.0])
    try:
        out = fl.softmax_loss(x, (y_a, y_b, lam), criterion.loss,
                              **loss_kwargs(criterion, weight=None, reduction="none", backend="reference"))
    except (TypeError, ValueError, NotImplementedError, AttributeError):
        return False
    return isinstance(out, Tensor) and out.shape == (2,)


def two_target_by_two_calls(logits: Tensor, target: MixedTarget, criterion: fl.SoftmaxLoss) -> Tensor:
    """``lam * L(x, y_a) + (1 - lam) * L(x, y_b)``, mean over rows, by two unreduced calls: the stand-in
    while the library lacks the fused two-target form (twice the passes over the logits)."""
    if criterion.reduction != "mean" or criterion.weight is not None:
        raise NotImplementedError("the two-call mixup fallback covers reduction='mean' without class weights")
    kw = loss_kwargs(criterion, reduction="none")
    loss_a = fl.softmax_loss(logits, target.y_a, criterion.loss, **kw)
    loss_b = fl.softmax_loss(logits, target.y_b, criterion.loss, **kw)
    acc = torch.promote_types(loss_a.dtype, torch.float32)  # float32 sums for half logits, float64 stays
    lam = target.lam.to(acc)
    rows = lam * loss_a.to(acc) + (1.0 - lam) * loss_b.to(acc)
    return rows.mean().to(logits.dtype)


def split_soft_targets(soft: Tensor) -> MixedTarget:
    """(y_a, y_b, lam) from mixup/cutmix class probabilities with at most two nonzero classes a row
    (what torchvision's MixUp/CutMix, v1 or v2, return): ``y_a`` the larger share, ``lam`` its value,
    ``y_b`` the other class, or ``y_a`` again when the row is one-hot (both images of one class).

    For a training script that keeps the reference's collate function. ``lam`` is the float32 target
    value, so ``1 - lam`` may differ from the row's second value by one float32 ulp (2**-24 at most).
    Rows with more than two nonzero classes (label smoothing folded into the targets, several mixes)
    are not of this form and are not detected here: keep those on ``ce``.
    """
    share, cls = soft.topk(2, dim=1)
    y_b = torch.where(share[:, 1] > 0, cls[:, 1], cls[:, 0])
    return MixedTarget(cls[:, 0], y_b, share[:, 0].to(torch.float64))


class MixedTargetLoss(nn.Module):
    """A fusedloss criterion that also takes mixup/cutmix targets, routed by loss.

    ``target`` may be class indices (passed through), a :class:`MixedTarget`, or mixup/cutmix class
    probabilities (N, C). A :class:`MixedTarget` goes to the two-target form ``(y_a, y_b, lam)``,
    meaning ``lam * L(x, y_a) + (1 - lam) * L(x, y_b)`` (the original mixup code's form), for every
    loss; ``ce`` with class weights gets the class probabilities instead (PyTorch's soft-target
    ``'mean'`` divides by N, the two-target form by the targets' weights), as do class probabilities
    handed in directly (``F.cross_entropy`` semantics, label smoothing applied inside the loss as
    torchvision's reference does). For unweighted ``ce`` the two forms agree (CE is linear in the
    target distribution, smoothing included); the two-target form reads half the bytes (no (N, C)
    targets). Class probabilities go to the criterion as they are, for every loss (the expected loss
    ``sum_k w_k q_k L(x, k)``, docs/losses.md): a script needs no wrapper for them, ``criterion(logits,
    soft_targets)`` is the whole change, so this class stays one release for :class:`MixedTarget` (the
    training command's exact pairs) and warns when handed probabilities.
    """

    _warned = False

    def __init__(self, criterion: fl.SoftmaxLoss, num_classes: int, fused_two_target: bool | None = None) -> None:
        super().__init__()
        self.criterion = criterion
        self.num_classes = num_classes
        self.fused_two_target = has_two_target_form(criterion) if fused_two_target is None else fused_two_target

    def _soft_for_mixed(self) -> bool:
        return self.criterion.loss == "ce" and (self.criterion.weight is not None or not self.fused_two_target)

    def mixed_path(self, device: torch.device | str = "cpu") -> str:
        """How a :class:`MixedTarget` reaches the loss on ``device`` (for logs and result tables)."""
        if self._soft_for_mixed():
            return "soft targets"
        if not self.fused_two_target:
            return "two-target (two calls)"
        be = dispatch.resolve(self.criterion.backend, torch.device(device))
        variant, softcap = int(variant_id(self.criterion.loss)), getattr(self.criterion, "softcap", None) or 0.0
        mix = be.family(mixup.TwoTargetOps)
        if mix is not None and mix.fuses(variant, softcap):
            return f"two-target (fused, {be.name})"
        return f"two-target (two passes of the {be.name} kernel)"

    def forward(self, logits: Tensor, target: Tensor | MixedTarget) -> Tensor:
        if isinstance(target, Tensor) and target.is_floating_point():
            # Class probabilities are the expected loss for every loss now: no split into two classes
            # (which recovered 0.9 lam + 0.01 from timm's targets with their smoothing folded in).
            if not self._warned:
                warnings.warn("MixedTargetLoss is deprecated for class-probability targets: every fusedloss "
                              "loss takes them directly (criterion(logits, soft_targets), the expected loss); "
                              "it will be removed in the next release", FutureWarning, stacklevel=2)
                type(self)._warned = True
            return self.criterion(logits, target)
        if not isinstance(target, MixedTarget):
            return self.criterion(logits, target)
        if self._soft_for_mixed():
            return self.criterion(logits, target.soft(self.num_classes))
        if self.fused_two_target:
            return self.criterion(logits, (target.y_a, target.y_b, target.lam))  # cast to the math dtype there
        return two_target_by_two_calls(logits, target, self.criterion)


# ---------------------------------------------------------------------------------------------
# optimizer groups, learning-rate schedule, EMA

# What torchvision's utils.set_weight_decay counts as a normalization layer.
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
               nn.LocalResponseNorm)


def param_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float | None) -> list[dict[str, Any]]:
    """One group (``norm_weight_decay`` None), or the other parameters then those of the
    normalization layers with their own weight decay (torchvision's ``--norm-weight-decay``)."""
    if norm_weight_decay is None:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    other: list[nn.Parameter] = []
    norm: list[nn.Parameter] = []
    for module in model.modules():
        group = norm if isinstance(module, NORM_LAYERS) else other
        group.extend(p for p in module.parameters(recurse=False) if p.requires_grad)
    groups = [{"params": other, "weight_decay": weight_decay}, {"params": norm, "weight_decay": norm_weight_decay}]
    return [g for g in groups if g["params"]]


def make_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> torch.optim.lr_scheduler.LRScheduler:
    """torchvision's schedule: the main scheduler over ``epochs - lr_warmup_epochs`` epochs, after a
    linear or constant warmup starting at ``lr x lr_warmup_decay``; stepped once per epoch."""
    sched = torch.optim.lr_scheduler
    name = args.lr_scheduler
    main: sched.LRScheduler
    if name == "steplr":
        main = sched.StepLR(optimizer, step_size=args.lr_step_size, gamma=args.lr_gamma)
    elif name == "multisteplr":
        main = sched.MultiStepLR(optimizer, milestones=args.lr_steps, gamma=args.lr_gamma)
    elif name == "cosineannealinglr":
        main = sched.CosineAnnealingLR(optimizer, T_max=args.epochs - args.lr_warmup_epochs, eta_min=args.lr_min)
    else:
        main = sched.ExponentialLR(optimizer, gamma=args.lr_gamma)
    if args.lr_warmup_epochs == 0:
        return main
    if args.lr_warmup_method == "linear":
        warmup: sched.LRScheduler = sched.LinearLR(optimizer, start_factor=args.lr_warmup_decay,
                                                   total_iters=args.lr_warmup_epochs)
    else:
        warmup = sched.ConstantLR(optimizer, factor=args.lr_warmup_decay, total_iters=args.lr_warmup_epochs)
    return sched.SequentialLR(optimizer, schedulers=[warmup, main], milestones=[args.lr_warmup_epochs])


class ModelEma:
    """torchvision's ``--model-ema``: an ``AveragedModel`` (parameters and buffers) updated every
    ``steps`` optimizer steps, copying the weights outright during the warmup epochs.

    The decay is adjusted as the reference does (after pycls) so that the averaging horizon does not
    depend on the batch, the update interval or the run length:
    ``1 - decay_used = min(1, (1 - decay) x global_batch x steps / epochs)``.
    """

    def __init__(self, model: nn.Module, decay: float, steps: int, global_batch: int, epochs: int,
                 warmup_epochs: int, device: torch.device) -> None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        alpha = min(1.0, (1.0 - decay) * global_batch * steps / epochs)
        self.decay = 1.0 - alpha
        self.steps, self.warmup_epochs, self.source = steps, warmup_epochs, model
        self.averaged = AveragedModel(model, device=device, multi_avg_fn=get_ema_multi_avg_fn(self.decay),
                                      use_buffers=True)

    def after_step(self, step: int, epoch: int) -> None:
        """Call after optimizer step ``step`` (0-based, within the epoch) of epoch ``epoch`` (0-based)."""
        if step % self.steps:
            return
        self.averaged.update_parameters(self.source)
        if epoch < self.warmup_epochs:
            self.averaged.n_averaged.fill_(0)  # the next update copies again
