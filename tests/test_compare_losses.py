"""Smoke test of ``bench/compare_losses.py``: every loss, 1 seed x 2 epochs, writes its table, JSON and plot."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from fusedloss import LOSSES  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "compare_losses.py"


def load_script():
    spec = importlib.util.spec_from_file_location("compare_losses", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_compare_losses_smoke(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert load_script().main(["--seeds", "1", "--epochs", "2", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)  # the script pins its own thread count
    table = (tmp_path / "digits_losses.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(LOSSES)
    runs = json.loads((tmp_path / "digits_losses.json").read_text())["runs"]
    assert len(runs) == len(LOSSES) and all(len(r["test_acc"]) == 2 for r in runs)
    # After 2 epochs (14 steps) every loss already predicts better than uniform (cross-entropy log 10).
    assert all(r["test_nll"][-1] < math.log(10) for r in runs)
    assert (tmp_path / "digits_losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_losses_recipe_flags(tmp_path):
    """--mixup-alpha/--cutmix-alpha/--label-smoothing with --with-plain: both recipes in one run, routed
    as fusedloss.train routes them (the two-target form, fused on the CPU kernel), a paired table."""
    threads = torch.get_num_threads()
    argv = ["--seeds", "1", "--epochs", "1", "--losses", "ce", "crl", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0",
            "--label-smoothing", "0.1", "--with-plain", "--out", str(tmp_path)]
    try:
        assert load_script().main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.loads((tmp_path / "digits_losses_mixup.json").read_text())
    recipe = "mixup 0.2 / cutmix 1 / ls 0.1"
    assert list(doc["recipes"]) == ["plain", recipe]
    assert doc["recipes"][recipe]["label_smoothing"] == 0.1 and doc["recipes"]["plain"]["mixup_alpha"] == 0.0
    runs = {(r["recipe"], r["loss"]): r for r in doc["runs"]}
    assert set(runs) == {(rec, loss) for rec in ("plain", recipe) for loss in ("ce", "crl")}
    assert runs[(recipe, "ce")]["target_path"] == "two-target (fused, cpu)"
    assert runs[(recipe, "crl")]["target_path"] == "two-target (fused, cpu)"
    assert runs[("plain", "crl")]["target_path"] == "-"
    # Same seed, same initial weights and batch order: the flags are what changed the training loss.
    assert runs[(recipe, "crl")]["train_loss"] != runs[("plain", "crl")]["train_loss"]
    assert all(0 <= r["test_ece"][-1] <= 100 for r in doc["runs"])
    table = (tmp_path / "digits_losses_mixup.md").read_text()
    assert f"## plain against {recipe}, paired by seed" in table
    assert "--mixup-alpha 0.2 --cutmix-alpha 1.0 --label-smoothing 0.1" in table
    assert (tmp_path / "digits_losses_mixup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_expected_calibration_error_by_hand():
    """Two classes, confidences 0.75 (right), 0.75 (wrong), 0.95 (right), 0.55 (wrong): three of the 15
    bins hold samples; ECE = (2 |1/2 - 0.75| + |1 - 0.95| + |0 - 0.55|) / 4 = 27.5 %."""
    conf = torch.tensor([0.75, 0.75, 0.95, 0.55], dtype=torch.float64)
    logits = torch.stack([torch.log(conf / (1 - conf)), torch.zeros(4, dtype=torch.float64)], 1)  # class 0 wins
    y = torch.tensor([0, 1, 0, 1])
    assert load_script().expected_calibration_error(logits, y) == pytest.approx(27.5, abs=1e-9)


def test_compare_losses_teacher_mode(tmp_path):
    """--kd-weight with --with-plain: a teacher trained first (recorded in the JSON and the table), then
    the same seeds with and without it, paired; the mixed route runs the teacher on the mixed images."""
    threads = torch.get_num_threads()
    argv = ["--seeds", "1", "--epochs", "1", "--losses", "ce", "crl", "--kd-weight", "0.5", "--distill-temperature",
            "2", "--teacher-epochs", "2", "--teacher-width", "1", "--with-plain", "--out", str(tmp_path)]
    try:
        script = load_script()
        assert script.main(argv) == 0
        assert script.main(["--seeds", "1", "--epochs", "1", "--losses", "focal", "--kd-weight", "0.3",
                            "--distill-divergence", "jsd", "--mixup-alpha", "0.2", "--teacher-epochs", "1",
                            "--teacher-width", "1", "--out", str(tmp_path), "--name", "mixed"]) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.loads((tmp_path / "digits_distill.json").read_text())
    recipe = "KD kl T 2 W 0.5"
    assert list(doc["recipes"]) == ["plain", recipe]
    assert doc["recipes"][recipe]["kd_weight"] == 0.5 and doc["recipes"]["plain"]["kd_weight"] == 0.0
    teacher = doc["teacher"]
    assert teacher["loss"] == "ce" and len(teacher["test_acc"]) == 2 and teacher["seed"] == 1000
    runs = {(r["recipe"], r["loss"]): r for r in doc["runs"]}
    assert set(runs) == {(rec, loss) for rec in ("plain", recipe) for loss in ("ce", "crl")}
    # Same seed, same initial weights and batch order: the teacher is what changed the training loss.
    for loss in ("ce", "crl"):
        assert runs[(recipe, loss)]["train_loss"] != runs[("plain", loss)]["train_loss"]
    table = (tmp_path / "digits_distill.md").read_text()
    assert f"## plain against {recipe}, paired by seed" in table
    assert f"its test accuracy {teacher['test_acc'][-1]:.2f} %" in table
    mixed = json.loads((tmp_path / "mixed.json").read_text())
    (run,) = mixed["runs"]
    assert run["recipe"] == "mixup 0.2 / KD jsd T 4 W 0.3" and run["target_path"] == "two-target (fused, cpu)"
    assert all(math.isfinite(x) for x in run["train_loss"])
