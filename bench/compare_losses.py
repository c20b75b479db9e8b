"""Compare the six fusedloss losses on real data: a small CNN on scikit-learn's handwritten digits.

``load_digits`` ships with scikit-learn (1797 real 8x8 grayscale digits, 10
classes; no download). One fixed stratified split (449 train / 1348 test); for
each loss and each seed the same recipe: the same initial weights and batch
order per seed across losses (a paired comparison), SGD with momentum, cosine
learning rate, and the test accuracy *after the last epoch* (no early stopping
on the test set). Writes a markdown table of mean +- std over the seeds, the raw
numbers as JSON, and a plot of the test curves::

    python bench/compare_losses.py                 # 6 losses x 5 seeds x 30 epochs: a few minutes on one core
    python bench/compare_losses.py --seeds 1 --epochs 2 --out /tmp/smoke
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

try:
    import fusedloss as fl
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import fusedloss as fl

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = "digits_losses"
# Hyper-parameters of the losses that have them: the papers' defaults (see docs/losses.md).
LOSS_KWARGS = {"crl": {"alpha": 1.5, "beta": 1.0}, "focal": {"gamma": 2.0}}


@dataclass(frozen=True)
class Recipe:
    """The training recipe every loss gets."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass
class RunResult:
    """One (loss, seed) run: per-epoch curves and the final test numbers."""

    loss: str
    seed: int
    train_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    test_nll: list[float] = field(default_factory=list)
    test_max_logit: list[float] = field(default_factory=list)
    seconds: float = 0.0


def load_split(train_fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as (N, 1, 8, 8) float tensors standardized with the training set's statistics.

    A small training fraction keeps the task off the ceiling: trained on 75 % of
    the digits, this CNN reaches 99.6-100 % test accuracy with most losses, and the
    table could not tell them apart; a large test set also makes one error weigh less.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None]  # pixel values 0..16
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, train_size=train_fraction, stratify=y, random_state=0)
    mean, std = x_train.mean(), x_train.std()
    return (torch.from_numpy((x_train - mean) / std), torch.from_numpy(y_train),
            torch.from_numpy((x_test - mean) / std), torch.from_numpy(y_test))


