"""The Triton twins of the vocabulary-parallel bce ops (``fusedloss::triton_bce_partial`` /
``triton_bce_global_bwd``: triton_kernels/split_vocab/kernels.py, launch.py).

* interpreter cases (CPU tensors, ``TRITON_INTERPRET=1``): against the C++ CPU ops
  ``ext_bce_partial`` / ``ext_bce_global_bwd`` and tests/test_bce_parallel_ops.py's float64
  evaluation, with the launch heuristic overridden so that a row of 37 classes spans three
  column tiles of 16 (ragged tail) with several rows per program (a ragged last row block), and
  left alone (one tile); every scenario of test_bce_parallel_ops (c and w local or elsewhere,
  w == c, ignored rows, a wrong class leading by 60 or 100), fp32 and bf16, strided rows, z-loss,
  soft cap. test_bce_parallel_ops.py's own checks run on the Triton ops too (its ``backend``
  parameter). Triton fixes interpreted vs compiled at import, so a plain ``pytest`` runs both
  files' interpreter cases in a subprocess (``test_interpreter_cases_in_a_subprocess``);
  directly: ``TRITON_INTERPRET=1 python -m pytest tests/test_triton_bce_parallel.py``;
* AOT (no interpreter): both kernels compile for sm_80 and sm_90 without spills.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("fusedloss._C")

from fusedloss import dispatch, ops  # noqa: E402
from test_bce_parallel_ops import (SCENARIOS, _as_slice, _global_numbers, _grad_by_autograd, _rows,  # noqa: E402
                                   _slice_idx)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HERE = Path(__file__).resolve().parent
interpreter = pytest.mark.skipif(not INTERPRET, reason="TRITON_INTERPRET=1 only (the subprocess test runs them)")
compiled = pytest.mark.skipif(INTERPRET, reason="TRITON_INTERPRET=1 interprets every kernel: AOT needs compiled mode")

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on masked -inf lanes

EXT_PARTIAL = torch.ops.fusedloss.ext_bce_partial.default
EXT_BWD = torch.ops.fusedloss.ext_bce_global_bwd.default
#: "tiles": C = 37 in column tiles of 16, 16, 5 and 4 rows per program (15 rows: a ragged last block);
#: "one": the heuristic's own (one tile of 64 columns).
REGIMES = {"tiles": dict(stream_block=16, min_tile=64), "one": {}}


def _triton():
    be = dispatch.resolve("triton", torch.device("cpu"))
    sv = be.family(ops.SplitVocabOps)
    return sv.bce_partial, sv.bce_global_bwd


def _case(vl, dtype, seed, softcap, strided):
    full, cs, t, w = _rows(vl, dtype, seed=seed)
    lse, r, log1m_pw, x_w, _, _ = _global_numbers(full, t, w, softcap)
    idx = _slice_idx(t, w, cs, vl)
    stats = torch.stack([lse, r, log1m_pw, x_w], 1).float()
    own = torch.linspace(-1.5, 2.0, len(SCENARIOS), dtype=torch.float64)
    own[t < 0] = 0
    return full, cs, t, w, idx, stats, own, _as_slice(full, cs, vl, dtype, strided)


@interpreter
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("strided,z,softcap", [(False, 0.0, 0.0), (True, 0.01, 0.0), (True, 0.0, 5.0),
                                               (False, 0.01, 30.0)], ids=["plain", "strided-z", "strided-cap",
                                                                           "z-cap"])
def test_matches_the_cpu_ops_and_float64(regime, dtype, strided, z, softcap):
    from fusedloss.triton_kernels import heuristics
    partial, global_bwd = _triton()
    vl = 37
    full, cs, t, w, idx, stats, own, x = _case(vl, dtype, 7, softcap, strided)
    assert x.stride(1) == 1 and (x.stride(0) > vl) == strided
    with heuristics.override(**REGIMES[regime]):
        sums = partial(x, stats, idx, softcap)
        g = global_bwd(own.float(), x, stats, idx, z, softcap)
    assert sums.dtype == torch.float32 and sums.shape == (len(SCENARIOS), 2)
    assert g.dtype == dtype and g.shape == x.shape and g.is_contiguous()
    # The C++ CPU ops on the same inputs: the same float32 math, summed in another order.
    want_sums = EXT_PARTIAL(x, stats, idx, softcap)
    torch.testing.assert_close(sums, want_sums, rtol=1e-5, atol=1e-6)
    want_g = EXT_BWD(own.float(), x, stats, idx, z, softcap)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(g.float(), want_g.float(), rtol=ulp, atol=1e-6 + ulp * 1e-2)
    # float64 (autograd of the loss): as test_bce_parallel_ops's tolerances.
    lse, r = stats[:, 0].double(), stats[:, 1].double()
    ref = _grad_by_autograd(full, t, w, own, z, softcap)[:, cs:cs + vl]
    rtol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    row_scale = own.abs() * (1 + r.abs()) * (1 + lse.abs())
    assert not ((g.double() - ref).abs() > rtol * ref.abs() + 1e-7 * row_scale[:, None]).any()
    ignored = t < 0
    assert ignored.any() and torch.equal(g[ignored], torch.zeros_like(g[ignored]))
    assert torch.equal(sums[ignored], torch.zeros_like(sums[ignored]))


@interpreter
def test_ignored_rows_read_no_logit():
    """An ignored row's logits may be NaN (or anything): zeros out, nothing read."""
    partial, global_bwd = _triton()
    full, cs, t, w, idx, stats, own, x = _case(37, torch.float32, 3, 0.0, False)
    x = x.clone()
    x[t < 0] = torch.nan
    stats = stats.clone()
    stats[t < 0] = torch.nan
    assert torch.isfinite(partial(x, stats, idx, 0.0)).all()
    assert torch.isfinite(global_bwd(own.float(), x, stats, idx, 0.01, 0.0)).all()


