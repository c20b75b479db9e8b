"""The torchvision-reference flags of ``fusedloss.train``: parsing and ``--recipe``, mixup/cutmix and
its routing to the loss, weight-decay groups, warmup schedule, model EMA, and short CPU runs.

Unit tests take milliseconds; the runs use ResNet-18 at 32x32 on a handful of images (a few
seconds each, one thread).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchvision")
pytest.importorskip("PIL")
pytest.importorskip("numpy")

from torchvision.transforms import v2  # noqa: E402

import fusedloss as fl  # noqa: E402
from fusedloss import LOSSES  # noqa: E402
from fusedloss.train import build_parser, main  # noqa: E402
from fusedloss.train.recipe import (RECIPES, BatchMix, MixedTarget, MixedTargetLoss, ModelEma,  # noqa: E402
                                    has_two_target_form, make_scheduler, param_groups, resolve_args,
                                    split_soft_targets)

SMALL = ["--arch", "resnet18", "--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32",
         "--batch-size", "8", "--workers", "0", "--progress", "none"]
DUMMY = ["--dummy", "--num-classes", "10", "--dummy-train-size", "24", "--dummy-val-size", "8"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def parse(*argv: str):
    return resolve_args(build_parser(), ["--dummy", *argv])


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# parsing


def test_defaults_are_torchvision_reference_defaults():
    a = parse()
    assert (a.label_smoothing, a.mixup_alpha, a.cutmix_alpha, a.auto_augment, a.random_erase) == (0.0, 0.0, 0.0, None, 0.0)
    assert (a.lr_warmup_epochs, a.lr_warmup_method, a.lr_warmup_decay, a.lr_min) == (0, "constant", 0.01, 0.0)
    assert (a.model_ema, a.model_ema_steps, a.model_ema_decay, a.norm_weight_decay) == (False, 32, 0.99998, None)
    assert (a.train_crop_size, a.val_resize_size, a.val_crop_size, a.interpolation) == (224, 256, 224, "bilinear")
    assert (a.ra_magnitude, a.augmix_severity, a.lr_step_size) == (9, 3, 30)
    assert a.lr_scheduler == "multisteplr" and a.lr_steps == [30, 60]  # this script's CRL/examples default


def test_help_shows_every_default_exactly_once(monkeypatch):
    """--help: each option's block says its default once (argparse's own formatter skips options
    without a help text, and adds a second one beside a help text that already gives it)."""
    import re

    monkeypatch.setenv("COLUMNS", "400")  # one line per option: no "(default:" split by a wrap
    parser = build_parser()
    text = parser.format_help()
    blocks = re.split(r"\n(?=  -)", text.split("\n\n", 2)[2])
    checked = set()
    for action in parser._actions:
        if not action.option_strings or action.default is argparse.SUPPRESS or "--help" in action.option_strings:
            continue
        (block,) = [b for b in blocks if b.split()[0].rstrip(",") == action.option_strings[0]]
        assert block.count("default:") == 1, block
        checked.add(action.dest)
    assert {"loss", "epochs", "momentum", "wd", "device", "seed", "lr", "output"} <= checked


def test_recipe_fills_in_and_explicit_flags_override():
    a = parse("--recipe", "torchvision-v2")
    for dest, value in RECIPES["torchvision-v2"].items():
        assert getattr(a, dest) == value, dest
    assert (a.lr, a.lr_scheduler, a.epochs, a.train_crop_size, a.val_resize_size) == (0.5, "cosineannealinglr", 600,
                                                                                    176, 232)
    b = parse("--lr", "0.2", "--recipe", "torchvision-v2", "--epochs", "3", "--no-model-ema", "--train-crop-size", "64",
              "--lr-warmup-method", "constant", "--batch-size", "256")
    assert (b.lr, b.epochs, b.model_ema, b.train_crop_size, b.lr_warmup_method, b.batch_size) == (
        0.2, 3, False, 64, "constant", 256)
    assert (b.mixup_alpha, b.cutmix_alpha, b.label_smoothing, b.wd, b.val_resize_size) == (0.2, 1.0, 0.1, 2e-5, 232)


def test_old_names_are_aliases():
    a = parse("--image-size", "32")
    assert (a.train_crop_size, a.val_crop_size, a.val_resize_size) == (32, 32, 37)  # 32 x 256/224
    b = parse("--val-resize-size", "40", "--image-size", "32", "--train-crop-size", "48")
    assert (b.train_crop_size, b.val_crop_size, b.val_resize_size) == (48, 32, 40)
    assert parse("--val-resize", "50").val_resize_size == 50
    assert parse("--lr-schedule", "cosine").lr_scheduler == "cosineannealinglr"
    assert parse("--lr-schedule", "step").lr_scheduler == "multisteplr"
    assert parse("--recipe", "torchvision-v2", "--image-size", "64").train_crop_size == 64  # explicit beats recipe


@pytest.mark.parametrize("args, message", [
    (["--mixup-alpha", "-0.2"], "--mixup-alpha must be >= 0"),
    (["--random-erase", "1.5"], "--random-erase is a probability"),
    (["--lr-warmup-epochs", "2", "--epochs", "2"], "--lr-warmup-epochs 2 must be below --epochs 2"),
    (["--model-ema-steps", "0"], "--model-ema-steps must be at least 1"),
])
def test_bad_flags(args, message, tmp_path, capsys):
    assert main([*DUMMY, *SMALL, "--epochs", "1", *args, "--output", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_bad_choice_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*DUMMY, "--auto-augment", "trivial"])
    assert exit_info.value.code == 2 and "invalid choice: 'trivial'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# mixup / cutmix


def reference_mix(mixup_alpha: float, cutmix_alpha: float, num_classes: int):
    """torchvision's references/classification get_mixup_cutmix (use_v2): soft targets out."""
    choices = []
    if mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    return v2.RandomChoice(choices)