def small_cnn(num_classes: int = 10) -> nn.Module:
    """Three 3x3 conv blocks (32, 64, 128 channels, one 2x2 pool) and a linear head: ~94k parameters."""
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(1, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """Test accuracy (%), cross-entropy and the largest |logit|.

    The cross-entropy compares losses whose own values do not; the largest logit
    shows a loss that is unbounded below (``nllr``) pushing the logits without limit.
    """
    model.eval()
    logits = model(x)
    accuracy = 100.0 * (logits.argmax(1) == y).double().mean().item()
    return accuracy, F.cross_entropy(logits, y).item(), logits.abs().max().item()


def train_one(loss: str, seed: int, data: tuple[torch.Tensor, ...], recipe: Recipe) -> RunResult:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)  # the same initial weights for every loss at this seed
    model = small_cnn()
    order = torch.Generator().manual_seed(seed)  # and the same batch order
    criterion = fl.SoftmaxLoss(loss=loss, **LOSS_KWARGS.get(loss, {}))
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs)
    result = RunResult(loss, seed)
    start = time.perf_counter()
    for _ in range(recipe.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=order)
        total, count = 0.0, 0
        # drop the last partial batch: a batch of 1 or 2 makes BatchNorm statistics noise
        for i in range(0, len(perm) - recipe.batch_size + 1, recipe.batch_size):
            idx = perm[i:i + recipe.batch_size]
            value = criterion(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            total, count = total + value.item() * len(idx), count + len(idx)
        scheduler.step()
        acc, nll, max_logit = evaluate(model, x_test, y_test)
        result.train_loss.append(total / count)
        result.test_acc.append(acc)
        result.test_nll.append(nll)
        result.test_max_logit.append(max_logit)
    result.seconds = time.perf_counter() - start
    return result


def mean_std(values: list[float], digits: int = 2) -> str:
    """``mean ± sample std``; just the value for a single seed."""
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(results: list[RunResult], recipe: Recipe, seeds: list[int], split: tuple[int, int],
                   command: str, seconds: float) -> str:
    """The papers' style: one row per loss, mean ± std (sample std) over the seeds of the final-epoch numbers."""
    losses = list(dict.fromkeys(r.loss for r in results))
    lines = [
        f"# {len(losses)} losses on scikit-learn digits: small CNN, {len(seeds)} seed(s)",
        "",
        f"Made by `{command}` ({seconds / 60:.1f} min, torch {torch.__version__}, fusedloss {fl.__version__}, "
        f"{platform.machine()} CPU, 1 thread).",
        "",
        f"Data: `sklearn.datasets.load_digits`, 1797 real 8x8 digits, one stratified split "
        f"({split[0]} train / {split[1]} test, `random_state=0`). Model: 3 conv blocks + linear head. Recipe for every loss: "
        f"{recipe.epochs} epochs, batch {recipe.batch_size}, SGD lr {recipe.lr} momentum {recipe.momentum} "
        f"weight decay {recipe.weight_decay}, cosine schedule; seeds {seeds} (seed = initial weights and batch "
        f"order, shared by all losses). Numbers are after the last epoch (no early stopping on the test set); "
        f"± is the sample standard deviation over seeds; largest \\|logit\\| is over the test set and all seeds.",
        "",
        "| loss | hyper-parameters | test accuracy (%) | test error (%) | test cross-entropy | largest \\|logit\\| "
        "| per-seed accuracy (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for loss in losses:
        runs = [r for r in results if r.loss == loss]
        acc = [r.test_acc[-1] for r in runs]
        err = [100.0 - a for a in acc]
        nll = [r.test_nll[-1] for r in runs]
        max_logit = max(r.test_max_logit[-1] for r in runs)
        params = ", ".join(f"{k}={v}" for k, v in LOSS_KWARGS.get(loss, {}).items()) or "-"
        lines.append(f"| `{loss}` | {params} | {mean_std(acc)} | {mean_std(err)} | {mean_std(nll, 3)} | {max_logit:.3g} | "
                     f"{' / '.join(f'{a:.2f}' for a in acc)} |")
    return "\n".join(lines) + "\n"


def plot_curves(results: list[RunResult], path: str) -> None:
    """Test error, test cross-entropy and largest |logit| per epoch: median over seeds, band = min to max.

    Log scales, so that a loss that collapses (tens of % error) and the small
    differences near 1.5 % error show on the same axes. Min-max bands rather than
    +- std, which would go below zero on a log axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    losses = list(dict.fromkeys(r.loss for r in results))
    panels = (("test error (%)", lambda r: [100.0 - a for a in r.test_acc]),
              ("test cross-entropy", lambda r: r.test_nll),
              ("largest |logit| on the test set", lambda r: r.test_max_logit))
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4.6))
    for loss in losses:
        runs = [r for r in results if r.loss == loss]
        for ax, (_, values) in zip(axes, panels):
            curves = np.array([values(r) for r in runs], dtype=np.float64)
            epochs = np.arange(1, curves.shape[1] + 1)
            line = ax.plot(epochs, np.median(curves, 0), label=loss)[0]
            ax.fill_between(epochs, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15, lw=0)
    for ax, (title, _) in zip(axes, panels):
        ax.set_title(title)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
    axes[0].legend()
    n_seeds = len({r.seed for r in results})
    fig.suptitle(f"scikit-learn digits, small CNN, same recipe for every loss: median over {n_seeds} seed(s), "
                 "band = min to max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--losses", nargs="+", choices=fl.LOSSES, default=list(fl.LOSSES))
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    p.add_argument("--epochs", type=int, default=Recipe.epochs)
    p.add_argument("--lr", type=float, default=Recipe.lr)
    p.add_argument("--train-fraction", type=float, default=0.25, help="share of the 1797 digits used for training")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for digits_losses.{md,json,png}")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (the model is tiny: more threads mostly add contention)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = Recipe(epochs=args.epochs, lr=args.lr)
    seeds = list(range(args.seeds))
    data = load_split(args.train_fraction)
    results, start = [], time.perf_counter()
    for loss in args.losses:
        for seed in seeds:
            r = train_one(loss, seed, data, recipe)
            results.append(r)
            print(f"{loss:6s} seed {seed}: test accuracy {r.test_acc[-1]:.2f} %, cross-entropy "
                  f"{r.test_nll[-1]:.4f} ({r.seconds:.1f} s)", flush=True)
    seconds = time.perf_counter() - start

    os.makedirs(args.out, exist_ok=True)
    command = "python bench/compare_losses.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                  " " + " ".join(sys.argv[1:] if argv is None else argv))
    table = markdown_table(results, recipe, seeds, (len(data[0]), len(data[2])), command, seconds)
    with open(os.path.join(args.out, f"{NAME}.md"), "w", encoding="utf-8") as f:
        f.write(table)
    with open(os.path.join(args.out, f"{NAME}.json"), "w", encoding="utf-8") as f:
        json.dump({"recipe": recipe.__dict__, "seeds": seeds, "runs": [r.__dict__ for r in results]}, f, indent=1)
    plot_curves(results, os.path.join(args.out, f"{NAME}.png"))
    print(table)
    print(f"wrote {args.out}/{NAME}.md, .json and .png in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
