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

The modern recipe's target side (torchvision's reference flags, names and meaning):
``--mixup-alpha`` / ``--cutmix-alpha`` mix each batch with torchvision.transforms.v2 MixUp or
CutMix (one of the two at random when both are given, on the 8x8 images), and
``--label-smoothing`` smooths every loss. Mixed targets reach the losses as
``fusedloss.train`` sends them (``train_recipe.BatchMix`` and ``MixedTargetLoss``): ``ce``
gets the class probabilities, every other loss the two-target form ``(y_a, y_b, lam)``.
``--with-plain`` also runs the plain recipe in the same invocation, for a paired
plain-vs-recipe table; such a run writes ``digits_losses_mixup.*`` unless ``--name`` says
otherwise::

    python bench/compare_losses.py --mixup-alpha 0.2 --cutmix-alpha 1.0 --label-smoothing 0.1 --with-plain

Knowledge distillation (``--kd-weight W > 0``): a teacher is trained first, once per invocation (the
same CNN with ``--teacher-width`` times the channels, ``ce``, ``--teacher-epochs`` epochs, seed
``--teacher-seed``, on the same training split), then every student trains on
``(1 - W) H + W T^2 KL`` as ``python -m fusedloss.train --teacher`` does (``fl.distill_loss``; with
mixup/cutmix the teacher sees the mixed images); ``--with-plain`` adds the same students without
the teacher, paired by seed. Such a run writes ``digits_distill.*``::

    python bench/compare_losses.py --kd-weight 0.5 --distill-temperature 4 --with-plain
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
from fusedloss.train.distill import Distiller  # noqa: E402  (python -m fusedloss.train --teacher's loss)
from fusedloss.train.recipe import BatchMix, MixedTargetLoss  # noqa: E402  (the route fusedloss.train takes)

HERE = os.path.dirname(os.path.abspath(__file__))

NAME = "digits_losses"
NAME_MIXED = "digits_losses_mixup"
NAME_DISTILL = "digits_distill"
NUM_CLASSES = 10
# Bins of the expected calibration error (Guo et al. 2017 use 15).
ECE_BINS = 15
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
    # The target side of torchvision's recipe; 0 = off (the plain recipe).
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    label_smoothing: float = 0.0
    # Knowledge distillation from the teacher (kd_weight 0 = off): (1 - W) H + W T^2 divergence.
    kd_weight: float = 0.0
    kd_temperature: float = 1.0
    kd_divergence: str = "kl"

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    @property
    def distills(self) -> bool:
        return self.kd_weight > 0

    @property
    def plain(self) -> bool:
        return not self.mixes and self.label_smoothing == 0 and not self.distills

    @property
    def label(self) -> str:
        """Short name of the recipe in tables: ``plain`` or e.g. ``mixup 0.2 / cutmix 1 / ls 0.1``."""
        parts = [f"{name} {value:g}" for name, value in (("mixup", self.mixup_alpha), ("cutmix", self.cutmix_alpha),
                                                          ("ls", self.label_smoothing)) if value > 0]
        if self.distills:
            parts.append(f"KD {self.kd_divergence} T {self.kd_temperature:g} W {self.kd_weight:g}")
        return " / ".join(parts) or "plain"

    def plain_twin(self) -> "Recipe":
        return Recipe(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                      weight_decay=self.weight_decay)


@dataclass
class RunResult:
    """One (loss, seed, recipe) run: per-epoch curves and the final test numbers."""

    loss: str
    seed: int
    recipe: str = "plain"
    # How mixed targets reached the loss (MixedTargetLoss.mixed_path()), "-" without mixing.
    target_path: str = "-"
    train_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    test_nll: list[float] = field(default_factory=list)
    test_ece: list[float] = field(default_factory=list)
    test_confidence: list[float] = field(default_factory=list)
    test_max_logit: list[float] = field(default_factory=list)
    seconds: float = 0.0
    model: nn.Module | None = field(default=None, repr=False)  # kept for the teacher only (not in the JSON)

    def record(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "model"}


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


