"""Runs tests/test_triton_interpreter.py, and the triton cases of tests/test_layouts.py,
test_head.py, test_loss_options.py, test_soft_targets.py and test_mixup.py, in a subprocess
with TRITON_INTERPRET=1.

Triton chooses compiled or interpreted kernels when it is imported, process-wide, so
the interpreter cases cannot share a process with the compiled ones (the AOT check,
the GPU tests). A plain ``pytest`` run gets them through this subprocess; running
``TRITON_INTERPRET=1 pytest tests/test_triton_interpreter.py`` runs them directly.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_interpreter_cases_in_a_subprocess():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 already: tests/test_triton_interpreter.py runs in this process")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning", "-m", "not gpu",
           str(HERE / "test_triton_interpreter.py"), str(HERE / "test_layouts.py"),
           str(HERE / "test_head.py"), str(HERE / "test_loss_options.py"), str(HERE / "test_soft_targets.py"),
           str(HERE / "test_mixup.py"),
           "-k", "triton"]  # every test of the first file (its module name), the triton ones of the others
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    print(out[-3000:])
    assert proc.returncode == 0, f"interpreter cases failed (rc={proc.returncode}):\n{out[-12000:]}"