@pytest.mark.parametrize("mixup_alpha, cutmix_alpha", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
@pytest.mark.parametrize("size", [7, 2])  # at 2x2 most CutMix boxes are empty: lam = 1, no partner
def test_mix_reproduces_torchvision_exactly(mixup_alpha, cutmix_alpha, size):
    """Same seed, same calls: bit-identical images, and (y_a, y_b, lam) rebuild the reference's soft targets
    bit for bit (label 2 is repeated so that some rows pair an image with one of its own class)."""
    C = 5
    labels = torch.tensor([2, 0, 2, 4, 1, 2, 3])
    images = torch.randn(len(labels), 3, size, size, generator=torch.Generator().manual_seed(1))
    ours, ref = BatchMix(mixup_alpha, cutmix_alpha), reference_mix(mixup_alpha, cutmix_alpha, C)
    lams = []
    for seed in range(12):
        torch.manual_seed(seed)
        ref_images, soft = ref(images.clone(), labels.clone())
        torch.manual_seed(seed)
        mixed, target = ours(images.clone(), labels.clone())
        assert torch.equal(mixed, ref_images)
        assert torch.equal(target.y_a, labels)
        assert torch.equal(target.soft(C), soft), (seed, target)
        assert torch.equal(target.dominant(), soft.argmax(1)) or bool((soft.max(1).values == 0.5).any())
        lams.append(target.lam)
    lam = torch.cat(lams)
    assert lam.dtype == torch.float64 and bool(((0 <= lam) & (lam <= 1)).all())
    if size == 2 and cutmix_alpha > 0 and mixup_alpha == 0:
        assert bool((lam == 1).any())  # the no-partner rows were exercised


def test_split_soft_targets_of_a_reference_collate():
    """A script that keeps torchvision's collate hands the criterion soft targets: they split back into
    the same pairs, with lam to one float32 ulp, and the crl loss agrees with the exact split."""
    C = 5
    labels = torch.tensor([2, 0, 2, 4, 1, 2, 3])
    images = torch.randn(len(labels), 3, 7, 7, generator=torch.Generator().manual_seed(1))
    ours, ref = BatchMix(0.2, 1.0), reference_mix(0.2, 1.0, C)
    crit = MixedTargetLoss(fl.SoftmaxLoss("crl"), C, fused_two_target=False)
    logits = torch.randn(len(labels), C, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for seed in range(6):
        torch.manual_seed(seed)
        _, soft = ref(images.clone(), labels.clone())
        torch.manual_seed(seed)
        _, exact = ours(images.clone(), labels.clone())
        split = split_soft_targets(soft)
        big = exact.lam >= 0.5
        same = exact.y_a == exact.y_b
        torch.testing.assert_close(split.y_a, torch.where(big | same, exact.y_a, exact.y_b))
        torch.testing.assert_close(split.y_b, torch.where(big | same, exact.y_b, exact.y_a))
        share = torch.where(big | same, exact.lam, 1 - exact.lam)
        share = torch.where(same, torch.ones_like(share), share)
        torch.testing.assert_close(split.lam, share, rtol=0, atol=2.0 ** -24)
        torch.testing.assert_close(crit(logits, soft), crit(logits, exact), rtol=1e-6, atol=1e-7)


def per_row_loss64(logits: torch.Tensor, target: torch.Tensor, loss: str, eps: float = 0.0) -> torch.Tensor:
    """Each loss's row value in float64 from its definition (docs/losses.md), plus, with label
    smoothing eps, only for ce: PyTorch's (1 - eps) * nll + eps * mean_k(-log p_k)."""
    logp = torch.log_softmax(logits.double(), 1)
    lp_c = logp.gather(1, target[:, None])[:, 0]
    p_c = lp_c.exp()
    if loss == "ce":
        return (1 - eps) * -lp_c + eps * -logp.mean(1)
    if loss == "bce":
        rest = torch.log1p(-logp.exp()).scatter(1, target[:, None], 0.0).sum(1)
        return -lp_c - rest
    if loss == "nllr":
        return torch.log1p(-p_c) - lp_c
    if loss == "crl":
        return 1.0 * torch.log(1.5 + 1 - p_c) - lp_c
    if loss == "lace":
        return -(1 - p_c) * lp_c
    if loss == "focal":
        return -((1 - p_c) ** 2.0) * lp_c
    raise AssertionError(loss)


def mixed_target(n: int, num_classes: int, seed: int) -> MixedTarget:
    gen = torch.Generator().manual_seed(seed)
    y_a = torch.randint(0, num_classes, (n,), generator=gen)
    y_b = torch.randint(0, num_classes, (n,), generator=gen)
    y_b[:3] = y_a[:3]  # pairs within one class
    lam = torch.rand(n, generator=gen, dtype=torch.float64)
    lam[3] = 1.0
    return MixedTarget(y_a, y_b, lam)


ROUTES = ["two calls", "fused"]


# ce's "two calls" route is the soft targets (no two-call stand-in for ce).
@pytest.mark.parametrize("loss,route", [(loss, route) for loss in LOSSES for route in ROUTES])
def test_mixed_loss_is_lam_weighted_pair(loss, route):
    """MixedTargetLoss on a MixedTarget = mean_i lam_i L(x_i, y_a_i) + (1 - lam_i) L(x_i, y_b_i), float64 oracle;
    for ce also F.cross_entropy with the soft targets. Irregular shape: 13 rows, 37 classes."""
    assert has_two_target_form(fl.SoftmaxLoss(loss))
    n, C = 13, 37
    logits = torch.randn(n, C, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    target = mixed_target(n, C, 1)
    crit = MixedTargetLoss(fl.SoftmaxLoss(loss), C, fused_two_target=route == "fused")
    x = logits.clone().requires_grad_()
    got = crit(x, target)
    lam = target.lam
    want = (lam * per_row_loss64(logits, target.y_a, loss) + (1 - lam) * per_row_loss64(logits, target.y_b, loss)).mean()
    # ce's soft route takes torchvision's float32 soft targets: float32 accuracy; the rest float64.
    soft = crit.mixed_path() == "soft targets"
    assert soft == (loss == "ce" and route == "two calls")
    tol = dict(rtol=1e-6, atol=1e-7) if soft else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, want, **tol)
    got.backward()
    assert torch.isfinite(x.grad).all()
    if loss == "ce":
        torch.testing.assert_close(got, F.cross_entropy(logits, target.soft(C).double()), rtol=1e-6, atol=1e-7)


def test_mixed_ce_label_smoothing_matches_torch():
    """Label smoothing with mixup stays inside the loss, as in torchvision's reference (PyTorch's
    soft-target definition): the smoothed soft targets, not smoothed y_a and y_b separately."""
    n, C = 9, 11
    logits = torch.randn(n, C, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    target = mixed_target(n, C, 3)
    crit = MixedTargetLoss(fl.SoftmaxLoss("ce", label_smoothing=0.1), C, fused_two_target=False)
    want = F.cross_entropy(logits, target.soft(C).double(), label_smoothing=0.1)
    torch.testing.assert_close(crit(logits, target), want, rtol=1e-6, atol=1e-7)
    lam = target.lam
    pair = (lam * per_row_loss64(logits, target.y_a, "ce", 0.1) + (1 - lam) * per_row_loss64(logits, target.y_b, "ce", 0.1))
    torch.testing.assert_close(crit(logits, target), pair.mean(), rtol=1e-6, atol=1e-7)
    # The default route for unweighted ce is the two-target form: the same value (CE is linear in the
    # target distribution, smoothing included), in float64 here.
    fused = MixedTargetLoss(fl.SoftmaxLoss("ce", label_smoothing=0.1), C)
    assert fused.mixed_path() == "two-target (fused, cpu)"
    torch.testing.assert_close(fused(logits, target), pair.mean(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused(logits, target), F.cross_entropy(logits, target.soft(C).double(), label_smoothing=0.1),
                               rtol=1e-6, atol=1e-7)  # the float32 soft targets


def test_weighted_ce_keeps_the_soft_targets():
    """With class weights PyTorch's soft-target 'mean' divides by N, the two-target form by the targets'
    weights: weighted ce stays on the soft targets, F.cross_entropy's semantics."""
    n, C = 9, 11
    logits = torch.randn(n, C, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    weight = torch.rand(C, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    target = mixed_target(n, C, 6)
    crit = MixedTargetLoss(fl.SoftmaxLoss("ce", weight=weight), C)
    assert crit.mixed_path() == "soft targets"
    torch.testing.assert_close(crit(logits, target), F.cross_entropy(logits, target.soft(C).double(), weight=weight),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("how", ["backend", "env"])
def test_criterion_for_a_gpu_backend_builds_on_a_cpu_machine(how, monkeypatch):
    """MixedTargetLoss and the script's criterion are built before any GPU tensor exists: their probes
    must not run the criterion's own backend (triton, or FUSEDLOSS_BACKEND=triton) on CPU tensors."""
    from fusedloss.train import make_criterion

    kw = {}
    if how == "env":
        monkeypatch.setenv("FUSEDLOSS_BACKEND", "triton")
    else:
        kw["backend"] = "triton"
    crit = MixedTargetLoss(fl.CompetingRatioLoss(**kw), 10)
    assert crit.fused_two_target
    if how == "env":
        args = build_parser().parse_args(["--loss", "crl", "--mixup-alpha", "0.2", "--label-smoothing", "0.1"])
        made = make_criterion(args, 10)
        assert made.fused_two_target and made.criterion.backend == "auto"
        assert made.criterion.label_smoothing == 0.1


# ---------------------------------------------------------------------------------------------
# optimizer groups, schedule, EMA


def test_norm_weight_decay_groups():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    (one,) = param_groups(model, 1e-4, None)
    assert one["weight_decay"] == 1e-4 and len(one["params"]) == len(list(model.parameters()))
    other, norm = param_groups(model, 1e-4, 0.0)
    bn = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for p in norm["params"]} == bn and norm["weight_decay"] == 0.0
    assert len(other["params"]) + len(norm["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("method", ["linear", "constant"])
def test_warmup_then_cosine(method):
    args = parse("--lr-scheduler", "cosineannealinglr", "--epochs", "7", "--lr-warmup-epochs", "2",
                 "--lr-warmup-method", method, "--lr-warmup-decay", "0.1")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, args)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    warm = [0.1, 0.55] if method == "linear" else [0.1, 0.1]
    cosine = [0.5 * (1 + math.cos(math.pi * t / 5)) for t in range(5)]  # T_max = epochs - warmup
    assert lrs == pytest.approx(warm + cosine)


def test_ema_decay_adjustment_and_warmup_copy():
    model = torch.nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.99998, steps=32, global_batch=1024, epochs=600, warmup_epochs=1,
                   device=torch.device("cpu"))
    assert ema.decay == pytest.approx(1 - 2e-5 * 1024 * 32 / 600)  # the reference's pycls adjustment
    fast = ModelEma(model, decay=0.5, steps=1, global_batch=1, epochs=1, warmup_epochs=1, device=torch.device("cpu"))
    with torch.no_grad():
        model.weight.fill_(1.0)
    fast.after_step(0, epoch=0)
    with torch.no_grad():
        model.weight.fill_(3.0)
    fast.after_step(1, epoch=0)  # warmup epoch: a copy
    assert torch.equal(fast.averaged.module.weight, model.weight)
    with torch.no_grad():
        model.weight.fill_(5.0)
    fast.after_step(0, epoch=1)  # the first update after warmup still copies (n_averaged was reset)
    assert torch.equal(fast.averaged.module.weight, model.weight)
    with torch.no_grad():
        model.weight.fill_(7.0)
    fast.after_step(1, epoch=1)  # then averages: 0.5 x 5 + 0.5 x 7
    torch.testing.assert_close(fast.averaged.module.weight, torch.full((2, 3), 6.0))


# ---------------------------------------------------------------------------------------------
# short CPU runs

NEW_FLAGS = ["--mixup-alpha", "0.2", "--cutmix-alpha", "1.0", "--label-smoothing", "0.1", "--model-ema",
             "--model-ema-steps", "1", "--lr-warmup-epochs", "1", "--lr-warmup-method", "linear",
             "--lr-scheduler", "cosineannealinglr", "--norm-weight-decay", "0"]


@pytest.mark.parametrize("loss", ["ce", "crl"])
def test_dummy_run_with_the_new_flags(loss, tmp_path, capsys):
    out = tmp_path / loss
    rc = main([*DUMMY, *SMALL, *NEW_FLAGS, "--epochs", "2", "--loss", loss, "--output", str(out)])
    assert rc == 0
    assert "-> two-target (fused, cpu)" in capsys.readouterr().out
    records = read_log(out)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["lr"] == pytest.approx(0.1 * 8 / 256 * 0.01)  # warmup starts at lr x decay
    for r in records:
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["ema_val_nll"])
    ckpt = load(out / "checkpoint.pt")
    assert "model_ema" in ckpt and ckpt["args"]["mixup_alpha"] == 0.2
    assert len(ckpt["optimizer"]["param_groups"]) == 2  # --norm-weight-decay: others, then norms


def test_image_folder_run_with_augmentation(tmp_path):
    from test_train import CLASSES, make_image_folder

    data = make_image_folder(tmp_path / "data", CLASSES, {"train": 4, "val": 1})
    args = ["--data", str(data), *SMALL, "--epochs", "1", "--auto-augment", "ta_wide", "--random-erase", "0.5",
            "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0", "--output", str(tmp_path / "out")]
    assert main(args) == 0
    (record,) = read_log(tmp_path / "out")
    assert record["train_images"] == 16 and record["val_images"] == 4 and math.isfinite(record["train_loss"])


class Crash(Exception):
    pass


def test_resume_with_the_new_flags_is_exact(tmp_path, monkeypatch):
    """A run of 3 epochs that dies right after epoch 1's checkpoint, then --resume, == 3 epochs straight,
    with mixup/cutmix, EMA and warmup + cosine (whose schedule depends on --epochs, so both runs use 3)."""
    import fusedloss.train.cli as train_mod

    flags = [*DUMMY, *SMALL, *NEW_FLAGS, "--loss", "focal", "--epochs", "3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*flags, "--output", str(straight)]) == 0
    append = train_mod.append_record

    def append_then_die(path, record):
        append(path, record)
        raise Crash

    monkeypatch.setattr(train_mod, "append_record", append_then_die)
    with pytest.raises(Crash):
        main([*flags, "--output", str(split)])
    monkeypatch.setattr(train_mod, "append_record", append)
    assert load(split / "checkpoint.pt")["epoch"] == 1
    assert main([*flags, "--output", str(split), "--resume"]) == 0
    a, b = load(straight / "checkpoint.pt"), load(split / "checkpoint.pt")
    timing = {"train_img_s", "train_seconds", "val_seconds", "time"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in a["history"]] == \
           [{k: v for k, v in r.items() if k not in timing} for r in b["history"]]
    for part in ("model", "model_ema"):
        for name, tensor in a[part].items():
            torch.testing.assert_close(b[part][name], tensor, rtol=0, atol=0, msg=f"{part}.{name}")


def test_resume_with_other_weight_decay_groups_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*DUMMY, *SMALL, "--epochs", "1", "--output", str(out)]) == 0
    assert main([*DUMMY, *SMALL, "--epochs", "2", "--norm-weight-decay", "0", "--output", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "optimizer or LR schedule differs" in err and "--norm-weight-decay None" in err
