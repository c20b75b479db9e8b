"""``python -m fusedloss.train --teacher``: knowledge distillation in the training command (CPU only).

The tiny ImageFolder of tests/test_train.py (4 classes, resnet18 at 32x32, batch 8); the teachers
are written by the tests (a 1-epoch run of the command itself, or a model's state_dict saved
here): nothing is downloaded. The loss is checked against float64 math written here
(tests/oracle.py's per-row hard loss, tests/oracle_distill.py's divergence).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("PIL")
pytest.importorskip("numpy")

import fusedloss as fl  # noqa: E402
from oracle import per_row_loss  # noqa: E402
from oracle_distill import divergence_rows  # noqa: E402
from test_train import CLASSES, TINY, make_image_folder  # noqa: E402

from fusedloss.train import build_parser, main  # noqa: E402
from fusedloss.train.cli import build_model, make_criterion  # noqa: E402
from fusedloss.train.distill import Distiller, load_teacher  # noqa: E402
from fusedloss.train.recipe import MixedTarget  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny"), CLASSES, {"train": 6, "val": 2})


@pytest.fixture(scope="module")
def teacher_run(tiny_data, tmp_path_factory) -> Path:
    """A teacher trained by the command itself (1 epoch of ce)."""
    out = tmp_path_factory.mktemp("teacher")
    assert main(["--data", str(tiny_data), *TINY, "--epochs", "1", "--output", str(out)]) == 0
    return out


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["--dummy", *argv])


def _oracle(student, teacher, target, loss, w, t, divergence, jsd_beta=0.5, **opts):
    """mean_i [(1 - w) H_i + w D_i] in float64; ``target`` a Tensor or a MixedTarget."""
    d = divergence_rows(student, teacher, t, divergence, jsd_beta)
    x = student.double()
    if isinstance(target, MixedTarget):
        lam = target.lam.double()
        h = lam * per_row_loss(x, target.y_a, loss, **opts) + (1 - lam) * per_row_loss(x, target.y_b, loss, **opts)
    else:
        h = per_row_loss(x, target, loss, **opts)
    return ((1 - w) * h + w * d).mean()


# ----------------------------------------------------------------------------
# The loss the student trains on


@pytest.mark.parametrize("loss, divergence, t, w", [("ce", "kl", 1.0, 0.5), ("crl", "reverse_kl", 2.0, 0.3),
                                                    ("focal", "jsd", 4.0, 0.9), ("nllr", "kl", 3.0, 1.0),
                                                    ("bce", "kl", 2.0, 0.0)])
@pytest.mark.parametrize("mixed", [False, True])
def test_distiller_loss_and_gradient_equal_float64(loss, divergence, t, w, mixed):
    """The Distiller's value and its gradient w.r.t. the student's logits; the teacher gets none and
    stays in eval mode (its BatchNorm statistics do not move)."""
    args = _args("--loss", loss, "--teacher", "x", "--kd-weight", str(w), "--distill-temperature", str(t),
                 "--distill-divergence", divergence, "--num-classes", "4")
    torch.manual_seed(0)
    teacher = build_model("resnet18", 4).eval().requires_grad_(False)
    stats = teacher.bn1.running_mean.clone()
    criterion = make_criterion(args, 4)
    distiller = Distiller(teacher, "resnet18", criterion, args)
    images = torch.randn(6, 3, 32, 32)
    student = (3 * torch.randn(6, 4)).requires_grad_()
    labels = torch.tensor([0, 1, 2, 3, 1, 2])
    target = MixedTarget(labels, labels.flip(0), torch.tensor([0.7, 0.2, 1.0, 0.5, 0.0, 0.35], dtype=torch.float64)) \
        if mixed else labels
    value = distiller(images, student, target)
    value.backward()
    with torch.no_grad():
        teacher_logits = teacher(images)
    x64 = student.detach().double().requires_grad_()
    opts = {"crl": dict(alpha=1.5, beta=1.0), "focal": dict(gamma=2.0)}.get(loss, {})
    expected = _oracle(x64, teacher_logits, target, loss, w, t, divergence, **opts)
    expected.backward()
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training and torch.equal(teacher.bn1.running_mean, stats)


# ----------------------------------------------------------------------------
# The command end to end


def test_distill_run_from_own_checkpoint(teacher_run, tiny_data, tmp_path, capsys):
    """One epoch of a student distilled from the command's own checkpoint (architecture read from it)."""
    out = tmp_path / "student"
    rc = main(["--data", str(tiny_data), *TINY, "--epochs", "1", "--loss", "crl", "--output", str(out),
               "--teacher", str(teacher_run / "checkpoint.pt"), "--kd-weight", "0.7", "--distill-temperature", "2",
               "--distill-divergence", "jsd", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"teacher resnet18 from {teacher_run / 'checkpoint.pt'}: (1 - 0.7) x crl + 0.7 x T^2 jsd (beta 0.5) at T 2" \
        in printed
    (record,) = read_log(out)
    assert record["train_images"] == 24 and torch.isfinite(torch.tensor(record["train_loss"]))
    config = json.loads((out / "config.json").read_text())
    assert config["teacher"] == str(teacher_run / "checkpoint.pt") and config["kd_weight"] == 0.7


def test_distill_resume_is_exact(teacher_run, tiny_data, tmp_path):
    """The teacher is re-read from the flags on --resume: 1 + 1 epochs equal 2 straight, bit for bit."""
    common = ["--data", str(tiny_data), *TINY, "--teacher", str(teacher_run / "best.pt"), "--kd-weight", "0.5"]
    assert main([*common, "--epochs", "2", "--output", str(tmp_path / "a")]) == 0
    assert main([*common, "--epochs", "1", "--output", str(tmp_path / "b")]) == 0
    assert main([*common, "--epochs", "2", "--output", str(tmp_path / "b"), "--resume"]) == 0
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=0, msg=name)


def _save_formats(model: torch.nn.Module, folder: Path) -> dict[str, Path]:
    sd = model.state_dict()
    files = {"state_dict": sd, "reference": {"model": sd, "epoch": 3, "args": argparse.Namespace(lr=0.1)},
             "lightning": {"state_dict": sd, "epoch": 3}, "ddp": {f"module.{k}": v for k, v in sd.items()}}
    paths = {}
    for name, obj in files.items():
        paths[name] = folder / f"{name}.pth"
        torch.save(obj, paths[name])
    return paths


def test_teacher_file_formats(tmp_path):
    """A bare state_dict, torchvision's reference checkpoint (with its argparse.Namespace), a
    {'state_dict': ...} file and a DDP-prefixed one all give the teacher's exact weights."""
    torch.manual_seed(1)
    source = build_model("resnet18", 4)
    for name, path in _save_formats(source, tmp_path).items():
        args = _args("--teacher", str(path), "--teacher-arch", "resnet18", "--num-classes", "4")
        teacher, arch = load_teacher(args, list(CLASSES), torch.device("cpu"))
        assert arch == "resnet18" and not teacher.training, name
        assert not any(p.requires_grad for p in teacher.parameters()), name
        for key, value in source.state_dict().items():
            assert torch.equal(teacher.state_dict()[key], value), (name, key)


def test_teacher_of_another_architecture(tiny_data, tmp_path):
    """The teacher may be a different torchvision model from the student (here resnet34 -> resnet18)."""
    torch.manual_seed(2)
    path = tmp_path / "r34.pth"
    torch.save(build_model("resnet34", 4).state_dict(), path)
    assert main(["--data", str(tiny_data), *TINY, "--epochs", "1", "--output", str(tmp_path / "o"),
                 "--teacher", str(path), "--teacher-arch", "resnet34"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--kd-weight", "0.3"], "--kd-weight given without --teacher"),
    (["--distill-temperature", "2", "--distill-divergence", "jsd"],
     "--distill-divergence, --distill-temperature given without --teacher"),
    (["--teacher", "{r34}", "--distill-temperature", "0"], "--distill-temperature must be a finite number > 0"),
    (["--teacher", "{r34}", "--distill-temperature", "nan"], "--distill-temperature must be a finite number > 0"),
    (["--teacher", "{r34}", "--kd-weight", "1.5"], "--kd-weight must be in [0, 1]"),
    (["--teacher", "{r34}", "--distill-jsd-beta", "1"], "--distill-jsd-beta must be in (0, 1)"),
    (["--teacher", "{r34}", "--distill-jsd-beta", "0.3"], "jsd_beta=0.3 is used by divergence='jsd' only"),
    (["--teacher", "{dir}/nowhere.pt"], "nowhere.pt': no such file"),
    (["--teacher", "{r34}", "--teacher-arch", "resnet35"], "--teacher-arch 'resnet35': not a torchvision"),
    (["--teacher", "{garbage}"], "not a readable weights file"),
    (["--teacher", "{empty}"], "holds no state_dict"),
    (["--teacher", "{r34}"], "its weights are not a resnet18's (--teacher-arch): parameters unexpected 96"),
    (["--teacher", "{r18_10}"], "the teacher's classifier has 10 outputs, the data has 4 classes"),
    (["--teacher", "{ours}", "--teacher-arch", "resnet34"], "the checkpoint is a resnet18, but --teacher-arch is resnet34"),
    (["--teacher", "{ours3}"], "the teacher was trained on other classes (3: ant, bee, cat) than the data's (4"),
])
def test_bad_teacher_flags(argv, message, teacher_run, tiny_data, tmp_path, capsys):
    torch.manual_seed(3)
    files = {"r34": tmp_path / "r34.pth", "r18_10": tmp_path / "r18_10.pth", "garbage": tmp_path / "garbage.pt",
             "empty": tmp_path / "empty.pt", "ours": teacher_run / "checkpoint.pt", "ours3": tmp_path / "ours3.pt",
             "dir": tmp_path}
    torch.save(build_model("resnet34", 4).state_dict(), files["r34"])
    torch.save(build_model("resnet18", 10).state_dict(), files["r18_10"])
    files["garbage"].write_bytes(b"not a checkpoint")
    torch.save({"epoch": 1}, files["empty"])
    ours3 = torch.load(teacher_run / "checkpoint.pt", weights_only=True)
    ours3["classes"] = list(CLASSES[:3])
    torch.save(ours3, files["ours3"])
    argv = [a.format(**files) for a in argv]
    rc = main(["--data", str(tiny_data), *TINY, "--epochs", "1", "--output", str(tmp_path / "out"), *argv])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_bad_hard_loss_option_with_teacher(tmp_path, capsys):
    """The hard loss's own checks still stop the run (focal's gamma), teacher or not."""
    path = tmp_path / "t.pth"
    torch.save(build_model("resnet18", 10).state_dict(), path)
    rc = main(["--dummy", "--num-classes", "10", *TINY, "--epochs", "1", "--loss", "focal", "--gamma", "-1",
               "--teacher", str(path), "--output", str(tmp_path / "o")])
    assert rc == 2 and "gamma" in capsys.readouterr().err



@pytest.mark.gpu
def test_distill_on_gpu_bf16_channels_last(tmp_path):
    """The teacher under the student's bf16 autocast and channels-last memory format, on one GPU."""
    if not torch.cuda.is_available():  # checked here, not at import: test modules must not touch the GPU
        pytest.skip("needs CUDA")
    path = tmp_path / "teacher.pth"
    torch.save(build_model("resnet34", 100).state_dict(), path)
    args = ["--dummy", "--device", "cuda", "--amp", "bf16", "--channels-last", "--num-classes", "100",
            "--dummy-train-size", "128", "--dummy-val-size", "64", "--arch", "resnet18", "--image-size", "64",
            "--batch-size", "64", "--workers", "0", "--progress", "none", "--epochs", "1", "--loss", "crl",
            "--teacher", str(path), "--teacher-arch", "resnet34", "--distill-temperature", "2",
            "--mixup-alpha", "0.2", "--output", str(tmp_path / "o")]
    assert main(args) == 0
    (record,) = read_log(tmp_path / "o")
    assert record["train_images"] == 128 and torch.isfinite(torch.tensor(record["train_loss"]))
