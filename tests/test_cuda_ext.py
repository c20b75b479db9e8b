"""The CUDA half of the extension (csrc/cuda/): registration and build checks that run on
any machine with a CUDA build, and ``@pytest.mark.gpu`` tests of the kernels against the
float64 oracle that need a device (skipped without one).

A build without the CUDA part skips the registration checks, unless
``FUSEDLOSS_BUILD_CUDA=1`` is set (CI sets it for the build and the tests): then a
missing CUDA kernel is a failure.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess

import pytest
import torch

import fusedloss as fl
from fusedloss import dispatch, mixup, ops
from fusedloss.reference import extreme_logits
from fusedloss.variants import Reduction, Variant, reduction_id, variant_id
from oracle import assert_close, oracle_loss_and_grad
from test_mixup import OPTIONS as MIX_OPTIONS
from test_mixup import bce_cases, check_mix_op, ops_called, oracle_mixed_and_grad, scalars

_C = pytest.importorskip("fusedloss._C", reason="C++ extension not built")
from fusedloss import _cpp_backend  # noqa: E402

REQUIRED = os.environ.get("FUSEDLOSS_BUILD_CUDA") == "1"
needs_cuda_build = pytest.mark.skipif(not (_cpp_backend.cuda_compiled() or REQUIRED),
                                      reason="extension built without its CUDA part")
gpu = pytest.mark.gpu
needs_device = pytest.mark.skipif(not (torch.cuda.is_available() and _cpp_backend.cuda_compiled()),
                                  reason="needs a CUDA device and the CUDA kernels")

FWD = torch.ops.fusedloss.ext_fwd.default
BWD = torch.ops.fusedloss.ext_bwd.default


# ----------------------------------------------------------------------------
# Build and registration (no device needed)
# ----------------------------------------------------------------------------

@needs_cuda_build
def test_cuda_mix_ops_registered():
    """Mixup's two-target pair has CUDA kernels, and the cuda backend fuses every loss with it."""
    for op in ("fusedloss::ext_mix_fwd", "fusedloss::ext_mix_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has no CUDA kernel"
    be = dispatch._registry["cuda"]
    mix = be.family(mixup.TwoTargetOps)
    assert mix.fwd is torch.ops.fusedloss.ext_mix_fwd.default
    assert all(mix.fuses(int(v), cap) for v in Variant for cap in (0.0, 5.0))


@needs_cuda_build
def test_cuda_soft_loss_ops_registered():
    """Class probabilities for every loss and the expected-loss label smoothing have CUDA kernels
    (row_kernels.cuh expected_row), and the cuda backend says so (no reference fallback, no refusal)."""
    for op in ("fusedloss::ext_soft_loss_fwd", "fusedloss::ext_soft_loss_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has no CUDA kernel"
    be = dispatch._registry["cuda"]
    assert be.family(ops.ProbsOps).loss_fwd is torch.ops.fusedloss.ext_soft_loss_fwd.default
    assert be.one_target.expected_smoothing


@needs_cuda_build
def test_cuda_kernels_registered_and_library_loads():
    for op in ("fusedloss::ext_fwd", "fusedloss::ext_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has no CUDA kernel"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
    assert "cuda" in dispatch._registry
    be = dispatch._registry["cuda"]
    assert be.one_target.fused_grad and be.supports(torch.device("cuda")) and not be.supports(torch.device("cpu"))


def _cuobjdump() -> str | None:
    """cuobjdump from CUDA_HOME, PATH, or the copy Triton ships (minimal toolkits lack it)."""
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
                  shutil.which("cuobjdump") or ""]
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@needs_cuda_build
def test_kernels_do_not_spill():
    """Every kernel of every architecture: no stack frame and no local memory (register
    spills or arrays addressed at run time would show as STACK/LOCAL > 0)."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump")
    out = subprocess.run([tool, "-res-usage", _C.__file__], capture_output=True, text=True, check=True).stdout
    kernels = re.findall(r"Function (\S+):\s*\n\s*(REG:\d+ STACK:(\d+) SHARED:\d+ LOCAL:(\d+))", out)
    ours = [k for k in kernels if "fusedloss" in k[0]]
    assert ours, out[:2000]
    spilling = [(name, usage) for name, usage, stack, local in ours if int(stack) or int(local)]
    assert not spilling, spilling
    archs = set(re.findall(r"arch = (sm_\d+)", out))
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        assert {"sm_80", "sm_90"} <= archs, archs


# ----------------------------------------------------------------------------
# The kernels against the oracle (need a device)
# ----------------------------------------------------------------------------

def _run(x, t, loss, *, weight=None, reduction="mean", eps=0.0, grad_output=None, ignore_index=-100):
    scalars = (int(variant_id(loss)), int(reduction_id(reduction)), ignore_index, eps, 1.5, 1.0, 2.0, 0.0, 0.0)
    out, stats, grad = FWD(x, t, weight, *scalars, True)
    out2, _, empty = FWD(x, t, weight, *scalars, False)
    assert empty.shape == (0,)
    torch.testing.assert_close(out2, out, equal_nan=True)
    go = torch.ones_like(out) if grad_output is None else grad_output
    g_bwd = BWD(go, x, t, weight, stats, *scalars)
    return out, grad, g_bwd


def _check(x, t, loss, *, grad_output=None, msg="", **kw):
    out, grad, g_bwd = _run(x, t, loss, grad_output=grad_output, **kw)
    okw = dict(weight=None if kw.get("weight") is None else kw["weight"].cpu(),
               reduction=kw.get("reduction", "mean"), label_smoothing=kw.get("eps", 0.0),
               ignore_index=kw.get("ignore_index", -100))
    xc, tc = x.cpu(), t.cpu()
    ref, ref_g = oracle_loss_and_grad(xc, tc, loss, **okw)
    loss_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert_close(out.cpu(), ref, loss_dtype, "loss", msg)
    assert_close(grad.cpu(), ref_g, x.dtype, "grad", msg + " (fused)")
    if grad_output is not None:
        _, ref_g = oracle_loss_and_grad(xc, tc, loss, grad_output=grad_output.cpu(), **okw)
    assert_close(g_bwd.cpu(), ref_g, x.dtype, "grad", msg + " (backward op)")


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@gpu
@needs_device
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_against_oracle(loss, dtype, reduction):
    g = torch.Generator().manual_seed(0)
    # C = 1000 takes the 128-bit path for every dtype; C = 1001 the scalar one.
    for c in (1000, 1001):
        x = (3 * torch.randn(37, c, generator=g)).to(dtype).cuda()
        t = torch.randint(0, c, (37,), generator=g)
        t[[2, 30]] = -100
        t = t.cuda()
        w = (torch.rand(c, generator=g) + 0.5).cuda()
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        go = (torch.rand(37, dtype=acc) + 0.5).cuda() if reduction == "none" else torch.tensor(1.7, dtype=acc).cuda()
        _check(x, t, loss, weight=w, reduction=reduction, grad_output=go, msg=f"{loss} {dtype} C={c}")
        if loss == "ce":
            _check(x, t, loss, weight=w, reduction=reduction, eps=0.1, msg=f"smoothing {dtype} C={c}")


@gpu
@needs_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_extreme_logits_and_long_strided_rows(loss, dtype):
    x, t = extreme_logits(42, 777, dtype=dtype, generator=torch.Generator().manual_seed(1))
    _check(x.cuda(), t.cuda(), loss, reduction="none", msg="extreme")
    base = torch.randn(9, 70000 + 13, generator=torch.Generator().manual_seed(2)).to(dtype).cuda()
    view = base[:, 5:70005]  # unaligned start, row stride not a pack multiple: scalar path
    t = torch.tensor([0, 1, 69999, 4095, 4096, 35000, 12, 7, 69998]).cuda()
    _check(view, t, loss, reduction="none", msg="strided")
    got = _run(view, t, loss, reduction="none")
    want = _run(view.contiguous(), t, loss, reduction="none")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, equal_nan=True)


@gpu
@needs_device
def test_bce_wrong_class_leading_on_gpu():
    for lead in (10.0, 60.0, 100.0, 1000.0):
        x = torch.randn(12, 3000, generator=torch.Generator().manual_seed(3))
        t = torch.randint(0, 3000, (12,), generator=torch.Generator().manual_seed(4))
        w = (t + 1) % 3000
        x[torch.arange(12), w] = x.max(1).values + lead
        _check(x.cuda(), t.cuda(), "bce", reduction="none", msg=f"lead {lead}")


@gpu
@needs_device
def test_bad_target_marks_row_nan_or_raises_in_strict_mode(monkeypatch):
    x = torch.randn(4, 7).cuda()
    t = torch.tensor([0, 9, -100, 3]).cuda()
    monkeypatch.delenv("FUSEDLOSS_STRICT", raising=False)
    out, grad, _ = _run(x, t, "focal", reduction="none")
    out, grad = out.cpu(), grad.cpu()
    assert math.isnan(out[1]) and torch.isnan(grad[1]).all()
    assert torch.isfinite(out[[0, 3]]).all() and out[2] == 0 and (grad[2] == 0).all()
    monkeypatch.setenv("FUSEDLOSS_STRICT", "1")
    with pytest.raises(IndexError, match=r"target 9\b.*C=7"):
        FWD(x, t, None, int(Variant.CE), int(Reduction.MEAN), -100, 0.0, 1.5, 1.0, 2.0, 0.0, 0.0, True)


@gpu
@needs_device
def test_opcheck_on_cuda():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64).cuda().requires_grad_(True)
    t = torch.tensor([0, -100, 4, 2, 1, 3]).cuda()
    w = (torch.rand(5, generator=g, dtype=torch.float64) + 0.5).cuda()
    for variant in Variant:
        for red in Reduction:
            eps = 0.1 if variant == Variant.CE else 0.0
            args = (x, t, w, int(variant), int(red), -100, eps, 1.5, 1.0, 2.0, 0.0, 0.0)
            torch.library.opcheck(FWD, args + (True,))
            loss, stats, _ = FWD(x.detach(), t, w, *args[3:], False)
            torch.library.opcheck(BWD, (torch.rand_like(loss) + 0.5, x.detach(), t, w, stats) + args[3:])


@gpu
@needs_device
def test_functional_backend_cuda():
    x = torch.randn(64, 1000, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (64,), device="cuda")
    loss = fl.softmax_loss(x, t, "crl", backend="cuda")
    loss.backward()
    _, ref_g = oracle_loss_and_grad(x.detach().cpu(), t.cpu(), "crl")
    assert_close(x.grad.cpu(), ref_g, torch.float32, "grad")


# ----------------------------------------------------------------------------
# Mixup's two targets (ext_mix_fwd / ext_mix_bwd) against the float64 oracle
# ----------------------------------------------------------------------------

@gpu
@needs_device
@pytest.mark.parametrize("option", MIX_OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_mix_against_oracle(loss, dtype, option):
    """Every loss, plain / smoothing + z-loss / soft cap, every reduction, per-row and scalar lam
    (0 and 1), with and without weights; the rows of bce_cases (w on either target or elsewhere,
    leads of 50-100, equal targets, ignored parts); C = 1000 (128-bit path) and 1001 (scalar)."""
    opts = MIX_OPTIONS[option]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for c in (1000, 1001):
        x, ya, yb, lam = bce_cases(c, dtype, seed=c)
        n = x.shape[0]
        w = torch.rand(c, generator=torch.Generator().manual_seed(c), dtype=acc) + 0.5
        x, ya, yb, w = x.cuda(), ya.cuda(), yb.cuda(), w.cuda()
        for reduction in ("none", "mean", "sum"):
            go = (torch.tensor(0.7, dtype=acc).expand(n) if reduction == "none" else torch.tensor(1.3, dtype=acc)).cuda()
            for lam_rows in (lam, torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)):
                for weight in (None, w):
                    check_mix_op(x, ya, yb, lam_rows.to(acc).cuda(), loss, weight=weight, reduction=reduction,
                                 grad_output=go, msg=f"{loss} {dtype} C={c} {reduction}", **opts)


@gpu
@needs_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_mix_long_strided_rows_and_public_call(loss, dtype):
    """Rows of 70013 read in place from a wider tensor (scalar path, several blocks' worth),
    the same values as contiguous; fl.softmax_loss(backend='cuda') runs the fused op."""
    g = torch.Generator().manual_seed(7)
    base = (3 * torch.randn(6, 70013, generator=g)).to(dtype).cuda()
    view = base[:, 5:70005]
    ya = torch.tensor([0, 69999, 4095, 35000, -100, 12]).cuda()
    yb = torch.tensor([1, 69998, 4096, 35000, 7, -100]).cuda()
    lam = torch.rand(6, generator=g).cuda()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    got = check_mix_op(view, ya, yb, lam.to(acc), loss, reduction="none", msg="strided")
    want = check_mix_op(view.contiguous(), ya, yb, lam.to(acc), loss, reduction="none", msg="contiguous")
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, equal_nan=True)
    xr = view.detach().clone().requires_grad_(True)
    with ops_called() as ops:
        out = fl.softmax_loss(xr, (ya, yb, lam), loss, backend="cuda", softcap=20.0)
        out.backward()
    assert ops[0] == "ext_mix_fwd" and "ext_fwd" not in ops, ops
    ref, ref_g = oracle_mixed_and_grad(view.cpu(), ya.cpu(), yb.cpu(), lam.cpu().double(), loss, softcap=20.0)
    assert_close(out.cpu(), ref, dtype, "loss")
    assert_close(xr.grad.cpu(), ref_g, dtype, "grad")


@gpu
@needs_device
def test_mix_bad_target_nan_row_empty_part_and_opcheck():
    x = torch.randn(4, 7, dtype=torch.float64).cuda()
    lam = torch.full((4,), 0.4, dtype=torch.float64).cuda()
    ya, yb = torch.tensor([0, 9, -100, 3]).cuda(), torch.tensor([1, 2, 5, -100]).cuda()
    for loss in fl.LOSSES:
        out, _, grad = torch.ops.fusedloss.ext_mix_fwd(x, ya, yb, lam, None, *scalars(loss, "none"), True)
        out, grad = out.cpu(), grad.cpu()
        assert math.isnan(out[1]) and torch.isnan(grad[1]).all()
        assert torch.isfinite(out[[0, 2, 3]]).all() and torch.isfinite(grad[[0, 2, 3]]).all()
        all_ignored = torch.full((4,), -100).cuda()
        out, _, _ = torch.ops.fusedloss.ext_mix_fwd(x, all_ignored, yb.clamp(min=0), lam, None,
                                                    *scalars(loss, "mean"), False)
        assert math.isnan(out.item())
    xr = x.clone().requires_grad_(True)
    ya, yb = torch.tensor([0, 4, -100, 3]).cuda(), torch.tensor([1, 4, 5, -100]).cuda()
    w = (torch.rand(7, dtype=torch.float64) + 0.5).cuda()
    fwd, bwd = torch.ops.fusedloss.ext_mix_fwd.default, torch.ops.fusedloss.ext_mix_bwd.default
    for loss in fl.LOSSES:
        for red in Reduction:
            scal = scalars(loss, red.name.lower(), label_smoothing=0.1, z_loss=1e-2, softcap=4.0 if loss == "bce" else 0.0)
            for cg in (False, True):
                torch.library.opcheck(fwd, (xr, ya, yb, lam, w, *scal, cg))
            lo, stats, _ = fwd(x, ya, yb, lam, w, *scal, False)
            torch.library.opcheck(bwd, (torch.rand_like(lo) + 0.5, x, ya, yb, lam, w, stats, *scal))


@gpu
@needs_device
@pytest.mark.slow
def test_past_2_pow_31_elements_bf16_gpu():
    n, c = 65537, 32768
    free, _ = torch.cuda.mem_get_info()
    if free < 10 * 2**30:
        pytest.skip("needs 10 GiB of free device memory")
    x = torch.empty(n, c, dtype=torch.bfloat16, device="cuda").uniform_(-4, 4)
    t = torch.randint(0, c, (n,), device="cuda")
    rows = torch.tensor([0, n // 2, n - 1], device="cuda")
    out, _, grad = FWD(x, t, None, int(Variant.FOCAL), int(Reduction.NONE), -100, 0.0, 1.5, 1.0, 2.0, 0.0, 0.0, True)
    ref, ref_g = oracle_loss_and_grad(x[rows].cpu(), t[rows].cpu(), "focal", reduction="none")
    assert_close(out[rows].cpu(), ref, torch.float32, "loss")
    assert_close(grad[rows].cpu(), ref_g, torch.bfloat16, "grad")
