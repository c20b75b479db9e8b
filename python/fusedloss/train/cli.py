"""Train a torchvision classifier on an ImageFolder dataset (ImageNet) with any of the fusedloss losses.

Single process::

    python -m fusedloss.train --data /data/imagenet --arch resnet34 --loss crl

Several GPUs or nodes (DistributedDataParallel; ``--batch-size`` is the global batch)::

    torchrun --standalone --nproc-per-node 8 -m fusedloss.train --data /data/imagenet --amp bf16

Defaults follow the recipe of the CRL paper's ImageNet runs (the PyTorch
reference recipe): 90 epochs, SGD momentum 0.9, weight decay 1e-4, batch 256,
lr 0.1 x batch/256 divided by 10 at epochs 30 and 60. ``--recipe torchvision-v2`` switches
to torchvision's ResNet-50 v2 recipe (mixup, cutmix, label smoothing, TrivialAugment, random
erasing, warmup + cosine, EMA; the flags have the names and defaults of torchvision's
``references/classification/train.py``; flags given override the recipe). Each epoch writes
``checkpoint.pt`` (atomically), ``best.pt`` when top-1 improves, and a line of
``log.jsonl``; ``--resume`` continues exactly where the checkpoint left off.
``--plot RUN...`` draws the curves of one or several runs.

Exit status: 0 on success, 2 on bad input (data folder, checkpoint, names), with a one-line message.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import functools
import json
import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn

import fusedloss as fl
from fusedloss._extras import MissingExtraError, require_extra
from fusedloss.train import distill
from fusedloss.train.ckpt import (BEST, FORMAT, LAST, capture_rng, check_resume_compatible, load_checkpoint,
                                  load_training_state, restore_rng, save_atomic)
from fusedloss.train.data import Augment, Loaders, TrainInputError, image_folder_loaders, synthetic_loaders
from fusedloss.train.dist import DistContext, all_agree, all_gather_objects, init_distributed, shutdown
from fusedloss.train.loop import StepConfig, evaluate, train_one_epoch
from fusedloss.train.plot import LOG_NAME, append_record, plot_runs, rewrite_log
from fusedloss.train.recipe import (LR_SCHEDULERS, RECIPES, BatchMix, MixedTarget, MixedTargetLoss, ModelEma,
                                    lr_schedule_alias, make_scheduler, param_groups, resolve_args)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO_AUGMENT = ("ra", "ta_wide", "augmix", "imagenet", "cifar10", "svhn")


class _DefaultsOnceFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help exactly once: added to options without a help text too
    (argparse's formatter skips those), never beside a help text that already says its default."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)  # argparse prints no line of help at all for help=None
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default:" in text or action.default is argparse.SUPPRESS or action.option_strings == ["-h", "--help"]:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fusedloss.train", description=__doc__.split("\n\n")[0],
                                formatter_class=_DefaultsOnceFormatter,
                                epilog="Needs the train extra (torchvision, pillow, tqdm, matplotlib): "
                                       "pip install 'fusedloss[train]'.")
    data = p.add_argument_group("data")
    data.add_argument("--data", metavar="DIR", help="ImageFolder root with train/ and val/")
    data.add_argument("--dummy", action="store_true", help="synthetic data of ImageNet's shapes instead of --data")
    data.add_argument("--dummy-train-size", type=int, default=1_281_167, help="--dummy: training images per epoch")
    data.add_argument("--dummy-val-size", type=int, default=50_000, help="--dummy: validation images")
    data.add_argument("--num-classes", type=int, default=1000, help="--dummy: number of classes")
    data.add_argument("--workers", type=int, default=4, help="data-loading processes per training process")

    aug = p.add_argument_group("augmentation (torchvision reference names and defaults)")
    aug.add_argument("--train-crop-size", type=int, default=224, help="random-resized crop size for training")
    aug.add_argument("--val-resize-size", "--val-resize", dest="val_resize_size", type=int, default=256,
                     help="validation resize before the center crop (--val-resize: old name)")
    aug.add_argument("--val-crop-size", type=int, default=224, help="validation center-crop size")
    aug.add_argument("--image-size", type=int, default=None,
                     help="old single size, kept as an alias: sets --train-crop-size and --val-crop-size, "
                          "and --val-resize-size to round(size x 256/224), wherever those are not given")
    aug.add_argument("--interpolation", choices=("nearest", "bilinear", "bicubic"), default="bilinear",
                     help="resampling of the crops and the resize")
    aug.add_argument("--auto-augment", choices=AUTO_AUGMENT, default=None, help="auto-augment policy")
    aug.add_argument("--ra-magnitude", type=int, default=9, help="--auto-augment ra: magnitude")
    aug.add_argument("--augmix-severity", type=int, default=3, help="--auto-augment augmix: severity")
    aug.add_argument("--random-erase", type=float, default=0.0, help="random-erasing probability")
    aug.add_argument("--mixup-alpha", type=float, default=0.0, help="mixup alpha (0: off)")
    aug.add_argument("--cutmix-alpha", type=float, default=0.0,
                     help="cutmix alpha (0: off); with both, each batch gets one of the two at random")

    model = p.add_argument_group("model and loss")
    model.add_argument("--arch", default="resnet50", help="any torchvision classification model name")
    model.add_argument("--loss", default="ce", choices=fl.LOSSES)
    model.add_argument("--alpha", type=float, default=1.5, help="crl: alpha (paper parameterization)")
    model.add_argument("--beta", type=float, default=1.0, help="crl: beta")
    model.add_argument("--gamma", type=float, default=2.0, help="focal: gamma")
    model.add_argument("--label-smoothing", type=float, default=0.0,
                       help="applied inside the loss, as the reference does (every loss the library defines it for)")
    model.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=False,
                       help="track an exponential moving average of the weights, evaluated each epoch")
    model.add_argument("--model-ema-steps", type=int, default=32, help="optimizer steps between EMA updates")
    model.add_argument("--model-ema-decay", type=float, default=0.99998,
                       help="EMA decay (adjusted for batch, steps and epochs as the reference does)")

    opt = p.add_argument_group("optimization")
    opt.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                     help="fill in a published recipe's settings; flags given on the command line override it")
    opt.add_argument("--epochs", type=int, default=90)
    opt.add_argument("--batch-size", type=int, default=256, help="global batch, split over all processes")
    opt.add_argument("--lr", type=float, default=None, help="base learning rate (default: 0.1 x batch-size/256)")
    opt.add_argument("--momentum", type=float, default=0.9)
    opt.add_argument("--wd", "--weight-decay", dest="wd", type=float, default=1e-4)
    opt.add_argument("--norm-weight-decay", type=float, default=None,
                     help="weight decay of normalization layers' parameters (None: --wd)")
    opt.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default="multisteplr",
                     help="multisteplr: x --lr-gamma at each of --lr-steps (torchvision's default is steplr, "
                          "every --lr-step-size epochs: the same lr over 90 epochs)")
    opt.add_argument("--lr-schedule", dest="lr_scheduler", type=lr_schedule_alias, metavar="{step,cosine}",
                     default=argparse.SUPPRESS,
                     help="old name: step = multisteplr, cosine = cosineannealinglr")
    opt.add_argument("--lr-steps", type=int, nargs="+", default=[30, 60], help="multisteplr: its milestones")
    opt.add_argument("--lr-step-size", type=int, default=30, help="steplr: epochs between lr steps")
    opt.add_argument("--lr-gamma", type=float, default=0.1, help="steplr, multisteplr, exponentiallr: lr factor")
    opt.add_argument("--lr-min", type=float, default=0.0, help="cosineannealinglr: final lr")
    opt.add_argument("--lr-warmup-epochs", type=int, default=0, help="epochs of warmup before the scheduler")
    opt.add_argument("--lr-warmup-method", choices=("linear", "constant"), default="constant",
                     help="linear: from lr x decay up to lr; constant: lr x decay throughout the warmup")
    opt.add_argument("--lr-warmup-decay", type=float, default=0.01, help="warmup starts at lr x this")

    run = p.add_argument_group("execution")
    run.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    run.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none", help="autocast dtype (fp16 adds a GradScaler)")
    run.add_argument("--channels-last", action="store_true")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs (CUDA only)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--output", metavar="DIR", default=None, help="run directory (default: runs/<arch>-<loss>)")
    run.add_argument("--resume", metavar="CKPT", nargs="?", const="auto", default=None,
                     help="continue from CKPT; bare --resume: from OUTPUT/checkpoint.pt if it exists, else start fresh")
    run.add_argument("--print-freq", type=int, default=50, help="steps between progress updates")
    run.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default="auto",
                     help="tqdm bar, meter lines, or nothing (auto: a bar on a terminal, lines otherwise)")

    distill.add_arguments(p)

    plot = p.add_argument_group("plotting (no training)")
    plot.add_argument("--plot", metavar="RUN", nargs="+", default=None,
                      help="draw the curves of these run directories (or log.jsonl files) and exit")
    plot.add_argument("--plot-out", metavar="PNG", default="curves.png")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before touching data or devices."""
    import torchvision

    if (args.data is None) == (not args.dummy):
        raise TrainInputError("give exactly one of --data DIR and --dummy")
    archs = torchvision.models.list_models(module=torchvision.models)
    if args.arch not in archs:
        close = difflib.get_close_matches(args.arch, archs, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; choose from {', '.join(archs)}"
        raise TrainInputError(f"--arch {args.arch!r}: not a torchvision classification model{hint}")
    for name in ("epochs", "batch_size", "print_freq", "train_crop_size", "val_crop_size", "val_resize_size",
                 "num_classes", "model_ema_steps"):
        if getattr(args, name) < 1:
            raise TrainInputError(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers < 0:
        raise TrainInputError("--workers must be >= 0")
    for name in ("mixup_alpha", "cutmix_alpha", "lr_warmup_epochs"):
        if getattr(args, name) < 0:
            raise TrainInputError(f"--{name.replace('_', '-')} must be >= 0")
    if not 0.0 <= args.random_erase <= 1.0:
        raise TrainInputError("--random-erase is a probability: it must be in [0, 1]")
    if args.lr_warmup_epochs >= args.epochs:
        raise TrainInputError(f"--lr-warmup-epochs {args.lr_warmup_epochs} must be below --epochs {args.epochs}")
    make_criterion(args)  # the loss library's own checks (e.g. label smoothing for a loss without it)
    distill.check_args(args)


def make_criterion(args: argparse.Namespace, num_classes: int = 2) -> MixedTargetLoss:
    """The chosen loss, probed once on a 2-row batch so that bad options fail now, not at step one.

    With mixup/cutmix the probe includes a mixed batch, through the same route training takes. The
    probe's tensors are on the CPU, so it runs the reference backend (``"auto"``, which training
    uses, may be pinned by ``FUSEDLOSS_BACKEND`` to a backend that needs a GPU).
    """
    options = dict(loss=args.loss, alpha=args.alpha, beta=args.beta, gamma=args.gamma,
                   label_smoothing=args.label_smoothing)
    try:
        probe = MixedTargetLoss(fl.SoftmaxLoss(**options, backend="reference"), num_classes)
        logits, labels = torch.zeros(2, num_classes), torch.arange(2) % num_classes
        probe(logits, labels)
        if args.mixup_alpha > 0 or args.cutmix_alpha > 0:
            probe(logits, MixedTarget(labels, labels.flip(0), torch.tensor([0.25, 0.75], dtype=torch.float64)))
    except (ValueError, NotImplementedError) as err:
        raise TrainInputError(f"--loss {args.loss}: {err}") from None
    return MixedTargetLoss(fl.SoftmaxLoss(**options), num_classes, fused_two_target=probe.fused_two_target)


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialized torchvision model with ``num_classes`` outputs."""
    import torchvision

    kwargs: dict[str, Any] = {}
    if arch in ("inception_v3", "googlenet"):
        # Their auxiliary heads return a tuple in training and leave parameters
        # without gradients, which DDP rejects; the plain classifier is what we compare.
        kwargs.update(aux_logits=False, init_weights=True)
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)


def seed_all(seed: int, *streams: int) -> None:
    """Seed Python, NumPy and torch from ``(seed, *streams)``."""
    state = int(np.random.SeedSequence([seed, *streams]).generate_state(1)[0])
    random.seed(state)
    np.random.seed(state)
    torch.manual_seed(state)


def make_loaders(args: argparse.Namespace, ctx: DistContext, per_rank_batch: int) -> Loaders:
    if args.dummy:
        return synthetic_loaders(args.dummy_train_size, args.dummy_val_size, args.num_classes, per_rank_batch,
                                 args.train_crop_size, args.val_crop_size, ctx.world_size, ctx.device, args.seed,
                                 ctx.rank)
    aug = Augment(args.train_crop_size, args.val_resize_size, args.val_crop_size, args.interpolation,
                  args.auto_augment, args.random_erase, args.ra_magnitude, args.augmix_severity)
    return image_folder_loaders(args.data, per_rank_batch, args.workers, aug, ctx.rank, ctx.world_size, args.seed,
                                pin_memory=ctx.device.type == "cuda")


def resolve_resume(args: argparse.Namespace, output: str) -> str | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to overwrite a run by accident."""
    last = os.path.join(output, LAST)
    if args.resume == "auto":
        return last if os.path.isfile(last) else None
    if args.resume is None and os.path.isfile(last):
        raise TrainInputError(f"--output {output!r} already holds a run ({LAST}); "
                              "pass --resume to continue it, or choose another --output")
    return args.resume


def format_epoch(record: dict[str, Any], epochs: int) -> str:
    return (f"epoch {record['epoch']}/{epochs} lr {record['lr']:.4g} | "
            f"train loss {record['train_loss']:.4f} top1 {record['train_top1']:.2f} "
            f"top5 {record['train_top5']:.2f} {record['train_img_s']:.0f} img/s | "
            f"val loss {record['val_loss']:.4f} nll {record['val_nll']:.4f} "
            f"top1 {record['val_top1']:.2f} top5 {record['val_top5']:.2f} | "
            + (f"EMA top1 {record['ema_val_top1']:.2f} top5 {record['ema_val_top5']:.2f} | " if "ema_val_top1" in record
               else "")
            + f"{record['train_seconds'] + record['val_seconds']:.1f} s" + (" *best*" if record["is_best"] else ""))


def train(args: argparse.Namespace) -> int:
    """Check the arguments, join the process group if any, run, and always leave the group."""
    check_args(args)
    ctx = init_distributed(args.device)
    try:
        return run(args, ctx)
    finally:
        shutdown(ctx)


def run(args: argparse.Namespace, ctx: DistContext) -> int:
    say = print if ctx.is_main else (lambda *a, **k: None)
    if args.sync_bn and ctx.device.type != "cuda":
        raise TrainInputError("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU kernels)")
    if args.batch_size % ctx.world_size:
        raise TrainInputError(f"--batch-size {args.batch_size} (global) is not divisible by {ctx.world_size} processes")
    per_rank_batch = args.batch_size // ctx.world_size
    lr = args.lr if args.lr is not None else 0.1 * args.batch_size / 256
    output = args.output or os.path.join("runs", f"{args.arch}-{args.loss}")
    seed_all(args.seed)  # same on every rank: identical initial weights

    # Input errors can differ between ranks (a checkpoint on one node's disk only);
    # agree on success first so no rank waits forever in a collective.
    failure: TrainInputError | None = None
    try:
        loaders = make_loaders(args, ctx, per_rank_batch)
        resume_path = resolve_resume(args, output)
        ckpt = load_checkpoint(resume_path) if resume_path else None
        if ckpt is not None:
            check_resume_compatible(ckpt, resume_path, args.arch, loaders.classes)  # type: ignore[arg-type]
        teacher = distill.load_teacher(args, loaders.classes, ctx.device) if args.teacher else None
    except TrainInputError as err:
        failure = err
    if not all_agree(failure is None, ctx):
        raise failure or TrainInputError("another process failed to start; see its message")
    num_classes = len(loaders.classes)

    raw_model = build_model(args.arch, num_classes)
    seed_all(args.seed, 1 + ctx.rank)  # from here on (augmentation, dropout) each rank draws its own numbers
    if args.sync_bn and ctx.distributed:
        raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    raw_model.to(ctx.device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    criterion = make_criterion(args, num_classes).to(ctx.device)
    optimizer = torch.optim.SGD(param_groups(raw_model, args.wd, args.norm_weight_decay), lr=lr,
                                momentum=args.momentum, weight_decay=args.wd)
    scheduler = make_scheduler(optimizer, args)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.amp == "fp16")
    ema = ModelEma(raw_model, args.model_ema_decay, args.model_ema_steps, args.batch_size, args.epochs,
                   args.lr_warmup_epochs, ctx.device) if args.model_ema else None
    mix = BatchMix(args.mixup_alpha, args.cutmix_alpha) if args.mixup_alpha > 0 or args.cutmix_alpha > 0 else None
    distiller = distill.Distiller(*teacher, criterion, args) if teacher is not None else None

    start_epoch, best_top1, history = 0, 0.0, []
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        load_training_state(ckpt, resume_path, optimizer, scheduler, ema)  # type: ignore[arg-type]
        scaler.load_state_dict(ckpt["scaler"])
        saved_epochs = ckpt.get("args", {}).get("epochs", args.epochs)
        if saved_epochs != args.epochs and args.lr_scheduler == "cosineannealinglr":
            say(f"note: the LR schedule is restored as the checkpoint built it, for --epochs {saved_epochs} "
                f"(a cosine schedule does not stretch to --epochs {args.epochs})", flush=True)
        if ema is not None and "model_ema" not in ckpt:
            say("note: the checkpoint has no EMA weights (trained without --model-ema): the EMA starts from "
                "the resumed weights", flush=True)
        start_epoch, best_top1, history = ckpt["epoch"], ckpt["best_top1"], ckpt["history"]
        rng = ckpt["rng"]
        if len(rng) == ctx.world_size:
            restore_rng(rng[ctx.rank], ctx.device, loaders.generators())
        else:  # a different process count cannot replay the same streams anyway
            say(f"note: checkpoint was written by {len(rng)} processes, this run has {ctx.world_size}: "
                "random streams are re-seeded, the run continues but not bit-for-bit", flush=True)
            seed_all(args.seed, 1 + ctx.rank, start_epoch)
        if ckpt["loss"] != args.loss:
            say(f"note: checkpoint was trained with --loss {ckpt['loss']}, continuing with --loss {args.loss}", flush=True)
        say(f"resumed from {resume_path} after epoch {start_epoch} (best top-1 {best_top1:.2f})", flush=True)

    train_model: nn.Module = raw_model
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(raw_model, device_ids=device_ids)
    # Evaluation runs on the unwrapped model: no DDP collectives per step, so ranks may
    # hold shards of different lengths (see ShardSampler).
    eval_model: nn.Module = raw_model
    if args.compile:
        train_model, eval_model = torch.compile(train_model), torch.compile(raw_model)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels

    log_path = os.path.join(output, LOG_NAME)
    if ctx.is_main:
        os.makedirs(output, exist_ok=True)
        rewrite_log(log_path, history)  # the checkpoint's history is the truth (empty for a fresh run)
        config = dict(vars(args), lr=lr, world_size=ctx.world_size, per_process_batch=per_rank_batch,
                      num_classes=num_classes, device=str(ctx.device), output=output)
        with open(os.path.join(output, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
    extras = []
    if mix is not None:
        extras.append(f"mixup {args.mixup_alpha:g} / cutmix {args.cutmix_alpha:g} -> {criterion.mixed_path(ctx.device)}")
    if distiller is not None:
        extras.append(distiller.describe(args.teacher))
    if ema is not None:
        extras.append(f"EMA decay {ema.decay:.6g} every {args.model_ema_steps} steps")
    say(f"{args.arch} with --loss {args.loss} on {num_classes} classes: {ctx.world_size} process(es) on "
        f"{ctx.device.type}, batch {args.batch_size} ({per_rank_batch} per process), lr {lr:g}, "
        f"{len(loaders.train)} steps/epoch, output {output}" + "".join(f"; {e}" for e in extras), flush=True)
    if start_epoch >= args.epochs:
        say(f"nothing to do: the checkpoint already has {start_epoch} of --epochs {args.epochs}", flush=True)
        return 0

    step_cfg = StepConfig(ctx.device, AMP_DTYPES[args.amp], args.channels_last, args.print_freq,
                          args.progress if args.progress != "auto" else ("bar" if sys.stderr.isatty() else "lines"))
    for epoch in range(start_epoch, args.epochs):
        loaders.seed_epoch(args.seed, epoch, ctx.rank)
        epoch_lr = optimizer.param_groups[0]["lr"]
        after_step = functools.partial(ema.after_step, epoch=epoch) if ema is not None else None
        tr = train_one_epoch(train_model, criterion, optimizer, scaler, loaders.train,
                             f"train {epoch + 1}/{args.epochs}", step_cfg, ctx, mix=mix, after_step=after_step,
                             distill=distiller)
        va = evaluate(eval_model, criterion, loaders.val, f"val {epoch + 1}/{args.epochs}", step_cfg, ctx)
        scheduler.step()
        is_best = va["top1"] > best_top1 or not history
        best_top1 = max(best_top1, va["top1"])
        record = {"epoch": epoch + 1, "arch": args.arch, "loss": args.loss, "lr": epoch_lr,
                  "train_loss": tr["loss"], "train_top1": tr["top1"], "train_top5": tr["top5"],
                  "train_img_s": tr["img_s"], "train_seconds": tr["seconds"], "train_images": tr["images"],
                  "val_loss": va["loss"], "val_nll": va["nll"], "val_top1": va["top1"], "val_top5": va["top5"],
                  "val_seconds": va["seconds"], "val_images": va["images"], "best_top1": best_top1, "is_best": is_best,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if ema is not None:
            ev = evaluate(ema.averaged, criterion, loaders.val, f"val EMA {epoch + 1}/{args.epochs}", step_cfg, ctx)
            record.update({f"ema_val_{k}": ev[k] for k in ("loss", "nll", "top1", "top5")})
        history = history + [record]
        rng_states = all_gather_objects(capture_rng(ctx.device, loaders.generators()), ctx)  # every rank takes part
        if ctx.is_main:
            ckpt_out = {"format": FORMAT, "epoch": epoch + 1, "arch": args.arch, "loss": args.loss,
                        "num_classes": num_classes, "classes": loaders.classes, "args": json_safe(vars(args)),
                        "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                        "best_top1": best_top1, "history": history, "rng": rng_states}
            if ema is not None:
                ckpt_out["model_ema"] = ema.averaged.state_dict()
            # Checkpoint first, log line second: if killed in between, resume rewrites the log from history.
            save_atomic(ckpt_out, os.path.join(output, LAST))
            if is_best:
                save_atomic(ckpt_out, os.path.join(output, BEST))
            append_record(log_path, record)
            say(format_epoch(record, args.epochs), flush=True)
    return 0


def json_safe(d: dict[str, Any]) -> dict[str, Any]:
    """Arguments as plain JSON types, so the checkpoint stays loadable with ``weights_only=True``."""
    return json.loads(json.dumps(d, default=str))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = build_parser()
    args = resolve_args(parser, argv)
    try:
        distill.check_flags(parser, argv, args)
        # Before any work: training needs the whole [train] extra, --plot only its matplotlib.
        if args.plot:
            require_extra("train", "--plot", ("matplotlib",))
        else:
            require_extra("train", "python -m fusedloss.train")
        if args.plot:
            print(f"wrote {plot_runs(args.plot, args.plot_out)}")
            return 0
        return train(args)
    except (TrainInputError, MissingExtraError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
