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
