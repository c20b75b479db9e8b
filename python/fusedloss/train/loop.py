"""One training epoch and one evaluation pass, with loss / top-1 / top-5 / images-per-second meters.

The running sums live on the device and are read back only when a progress line
is due (every ``print_freq`` steps) and at the end of the pass: a ``.item()`` per
step would stall the GPU on every batch.
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fusedloss.train.dist import DistContext, all_reduce_sum
from fusedloss.train.recipe import MixedTarget


@dataclass(frozen=True)
class StepConfig:
    """How each step runs: device, autocast dtype (None = fp32), memory format, progress output."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    print_freq: int
    progress: str  # "bar" (tqdm), "lines" (a meter line every print_freq steps) or "none"


class Meters:
    """Device-side sums of loss, correct top-1 / top-k and sample count over a pass."""

    def __init__(self, device: torch.device) -> None:
        # float64: the count and sums stay exact over an ImageNet epoch (1.28M samples).
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, nll, top1, top5, n
        self.start = time.perf_counter()

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor,
               nll: torch.Tensor | None = None) -> None:
        n = target.shape[0]
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(target[:, None])
        self.sums[0] += loss.detach().double() * n  # loss is a batch mean
        if nll is not None:
            self.sums[1] += nll.double()
        self.sums[2] += hit[:, 0].sum()
        self.sums[3] += hit.any(dim=1).sum()
        self.sums[4] += n

    def read(self, ctx: DistContext | None = None) -> dict[str, float]:
        """Means over what this rank saw, or over all ranks when ``ctx`` is given (a collective)."""
        sums = self.sums.clone()
        if ctx is not None:
            all_reduce_sum(sums, ctx)
        loss, nll, top1, top5, n = sums.tolist()
        seconds = time.perf_counter() - self.start
        n_safe = max(n, 1.0)
        return {"loss": loss / n_safe, "nll": nll / n_safe, "top1": 100.0 * top1 / n_safe,
                "top5": 100.0 * top5 / n_safe, "images": int(n), "seconds": seconds,
                "img_s": n / seconds if seconds > 0 else 0.0}


class Progress:
    """A tqdm bar or plain meter lines on rank 0; nothing on the other ranks."""

    def __init__(self, total: int, desc: str, cfg: StepConfig, ctx: DistContext) -> None:
        self.desc, self.total, self.cfg = desc, total, cfg
        self.enabled = ctx.is_main and cfg.progress != "none"
        self.bar = None
        if self.enabled and cfg.progress == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, file=sys.stderr)

    def step(self, i: int, meters: Meters, world_size: int) -> None:
        """Report after step ``i`` (0-based) when it is the last step or a multiple of print_freq."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
        if (i + 1) % self.cfg.print_freq and i + 1 != self.total:
            return
        m = meters.read()  # this rank's running means: no collective mid-epoch
        fields = f"loss {m['loss']:.4f} top1 {m['top1']:.2f} top5 {m['top5']:.2f} img/s {m['img_s'] * world_size:.0f}"
        if self.bar is not None:
            self.bar.set_postfix_str(fields)
        else:
            print(f"{self.desc} [{i + 1}/{self.total}] {fields}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def autocast(cfg: StepConfig) -> contextlib.AbstractContextManager:
    if cfg.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=cfg.device.type, dtype=cfg.amp_dtype)


def to_device(images: torch.Tensor, target: torch.Tensor, cfg: StepConfig) -> tuple[torch.Tensor, torch.Tensor]:
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    images = images.to(cfg.device, non_blocking=True, memory_format=memory_format)
    return images, target.to(cfg.device, non_blocking=True)


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, loader: Iterable, desc: str, cfg: StepConfig,
                    ctx: DistContext, mix: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None,
                    after_step: Callable[[int], None] | None = None,
                    distill: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor] | None = None,
                    ) -> dict[str, float]:
    """One pass over ``loader``; returns the epoch's means over all ranks.

    ``mix(images, labels) -> (images, MixedTarget)`` (mixup/cutmix) runs on the device before the
    forward; top-1/top-5 are then scored against each row's dominant class, as torchvision's
    reference does. ``after_step(i)`` runs after optimizer step ``i`` (the model EMA).
    ``distill(images, logits, target) -> loss`` (``--teacher``, :class:`fusedloss.train.distill.Distiller`)
    replaces ``criterion`` in training: it runs the teacher on the same (mixed) images.
    """
    model.train()
    meters = Meters(cfg.device)
    progress = Progress(len(loader), desc, cfg, ctx)  # type: ignore[arg-type]
    for i, (images, target) in enumerate(loader):
        images, target = to_device(images, target, cfg)
        loss_target: torch.Tensor | MixedTarget = target
        if mix is not None:
            images, loss_target = mix(images, target)
        with autocast(cfg):
            logits = model(images)
            loss = criterion(logits, loss_target) if distill is None else distill(images, logits, loss_target)
        optimizer.zero_grad(set_to_none=True)
        # The scaler is a pass-through unless --amp fp16.
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if after_step is not None:
            after_step(i)
        scored = loss_target.dominant() if isinstance(loss_target, MixedTarget) else target
        meters.update(logits.detach(), scored, loss)
        progress.step(i, meters, ctx.world_size)
    progress.close()
    return meters.read(ctx)


@torch.no_grad()
def evaluate(model: nn.Module, criterion: nn.Module, loader: Iterable, desc: str, cfg: StepConfig,
             ctx: DistContext) -> dict[str, float]:
    """Loss, cross-entropy, top-1 and top-5 over this rank's shard, summed over all ranks.

    ``nll`` (plain cross-entropy) is reported beside the training loss because the
    six losses live on different scales (``nllr`` is negative): only the NLL
    compares runs trained with different losses.
    """
    model.eval()
    meters = Meters(cfg.device)
    progress = Progress(len(loader), desc, cfg, ctx)  # type: ignore[arg-type]
    for i, (images, target) in enumerate(loader):
        images, target = to_device(images, target, cfg)
        with autocast(cfg):
            logits = model(images)
            loss = criterion(logits, target)
        nll = F.cross_entropy(logits.float(), target, reduction="sum")
        meters.update(logits, target, loss, nll)
        progress.step(i, meters, ctx.world_size)
    progress.close()
    return meters.read(ctx)