@interpreter
def test_empty_and_transposed():
    partial, global_bwd = _triton()
    x = torch.randn(0, 5)
    assert partial(x, torch.zeros(0, 4), torch.zeros(0, 3, dtype=torch.long), 0.0).shape == (0, 2)
    empty_idx = torch.zeros(0, 3, dtype=torch.long)
    assert global_bwd(torch.zeros(0), x, torch.zeros(0, 4), empty_idx, 0.0, 0.0).shape == (0, 5)
    full, cs, t, w, idx, stats, own, x = _case(37, torch.float32, 5, 0.0, False)
    xt = x.t().contiguous().t()  # class stride N: copied once by the launcher
    torch.testing.assert_close(partial(xt, stats, idx, 0.0), EXT_PARTIAL(x, stats, idx, 0.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(global_bwd(own.float(), xt, stats, idx, 0.0, 0.0),
                               EXT_BWD(own.float(), x, stats, idx, 0.0, 0.0), rtol=1e-5, atol=1e-6)


def test_triton_backend_has_the_ops():
    if not INTERPRET:
        pytest.skip("resolving triton on CPU tensors needs TRITON_INTERPRET=1")
    from fusedloss.triton_kernels.split_vocab import launch as lb
    be = dispatch.resolve("triton", torch.device("cpu"))
    sv = be.family(ops.SplitVocabOps)
    assert sv.bce_partial is lb.triton_bce_partial and sv.bce_global_bwd is lb.triton_bce_global_bwd
    assert str(torch.ops.fusedloss.triton_bce_partial.default._schema).endswith(
        str(torch.ops.fusedloss.ext_bce_partial.default._schema).split("ext_bce_partial")[1])
    assert str(torch.ops.fusedloss.triton_bce_global_bwd.default._schema).endswith(
        str(torch.ops.fusedloss.ext_bce_global_bwd.default._schema).split("ext_bce_global_bwd")[1])


def test_interpreter_cases_in_a_subprocess():
    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 already: the interpreter cases run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning",
           "-m", "not gpu", str(Path(__file__)), str(HERE / "test_bce_parallel_ops.py"), "-k", "triton"]
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    print(out[-3000:])
    assert proc.returncode == 0, f"interpreter cases failed (rc={proc.returncode}):\n{out[-12000:]}"
    assert " passed" in out and "failed" not in out


# ----------------------------------------------------------------------------
# AOT: sm_80 / sm_90, no spills
# ----------------------------------------------------------------------------

def _aot_specs():
    if INTERPRET:
        return []
    from fusedloss.triton_kernels.split_vocab import aot_specs
    return aot_specs.ci_specs()


@compiled
@pytest.mark.parametrize("arch", (80, 90), ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("spec", _aot_specs(), ids=lambda s: s.label())
def test_aot_compiles_without_spills(spec, arch):
    from fusedloss.triton_kernels import aot
    u = aot.resource_usage(spec, arch)
    print(f"{spec.label()} sm_{arch}: {u.registers} registers, spill {u.spill_stores}/{u.spill_loads} B, "
          f"local {u.local_bytes} B, stack {u.stack_bytes} B")
    assert u.spill_stores == 0 and u.spill_loads == 0 and u.local_bytes == 0 and u.stack_bytes == 0, u
    assert 0 < u.registers <= 255