def small_cnn(num_classes: int = 10, width: int = 1) -> nn.Module:
    """Three 3x3 conv blocks (32, 64, 128 channels x ``width``, one 2x2 pool) and a linear head: ~94k
    parameters (width 2, the distillation teacher: ~371k)."""
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    c = 32 * width
    return nn.Sequential(*block(1, c), *block(c, 2 * c), nn.MaxPool2d(2), *block(2 * c, 4 * c),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, num_classes))


def expected_calibration_error(logits: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE (%): the confidence ``max softmax`` in ``bins`` equal-width bins over (0, 1], the
    test-set share of each bin times |accuracy - mean confidence| in it, summed (Guo et al. 2017).

    Label smoothing and mixup are known to lower a CE model's over-confidence; this is
    the number that shows it (accuracy does not).
    """
    conf, pred = logits.double().softmax(1).max(1)
    correct = (pred == y).double()
    # bin b holds (b / bins, (b + 1) / bins]; conf >= 1 / C > 0, so bin 0 is never below its edge
    which = (conf * bins).ceil().clamp(1, bins).long() - 1
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, torch.ones_like(conf))
    gap = (torch.zeros(bins, dtype=torch.float64).index_add_(0, which, correct)
           - torch.zeros(bins, dtype=torch.float64).index_add_(0, which, conf)).abs()
    return 100.0 * gap.sum().item() / len(y)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float, float, float]:
    """Test accuracy (%), cross-entropy, expected calibration error (%), mean confidence (%: the
    mean max-softmax probability; above the accuracy is over-confident, below under-confident) and
    the largest |logit|.

    The cross-entropy compares losses whose own values do not; the largest logit
    shows a loss that is unbounded below (``nllr``) pushing the logits without limit.
    """
    model.eval()
    logits = model(x)
    accuracy = 100.0 * (logits.argmax(1) == y).double().mean().item()
    confidence = 100.0 * logits.double().softmax(1).max(1).values.mean().item()
    return (accuracy, F.cross_entropy(logits, y).item(), expected_calibration_error(logits, y), confidence,
            logits.abs().max().item())


def train_one(loss: str, seed: int, data: tuple[torch.Tensor, ...], recipe: Recipe, teacher: nn.Module | None = None,
              width: int = 1, keep_model: bool = False) -> RunResult:
    x_train, y_train, x_test, y_test = data
    # The same initial weights for every loss at this seed; the mixes (drawn by torchvision's
    # transforms from the same global generator, which nothing else here consumes) too.
    torch.manual_seed(seed)
    model = small_cnn(NUM_CLASSES, width)
    order = torch.Generator().manual_seed(seed)  # and the same batch order
    criterion = MixedTargetLoss(fl.SoftmaxLoss(loss=loss, label_smoothing=recipe.label_smoothing,
                                               **LOSS_KWARGS.get(loss, {})), NUM_CLASSES)
    mix = BatchMix(recipe.mixup_alpha, recipe.cutmix_alpha) if recipe.mixes else None
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs)
    result = RunResult(loss, seed, recipe.label, criterion.mixed_path() if mix is not None else "-")
    distiller = None
    if recipe.distills:
        if teacher is None:
            raise ValueError(f"recipe {recipe.label!r} distills: a teacher is needed")
        distiller = Distiller(teacher, "teacher", criterion, distill_namespace(loss, recipe))
        # Without mixing the teacher sees the training images as they are: its logits once, not every step.
        cached = None if mix is not None else _teacher_logits(teacher, x_train)
    start = time.perf_counter()
    for _ in range(recipe.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=order)
        total, count = 0.0, 0
        # drop the last partial batch: a batch of 1 or 2 makes BatchNorm statistics noise
        for i in range(0, len(perm) - recipe.batch_size + 1, recipe.batch_size):
            idx = perm[i:i + recipe.batch_size]
            images, target = x_train[idx], y_train[idx]
            if mix is not None:
                images, target = mix(images, target)
            if distiller is None:
                value = criterion(model(images), target)
            elif cached is not None:
                value = fl.distill_loss(model(images), cached[idx], target, loss, **distiller.kw)
            else:
                value = distiller(images, model(images), target)  # fusedloss.train's route, teacher on the mix
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            total, count = total + value.item() * len(idx), count + len(idx)
        scheduler.step()
        acc, nll, ece, confidence, max_logit = evaluate(model, x_test, y_test)
        result.train_loss.append(total / count)
        result.test_acc.append(acc)
        result.test_nll.append(nll)
        result.test_ece.append(ece)
        result.test_confidence.append(confidence)
        result.test_max_logit.append(max_logit)
    result.seconds = time.perf_counter() - start
    if keep_model:
        result.model = model.eval()
    return result


@torch.no_grad()
def _teacher_logits(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return teacher.eval()(x)


def distill_namespace(loss: str, recipe: Recipe) -> argparse.Namespace:
    """The flags of ``python -m fusedloss.train`` that :class:`Distiller` reads."""
    kw = LOSS_KWARGS.get(loss, {})
    return argparse.Namespace(loss=loss, alpha=kw.get("alpha", 1.5), beta=kw.get("beta", 1.0),
                              gamma=kw.get("gamma", 2.0), label_smoothing=recipe.label_smoothing,
                              distill_temperature=recipe.kd_temperature, distill_divergence=recipe.kd_divergence,
                              distill_jsd_beta=0.5, kd_weight=recipe.kd_weight)


def train_teacher(data: tuple[torch.Tensor, ...], recipe: Recipe, width: int, epochs: int, seed: int) -> RunResult:
    """The distillation teacher: the CNN ``width`` times as wide, ``ce``, the plain recipe for ``epochs``."""
    teacher_recipe = Recipe(epochs=epochs, batch_size=recipe.batch_size, lr=recipe.lr, momentum=recipe.momentum,
                            weight_decay=recipe.weight_decay)
    result = train_one("ce", seed, data, teacher_recipe, width=width, keep_model=True)
    result.recipe = f"teacher: width x{width}, ce, {epochs} epochs, seed {seed}"
    return result


def mean_std(values: list[float], digits: int = 2) -> str:
    """``mean ± sample std``; just the value for a single seed."""
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _per_loss_table(results: list[RunResult], losses: list[str], mixes: bool) -> list[str]:
    """One row per loss: mean ± std over the seeds of the final-epoch numbers (the papers' style)."""
    path_header, path_rule = (" mixed targets as |", "---|") if mixes else ("", "")
    lines = [
        f"| loss | hyper-parameters |{path_header} test accuracy (%) | test error (%) | test cross-entropy "
        "| test ECE (%) | mean confidence (%) | largest \\|logit\\| | per-seed accuracy (%) |",
        f"|---|---|{path_rule}---|---|---|---|---|---|---|",
    ]
    for loss in losses:
        runs = [r for r in results if r.loss == loss]
        acc = [r.test_acc[-1] for r in runs]
        err = [100.0 - a for a in acc]
        nll = [r.test_nll[-1] for r in runs]
        ece = [r.test_ece[-1] for r in runs]
        confidence = [r.test_confidence[-1] for r in runs]
        max_logit = max(r.test_max_logit[-1] for r in runs)
        params = ", ".join(f"{k}={v}" for k, v in LOSS_KWARGS.get(loss, {}).items()) or "-"
        path = f" {runs[0].target_path} |" if mixes else ""
        lines.append(f"| `{loss}` | {params} |{path} {mean_std(acc)} | {mean_std(err)} | {mean_std(nll, 3)} | "
                     f"{mean_std(ece)} | {mean_std(confidence)} | {max_logit:.3g} | {' / '.join(f'{a:.2f}' for a in acc)} |")
    return lines


def _paired_table(results: list[RunResult], losses: list[str], plain: str, recipe: str) -> list[str]:
    """Plain against the recipe, per loss, with the accuracy difference paired by seed (same initial
    weights and batch order on both sides), which cancels the seed-to-seed spread the two share."""
    lines = [
        f"| loss | plain accuracy (%) | {recipe} accuracy (%) | difference, paired by seed (points) "
        "| seeds better / same / worse | plain cross-entropy | recipe cross-entropy | plain ECE (%) "
        "| recipe ECE (%) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for loss in losses:
        base = {r.seed: r for r in results if r.loss == loss and r.recipe == plain}
        mixed = {r.seed: r for r in results if r.loss == loss and r.recipe == recipe}
        seeds = sorted(set(base) & set(mixed))
        if not seeds:
            continue
        delta = [mixed[s].test_acc[-1] - base[s].test_acc[-1] for s in seeds]
        # One test image is 100 / 1348 = 0.074 points: differences below a tenth of that are ties.
        tol = 1e-6
        counts = (sum(d > tol for d in delta), sum(abs(d) <= tol for d in delta), sum(d < -tol for d in delta))

        def col(rs: dict[int, RunResult], key: str, digits: int = 2) -> str:
            return mean_std([getattr(rs[s], key)[-1] for s in seeds], digits)

        signed = f"{statistics.mean(delta):+.2f}" + (f" ± {statistics.stdev(delta):.2f}" if len(delta) > 1 else "")
        lines.append(f"| `{loss}` | {col(base, 'test_acc')} | {col(mixed, 'test_acc')} | {signed} | "
                     f"{' / '.join(map(str, counts))} | {col(base, 'test_nll', 3)} | {col(mixed, 'test_nll', 3)} | "
                     f"{col(base, 'test_ece')} | {col(mixed, 'test_ece')} |")
    return lines


def markdown_table(results: list[RunResult], recipes: list[Recipe], seeds: list[int], split: tuple[int, int],
                   command: str, seconds: float, teacher: RunResult | None = None) -> str:
    """The results of each recipe, one row per loss; with a plain and a modern recipe, the paired comparison."""
    losses = list(dict.fromkeys(r.loss for r in results))
    base = recipes[0]
    title = f"# {len(losses)} losses on scikit-learn digits: small CNN, {len(seeds)} seed(s)"
    if not recipes[-1].plain:
        title += f", recipe {recipes[-1].label}" + (" beside the plain one" if len(recipes) > 1 else "")
    lines = [
        title,
        "",
        f"Made by `{command}` ({seconds / 60:.1f} min, torch {torch.__version__}, fusedloss {fl.__version__}, "
        f"{platform.machine()} CPU, 1 thread).",
        "",
        f"Data: `sklearn.datasets.load_digits`, 1797 real 8x8 digits, one stratified split "
        f"({split[0]} train / {split[1]} test, `random_state=0`). Model: 3 conv blocks + linear head. Recipe for every loss: "
        f"{base.epochs} epochs, batch {base.batch_size}, SGD lr {base.lr} momentum {base.momentum} "
        f"weight decay {base.weight_decay}, cosine schedule; seeds {seeds} (seed = initial weights and batch "
        f"order, shared by all losses). Numbers are after the last epoch (no early stopping on the test set); "
        f"± is the sample standard deviation over seeds; test ECE is the expected calibration error of the "
        f"max-softmax confidence ({ECE_BINS} equal bins), mean confidence the mean max-softmax probability "
        f"(above the accuracy: over-confident, below: under-confident); largest \\|logit\\| is over the test set and all seeds.",
    ]
    for recipe in recipes:
        if recipe.plain:
            continue
        what = []
        if recipe.mixes:
            kinds = [f"{name} (alpha {a:g})" for name, a in (("MixUp", recipe.mixup_alpha),
                                                               ("CutMix", recipe.cutmix_alpha)) if a > 0]
            what.append(f"each training batch mixed by torchvision.transforms.v2 {' or '.join(kinds)}"
                        + (", one of the two at random per batch" if len(kinds) > 1 else "")
                        + " (`fusedloss.train_recipe.BatchMix`, as `python -m fusedloss.train`); the mixes are "
                          "drawn from the seed, so every loss sees the same mixed batches; `ce` takes the mixed "
                          "class probabilities, the other losses `(y_a, y_b, lam)`, i.e. "
                          "`lam * L(y_a) + (1 - lam) * L(y_b)` (`MixedTargetLoss`; the column says which path ran)")
        if recipe.label_smoothing > 0:
            what.append(f"label smoothing {recipe.label_smoothing:g} for every loss (docs/losses.md)")
        if recipe.distills and teacher is not None:
            n_params = sum(p.numel() for p in teacher.model.parameters())
            what.append(
                f"knowledge distillation from one teacher trained first ({teacher.recipe}: the same CNN with "
                f"{n_params / 1e3:.0f}k parameters against 94k, on the same training split; its test accuracy "
                f"{teacher.test_acc[-1]:.2f} %, test cross-entropy {teacher.test_nll[-1]:.3f}): each student "
                f"trains on `(1 - W) H + W T^2 D` per image with W = {recipe.kd_weight:g}, T = "
                f"{recipe.kd_temperature:g}, D = {recipe.kd_divergence} (`fl.distill_loss`, the loss of `python -m "
                f"fusedloss.train --teacher`), H the loss of the row")
        lines += ["", f"Recipe `{recipe.label}`: the recipe above plus " + "; ".join(what) + "."]
    for recipe in recipes:
        if len(recipes) > 1:
            lines += ["", f"## Recipe: {recipe.label}"]
        lines += [""] + _per_loss_table([r for r in results if r.recipe == recipe.label], losses, recipe.mixes)
    if len(recipes) == 2:
        plain, modern = recipes[0].label, recipes[1].label
        lines += ["", f"## {plain} against {modern}, paired by seed", ""]
        lines += _paired_table(results, losses, plain, modern)
    return "\n".join(lines) + "\n"


def plot_curves(results: list[RunResult], path: str) -> None:
    """Test error, test cross-entropy, test ECE and largest |logit| per epoch: median over seeds, band =
    min to max; one row of panels per recipe, the same scales down each column.

    Log scales, so that a loss that collapses (tens of % error) and the small
    differences near 1.5 % error show on the same axes. Min-max bands rather than
    +- std, which would go below zero on a log axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    losses = list(dict.fromkeys(r.loss for r in results))
    recipes = list(dict.fromkeys(r.recipe for r in results))
    panels = (("test error (%)", lambda r: [100.0 - a for a in r.test_acc]),
              ("test cross-entropy", lambda r: r.test_nll),
              ("test ECE (%)", lambda r: r.test_ece),
              ("largest |logit| on the test set", lambda r: r.test_max_logit))
    fig, axes = plt.subplots(len(recipes), len(panels), figsize=(20, 4.6 * len(recipes)), sharey="col",
                             squeeze=False)
    for row, recipe in zip(axes, recipes):
        for index, loss in enumerate(losses):
            runs = [r for r in results if r.loss == loss and r.recipe == recipe]
            for ax, (_, values) in zip(row, panels):
                curves = np.array([values(r) for r in runs], dtype=np.float64)
                epochs = np.arange(1, curves.shape[1] + 1)
                color = f"C{index}"  # the same color for a loss in every row
                ax.plot(epochs, np.median(curves, 0), label=loss, color=color)
                ax.fill_between(epochs, curves.min(0), curves.max(0), color=color, alpha=0.15, lw=0)
        for ax, (title, _) in zip(row, panels):
            ax.set_title(title if len(recipes) == 1 else f"{title}: {recipe}")
            ax.set_yscale("log")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3, which="both")
        row[0].legend()
    n_seeds = len({r.seed for r in results})
    fig.suptitle(f"scikit-learn digits, small CNN, same recipe for every loss: median over {n_seeds} seed(s), "
                 "band = min to max")
    fig.tight_layout()
    fig.savefig(path, dpi=110 if len(recipes) == 1 else 90)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--losses", nargs="+", choices=fl.LOSSES, default=list(fl.LOSSES))
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    p.add_argument("--epochs", type=int, default=Recipe.epochs)
    p.add_argument("--lr", type=float, default=Recipe.lr)
    p.add_argument("--mixup-alpha", type=float, default=0.0, help="mixup alpha (0: off), torchvision's flag")
    p.add_argument("--cutmix-alpha", type=float, default=0.0,
                   help="cutmix alpha (0: off); with both, each batch gets one of the two at random")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing of every loss")
    p.add_argument("--kd-weight", type=float, default=0.0,
                   help="knowledge distillation from a teacher trained first (0: off): (1 - W) H + W T^2 D")
    p.add_argument("--distill-temperature", type=float, default=4.0, help="--kd-weight: the temperature T")
    p.add_argument("--distill-divergence", choices=("kl", "reverse_kl", "jsd"), default="kl",
                   help="--kd-weight: the divergence D")
    p.add_argument("--teacher-width", type=int, default=2, help="--kd-weight: the teacher's channels x this")
    p.add_argument("--teacher-epochs", type=int, default=60, help="--kd-weight: the teacher's epochs")
    p.add_argument("--teacher-seed", type=int, default=1000, help="--kd-weight: the teacher's seed")
    p.add_argument("--with-plain", action="store_true",
                   help="also run the plain recipe (no mixing, no smoothing, no teacher) and add the paired comparison")
    p.add_argument("--train-fraction", type=float, default=0.25, help="share of the 1797 digits used for training")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder of the .md, .json and .png")
    p.add_argument("--name", help=f"file name stem (default: {NAME} for the plain recipe, {NAME_MIXED} otherwise)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (the model is tiny: more threads mostly add contention)")
    args = p.parse_args(argv)
    if args.mixup_alpha < 0 or args.cutmix_alpha < 0 or not 0 <= args.label_smoothing <= 1:
        p.error("--mixup-alpha and --cutmix-alpha must be >= 0, --label-smoothing in [0, 1]")
    if not 0 <= args.kd_weight <= 1 or not args.distill_temperature > 0:
        p.error("--kd-weight must be in [0, 1], --distill-temperature > 0")
    if args.teacher_width < 1 or args.teacher_epochs < 1:
        p.error("--teacher-width and --teacher-epochs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = Recipe(epochs=args.epochs, lr=args.lr, mixup_alpha=args.mixup_alpha, cutmix_alpha=args.cutmix_alpha,
                    label_smoothing=args.label_smoothing, kd_weight=args.kd_weight,
                    kd_temperature=args.distill_temperature, kd_divergence=args.distill_divergence)
    recipes = [recipe.plain_twin(), recipe] if args.with_plain and not recipe.plain else [recipe]
    name = args.name or (NAME if recipe.plain else NAME_DISTILL if recipe.distills else NAME_MIXED)
    seeds = list(range(args.seeds))
    data = load_split(args.train_fraction)
    results, start = [], time.perf_counter()
    teacher = None
    if recipe.distills:
        teacher = train_teacher(data, recipe, args.teacher_width, args.teacher_epochs, args.teacher_seed)
        print(f"{teacher.recipe}: test accuracy {teacher.test_acc[-1]:.2f} %, cross-entropy "
              f"{teacher.test_nll[-1]:.4f} ({teacher.seconds:.1f} s)", flush=True)
    for rec in recipes:
        for loss in args.losses:
            for seed in seeds:
                r = train_one(loss, seed, data, rec, teacher.model if teacher is not None else None)
                results.append(r)
                print(f"{rec.label}: {loss:6s} seed {seed}: test accuracy {r.test_acc[-1]:.2f} %, cross-entropy "
                      f"{r.test_nll[-1]:.4f}, ECE {r.test_ece[-1]:.2f} % ({r.seconds:.1f} s)", flush=True)
    seconds = time.perf_counter() - start

    os.makedirs(args.out, exist_ok=True)
    command = "python bench/compare_losses.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                  " " + " ".join(sys.argv[1:] if argv is None else argv))
    table = markdown_table(results, recipes, seeds, (len(data[0]), len(data[2])), command, seconds, teacher)
    with open(os.path.join(args.out, f"{name}.md"), "w", encoding="utf-8") as f:
        f.write(table)
    with open(os.path.join(args.out, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump({"recipe": recipe.__dict__, "recipes": {r.label: r.__dict__ for r in recipes}, "seeds": seeds,
                   "command": command, "fusedloss_commit": _commit(), "runs": [r.record() for r in results],
                   "teacher": None if teacher is None else teacher.record()},
                  f, indent=1)
    plot_curves(results, os.path.join(args.out, f"{name}.png"))
    print(table)
    print(f"wrote {args.out}/{name}.md, .json and .png in {seconds:.0f} s")
    return 0


def _commit() -> str | None:
    """The checkout's commit, ``-dirty`` when the library's sources differ from it (fusedloss-bench's rule)."""
    from fusedloss.bench import machine

    return machine._git_commit()


if __name__ == "__main__":
    sys.exit(main())
