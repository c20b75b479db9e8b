"""Smoke tests of ``bench/cpu_kernels.py``: the class-index sweep and the ``--targets soft mixup``
mode (the recipe's targets), on tiny shapes with few repeats. The numbers are not the point, the
rows, the files and the float64 errors are. In-process, ``--cpu-allocator system`` (the default
retunes malloc for the rest of the process)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import fusedloss as fl

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "cpu_kernels.py"
TINY = ["--shapes", "16x40", "--threads", "1", "--repeat", "2", "--cpu-allocator", "system"]


def load_script():
    spec = importlib.util.spec_from_file_location("cpu_kernels_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_main(argv: list[str]) -> int:
    threads = torch.get_num_threads()
    try:
        return load_script().main(argv)
    finally:
        torch.set_num_threads(threads)  # the script sets its own thread counts


def cpu_backend_available() -> bool:
    return "cpu" in fl.available_backends()


def two_target_api() -> bool:
    try:
        out = fl.softmax_loss(torch.zeros(2, 3), (torch.tensor([0, 1]), torch.tensor([2, 1]), torch.tensor([0.25, 1.0])),
                              "crl", reduction="none")
    except (TypeError, ValueError, NotImplementedError, AttributeError):
        return False
    return out.shape == (2,)


@pytest.mark.skipif(not cpu_backend_available(), reason="C++ extension not built")
def test_class_index_sweep_smoke(tmp_path: Path) -> None:
    out = tmp_path / "k"
    rc = run_main([*TINY, "--dtypes", "float32", "--backends", "cpu", "--no-accuracy", "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert {r["loss"] for r in doc["results"] if r["backend"] == "cpu"} == set(fl.LOSSES)
    assert "| 16 x 40 | float32 | ce | 1 |" in out.with_suffix(".md").read_text()


@pytest.mark.skipif(not cpu_backend_available(), reason="C++ extension not built")
def test_targets_mode_rows_errors_and_rerender(tmp_path: Path) -> None:
    out = tmp_path / "t"
    rc = run_main(["--targets", "soft", "mixup", *TINY, "--warmup", "1", "--dtypes", "float32", "bfloat16",
                   "--out", str(out)])
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["config"]["targets"] == ["soft", "mixup"]
    rows = {(r["dtype"], r["mode"], r["loss"], r["row"]): r for r in doc["results"]}
    for dtype in ("float32", "bfloat16"):
        assert rows[(dtype, "copy", "-", "copy")]["x_copy"] == 1.0
        fused_soft = rows[(dtype, "soft", "ce", "fused")]
        assert "error" not in fused_soft and fused_soft["ops"] == "ext_soft_fwd"
        assert "error" not in rows[(dtype, "soft", "ce", "torch")]
        for key in ("torch", "soft_fused", "soft_torch"):
            assert "error" not in rows[(dtype, "mixup", "ce", key)]
        for loss in fl.LOSSES:
            two = rows[(dtype, "mixup", loss, "two_calls")]
            assert "error" not in two and two["ops"] == "ext_fwd x2"
            assert (dtype, "mixup", loss, "fused") in rows
    # Against float64 on the same rounded logits: (mean loss error, error of N x the gradient). float32:
    # rounding. bfloat16: the results are rounded to bfloat16, half an ulp is 2**-6 = 0.016 for a loss in
    # [4, 8) (log 40 = 3.7, bce and nllr more) and 2**-9 for a gradient entry in [0.5, 1); the two-call
    # rows round each part and then their sum, and focal's gradient carries its factor's rounding too.
    tol = {"float32": (1e-5, 1e-5), "bfloat16": (3e-2, 1.6e-2)}
    for (dtype, mode, loss, key), r in rows.items():
        if mode != "copy" and "error" not in r:
            assert r["loss_err"] <= tol[dtype][0] and r["grad_err"] <= tol[dtype][1], (dtype, mode, loss, key, r)
    fused_errors = [r for (d, m, l, k), r in rows.items() if m == "mixup" and k == "fused" and "error" in r]
    if two_target_api():
        assert not fused_errors and rc == 0
    else:  # before the two-target form lands, its rows say why and the run says so
        assert len(fused_errors) == 2 * len(fl.LOSSES) and rc == 1
    text = out.with_suffix(".md").read_text()
    assert "## Soft targets" in text and "## Two-target mixup" in text and "| 16 x 40 | bfloat16 | 1 | focal |" in text
    again = tmp_path / "again"
    run_main(["--from-json", str(out.with_suffix(".json")), "--out", str(again)])
    assert again.with_suffix(".md").read_text() == text
