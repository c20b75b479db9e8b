"""Training throughput with each loss: ``fusedloss.train --dummy`` per loss, images/s as a markdown table.

On a GPU (the configuration of the issue: resnet50, bf16 autocast, channels-last)::

    python bench/imagenet/throughput.py --out bench/imagenet/throughput_h100.md

Each loss trains 2 epochs of ``--steps`` steps on synthetic data kept on the GPU;
the table reports the second epoch (the first one pays for cuDNN autotuning and
allocator warm-up). ``ce`` runs again at the end: the gap between its two runs is
the noise floor against which the other ratios are to be read.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

try:
    import fusedloss as fl
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
    import fusedloss as fl
import torch

from fusedloss.train import main as train_main
from fusedloss.train.plot import read_log


def measure(loss: str, args: argparse.Namespace) -> dict:
    """Run 2 epochs of synthetic data with ``loss``; return the second epoch's log record."""
    with tempfile.TemporaryDirectory() as out:
        argv = ["--dummy", "--arch", args.arch, "--loss", loss, "--device", args.device, "--amp", args.amp,
                "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
                "--dummy-train-size", str(args.steps * args.batch_size), "--dummy-val-size", str(args.batch_size),
                "--epochs", "2", "--workers", "0", "--progress", "none", "--output", out]
        if args.channels_last:
            argv.append("--channels-last")
        if train_main(argv) != 0:
            raise SystemExit(f"training with --loss {loss} failed")
        return read_log(out)[-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=200, help="training steps per epoch")
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default="bf16")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--device", default="cuda")
    p.add_argument("--losses", nargs="+", choices=fl.LOSSES, default=list(fl.LOSSES))
    p.add_argument("--out", default=None, help="write the markdown table here too")
    args = p.parse_args(argv)

    order = [*args.losses, *(["ce"] if "ce" in args.losses else [])]  # ce twice: the noise floor
    rows = [(loss, measure(loss, args)["train_img_s"]) for loss in order]
    base = rows[0][1] if rows[0][0] == "ce" else None
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    lines = [f"Training throughput, {args.arch}, batch {args.batch_size}, {args.image_size}x{args.image_size}, "
             f"--amp {args.amp}{', channels-last' if args.channels_last else ''}, synthetic data, "
             f"{args.steps} steps (second epoch), {device}, torch {torch.__version__}.", "",
             "| loss | images/s | ratio to ce |", "|---|---|---|"]
    seen: set[str] = set()
    for loss, img_s in rows:
        label = f"`{loss}` (again)" if loss in seen else f"`{loss}`"
        seen.add(loss)
        ratio = f"{img_s / base:.3f}" if base else "-"
        lines.append(f"| {label} | {img_s:.0f} | {ratio} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
