"""Mixup's two targets, ``target=(y_a, y_b, lam)``, for every loss: against a float64
evaluation of ``lam * L(y_a) + (1 - lam) * L(y_b)`` (each part reduced on its own), on the
reference (two passes) and the C++ CPU kernel (``fusedloss::ext_mix_fwd/bwd``, fused for every
loss, soft cap included: the tests check that it is the op that ran); bce's fused rows case by
case (the arg-max w on either target or elsewhere, a wrong class leading by 50-100, equal
targets, ignored parts, lam 0 and 1); the fused op's opcheck and gradcheck; the errors.
``check_mix_op`` serves tests/test_cuda_ext.py's CUDA tests too.

Under ``TRITON_INTERPRET=1`` the triton backend joins (tests/test_triton_suite.py runs this
file with ``-k triton``)."""
from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

import fusedloss as fl
from fusedloss import dispatch, mixup
from fusedloss.variants import Reduction, reduction_id, variant_id
from oracle import assert_close, oracle_loss

BACKENDS = [b for b in ("reference", "cpu") if b in fl.available_backends()]
if os.environ.get("TRITON_INTERPRET") == "1" and dispatch.unavailable_reason("triton", torch.device("cpu")) is None:
    BACKENDS.append("triton")
OPTIONS = {"plain": {}, "smooth_z": dict(label_smoothing=0.1, z_loss=1e-2), "cap": dict(softcap=5.0)}


def oracle_mixed(x, ya, yb, lam, loss, reduction="mean", weight=None, ignore_index=-100, **kw):
    """float64: each part's rows from the oracle, the parts' own 'mean' denominators."""
    la = oracle_loss(x, ya, loss, weight=weight, ignore_index=ignore_index, reduction="none", **kw)
    lb = oracle_loss(x, yb, loss, weight=weight, ignore_index=ignore_index, reduction="none", **kw)
    lam = torch.as_tensor(lam, dtype=torch.float64).expand(la.shape)
    ra, rb = lam * la, (1 - lam) * lb
    if reduction == "none":
        return ra + rb
    if reduction == "sum":
        return ra.sum() + rb.sum()
    w = torch.ones(x.shape[1], dtype=torch.float64) if weight is None else weight.double()

    def denom(t):
        keep = t != ignore_index
        return torch.where(keep, w[torch.where(keep, t, 0)], 0.0).sum()

    return ra.sum() / denom(ya) + rb.sum() / denom(yb)


def oracle_mixed_and_grad(x, ya, yb, lam, loss, grad_output=None, **kw):
    x64 = x.detach().double().requires_grad_(True)
    out = oracle_mixed(x64, ya, yb, lam, loss, **kw)
    go = torch.ones_like(out) if grad_output is None else grad_output.double()
    (g,) = torch.autograd.grad(out, x64, go)
    return out.detach(), g


def _data(n, c, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(n, c, generator=g)).to(dtype)
    ya = torch.randint(0, c, (n,), generator=g)
    yb = torch.randint(0, c, (n,), generator=g)
    yb[0] = ya[0]              # both images of one class
    ya[2] = -100               # part a ignored
    yb[3] = -100               # part b ignored
    ya[4] = yb[4] = -100       # the whole row ignored
    lam = torch.rand(n, generator=g)
    lam[5] = 0.0               # a part that counts 0
    w = torch.rand(c, generator=g) + 0.5
    return x, ya, yb, lam, w


@contextlib.contextmanager
def ops_called():
    """The fusedloss ops (``fusedloss::<name>``) dispatched inside the block, in order, as the
    profiler saw them; the list is filled when the block ends."""
    names: list[str] = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        yield names
    names.extend(e.name.split("::", 1)[1] for e in prof.events() if e.name.startswith("fusedloss::"))


def bce_cases(c: int, dtype: torch.dtype, seed: int = 0):
    """(x, y_a, y_b, lam) whose rows cover bce's two-target cases: the arg-max w on y_a, on
    y_b, elsewhere (leading by 2, 60 and 100: past 41 in fp32 the kernel's sum for 1 - p_w
    underflows and it takes the exact pass), y_a == y_b, either part ignored, both ignored,
    lam 0 and 1, and y_a's own logit leading by 80 (p_a rounds to 1). c >= 8."""
    g = torch.Generator().manual_seed(seed)
    n = 14
    x = 2 * torch.randn(n, c, generator=g, dtype=torch.float64)
    ya = torch.randint(0, c, (n,), generator=g)
    yb = (ya + 1 + torch.randint(0, c - 1, (n,), generator=g)) % c  # != ya
    # a class that is neither target, at varying distances from them
    other = torch.tensor([next(k % c for k in range(int(ya[i]) + 1 + i % 3, int(ya[i]) + c + 3)
                               if k % c not in (int(ya[i]), int(yb[i]))) for i in range(n)])
    lam = torch.rand(n, generator=g, dtype=torch.float64)

    def lead(i, j, by):
        x[i, j] = x[i].max() + by

    lead(0, ya[0], 3.0)               # w == y_a
    lead(1, yb[1], 3.0)               # w == y_b
    lead(2, other[2], 2.0)            # w elsewhere
    yb[3] = ya[3]                     # one class twice
    lead(3, other[3], 1.0)
    ya[4] = -100                      # part a ignored
    lead(4, other[4], 4.0)
    yb[5] = -100                      # part b ignored
    lead(5, ya[5], 2.0)
    ya[6] = yb[6] = -100              # the row ignored
    lead(7, other[7], 60.0)           # a wrong class far ahead: the exact pass for log(1 - p_w)
    lead(8, other[8], 100.0)
    lead(9, ya[9], 80.0)              # p_a = 1 in fp32; b's part pays for it
    lam[10] = 0.0                     # only part b counts
    lead(10, yb[10], 55.0)
    lam[11] = 1.0                     # only part a counts
    lead(11, other[11], 50.0)
    return x.to(dtype), ya, yb, lam


def scalars(loss, reduction, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=0.0):
    """The ops' scalar arguments (alpha 1.5, beta 1, gamma 2: the oracle's defaults)."""
    return (int(variant_id(loss)), int(reduction_id(reduction)), ignore_index, float(label_smoothing), 1.5, 1.0,
            2.0, float(z_loss), float(softcap))


def check_mix_op(x, ya, yb, lam, loss, *, weight=None, reduction="mean", grad_output=None, msg="", **opts):
    """``fusedloss::ext_mix_fwd`` (loss and fused gradient, and its loss again without the
    gradient) and ``ext_mix_bwd`` (from the forward's stats, with ``grad_output``) on x's
    device, against the float64 oracle of the same (rounded) logits."""
    scal = scalars(loss, reduction, **opts)
    fwd, bwd = torch.ops.fusedloss.ext_mix_fwd.default, torch.ops.fusedloss.ext_mix_bwd.default
    out, stats, grad = fwd(x, ya, yb, lam, weight, *scal, True)
    out2, _, empty = fwd(x, ya, yb, lam, weight, *scal, False)
    assert empty.shape == (0,)
    torch.testing.assert_close(out2, out, rtol=0, atol=0, equal_nan=True)
    go = torch.ones_like(out) if grad_output is None else grad_output
    g_bwd = bwd(go, x, ya, yb, lam, weight, stats, *scal)
    okw = dict(weight=None if weight is None else weight.cpu(), reduction=reduction, **opts)
    xc, ya_c, yb_c, lam_c = x.cpu(), ya.cpu(), yb.cpu(), lam.cpu().double()
    ref, ref_g = oracle_mixed_and_grad(xc, ya_c, yb_c, lam_c, loss, **okw)
    assert_close(out.cpu(), ref, x.dtype, "loss", msg)
    assert_close(grad.cpu(), ref_g, x.dtype, "grad", msg + " (fused)")
    _, ref_g = oracle_mixed_and_grad(xc, ya_c, yb_c, lam_c, loss, grad_output=go.cpu(), **okw)
    assert_close(g_bwd.cpu(), ref_g, x.dtype, "grad", msg + " (backward op)")
    return out, grad, g_bwd


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("loss", fl.LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_matches_float64(backend, option, loss, dtype):
    opts = OPTIONS[option]
    x, ya, yb, lam, w = _data(10, 23, dtype, seed=1)
    if dtype == torch.float64:
        w = w.double()
    for reduction in ("none", "mean", "sum"):
        for lam_arg in (lam, 0.3):
            xr = x.clone().requires_grad_(True)
            with ops_called() as ops:
                out = fl.softmax_loss(xr, (ya, yb, lam_arg), loss, weight=w, reduction=reduction,
                                      backend=backend, **opts)
                go = (torch.linspace(0.5, 2.0, 10, dtype=out.dtype) if reduction == "none"
                      else torch.tensor(1.3, dtype=out.dtype))
                out.backward(go)
            if backend == "cpu":  # every loss and option fused: one op, the gradient from the forward
                assert ops == ["ext_mix_fwd"], ops
            ref, ref_g = oracle_mixed_and_grad(x, ya, yb, lam_arg, loss, grad_output=go, weight=w,
                                               reduction=reduction, **opts)
            msg = f"{reduction} lam={'rows' if isinstance(lam_arg, torch.Tensor) else lam_arg}"
            assert_close(out, ref, dtype, "loss", msg)
            assert_close(xr.grad, ref_g, dtype, "grad", msg)


@pytest.mark.parametrize("loss", fl.LOSSES)
def test_cpu_fused_op_equals_two_passes(loss):
    """The fused kernel and the two-pass path agree (and the fused op is the one the cpu
    backend runs for these losses)."""
    if "cpu" not in BACKENDS:
        pytest.skip("C++ extension not built")
    be = dispatch.resolve("cpu", torch.device("cpu"))
    assert be.family(mixup.TwoTargetOps) is not None
    two_pass = be.without(mixup.TwoTargetOps)
    x, ya, yb, lam, w = _data(12, 4099, torch.float32, seed=2, scale=6.0)  # rows over one 8 KiB block
    for red in Reduction:
        scal = (int(variant_id(loss)), int(red), -100, 0.05, 1.5, 1.0, 2.0, 1e-3, 0.0)
        fused = mixup.mixed_loss(be, x, ya, yb, lam, w, scal, False)
        ref = mixup.mixed_loss(two_pass, x, ya, yb, lam, w, scal, False)
        assert_close(fused, ref, torch.float32, "loss", red.name)
        lo, stats, grad = torch.ops.fusedloss.ext_mix_fwd(x, ya, yb, lam, w, *scal, True)
        torch.testing.assert_close(lo, fused, rtol=0, atol=0)
        go = torch.ones_like(lo)
        g_bwd = torch.ops.fusedloss.ext_mix_bwd(go, x, ya, yb, lam, w, stats, *scal)
        _, ref_g = oracle_mixed_and_grad(x, ya, yb, lam, loss, weight=w, reduction=red.name.lower(),
                                         label_smoothing=0.05, z_loss=1e-3)
        assert_close(grad, ref_g, torch.float32, "grad", f"{red.name} fused")
        assert_close(g_bwd, ref_g, torch.float32, "grad", f"{red.name} backward op")


needs_cpu_ext = pytest.mark.skipif("cpu" not in BACKENDS, reason="C++ extension not built")
BCE_OPTIONS = {"plain": {}, "weight": {}, "smooth_z": dict(label_smoothing=0.1, z_loss=1e-2),
               "cap": dict(softcap=30.0)}


@needs_cpu_ext
@pytest.mark.parametrize("option", BCE_OPTIONS)
@pytest.mark.parametrize("c", [11, 4099])  # a short row, and one over an 8 KiB block
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_bce_fused_rows_against_float64(dtype, c, option):
    """bce's fused two-target op, row by row (bce_cases), every reduction, lam per row (0 and
    1 included) and scalar 0, 1 and 0.3; the loss and the fused gradient, and the backward op
    with grad_output (expanded from a scalar for 'none'); and the public call runs that op."""
    x, ya, yb, lam = bce_cases(c, dtype, seed=c)
    opts = BCE_OPTIONS[option]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weight = (torch.rand(c, generator=torch.Generator().manual_seed(1), dtype=acc) + 0.5
              if option == "weight" else None)
    n = x.shape[0]
    for reduction in ("none", "mean", "sum"):
        go = torch.tensor(0.7, dtype=acc).expand(n) if reduction == "none" else torch.tensor(1.3, dtype=acc)
        for lam_rows in (lam, torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64),
                         torch.full((n,), 0.3, dtype=torch.float64)):
            msg = f"{reduction} lam {lam_rows[:2].tolist()}"
            check_mix_op(x, ya, yb, lam_rows.to(acc), "bce", weight=weight, reduction=reduction, grad_output=go,
                         msg=msg, **opts)
        xr = x.clone().requires_grad_(True)
        with ops_called() as ops:
            out = fl.softmax_loss(xr, (ya, yb, lam), "bce", weight=weight, reduction=reduction, backend="cpu",
                                  **opts)
            out.backward(go.to(out.dtype))
        assert ops == ["ext_mix_fwd"], ops
        ref, ref_g = oracle_mixed_and_grad(x, ya, yb, lam, "bce", grad_output=go, weight=weight,
                                           reduction=reduction, **opts)
        assert torch.isfinite(xr.grad).all()
        assert_close(out, ref, dtype, "loss", f"public {reduction}")
        assert_close(xr.grad, ref_g, dtype, "grad", f"public {reduction}")


@needs_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("lead", [50.0, 75.0, 100.0])
def test_bce_wrong_class_leading(dtype, lead):
    """A wrong class w leads by 50-100 (a_w = p_w / (1 - p_w) ~ e^lead: the gradient needs the
    stable form, and 1 - p_w the exact pass), with w neither target, and w on one target."""
    c = 3000
    g = torch.Generator().manual_seed(int(lead))
    x = torch.randn(8, c, generator=g, dtype=torch.float64)
    ya = torch.randint(0, c, (8,), generator=g)
    yb = (ya + 7) % c
    w = (ya + 3) % c
    w[6], w[7] = ya[6], yb[7]
    x[torch.arange(8), w] = x.max(1).values + lead
    lam = torch.rand(8, generator=g, dtype=torch.float64)
    for reduction in ("none", "mean"):
        _, grad, g_bwd = check_mix_op(x.to(dtype), ya, yb, lam.to(dtype), "bce", reduction=reduction,
                                      msg=f"lead {lead} {reduction}")
        assert torch.isfinite(grad).all() and torch.isfinite(g_bwd).all()
        # shift invariance: every row of the gradient sums to 0
        torch.testing.assert_close(grad.double().sum(1), torch.zeros(8, dtype=torch.float64),
                                   atol=1e-4 * grad.abs().max().item(), rtol=0)


@needs_cpu_ext
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_cpu_mix_strided_inputs_read_in_place(loss):
    """Logits rows of a wider tensor, strided targets and lam: the same bits as contiguous
    copies, and the float64 values."""
    c = 37
    x, ya, yb, lam = bce_cases(c, torch.float32, seed=3)
    n = x.shape[0]
    wide = torch.randn(n, c + 9)
    wide[:, 4:4 + c] = x
    view = wide[:, 4:4 + c]
    assert not view.is_contiguous()
    ya_s = torch.stack([ya, ya.flip(0)], 1)[:, 0]
    yb_s = torch.stack([yb, yb.flip(0)], 1)[:, 0]
    lam_s = torch.stack([lam.float(), lam.float()], 1)[:, 1]
    assert ya_s.stride(0) == 2 and lam_s.stride(0) == 2
    for reduction in ("none", "mean", "sum"):
        got = check_mix_op(view, ya_s, yb_s, lam_s, loss, reduction=reduction, msg=f"strided {reduction}",
                           label_smoothing=0.05)
        want = check_mix_op(view.contiguous(), ya, yb, lam.float(), loss, reduction=reduction,
                            label_smoothing=0.05)
        for u, v in zip(got, want):
            torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True)


@needs_cpu_ext
def test_cpu_mix_empty_part_mean_is_nan():
    """'mean' with a part that counts no row is 0/0 = NaN, as the two-pass form (and that part's
    'mean' alone) gives; the gradient is the other part's."""
    x = torch.randn(3, 5, dtype=torch.float64)
    ya, yb = torch.full((3,), -100), torch.tensor([1, 2, 3])
    for loss in fl.LOSSES:
        for backend in BACKENDS:
            assert math.isnan(fl.softmax_loss(x, (ya, yb, 0.3), loss, backend=backend).item()), (loss, backend)
        out, stats, grad = torch.ops.fusedloss.ext_mix_fwd(x, ya, yb, torch.full((3,), 0.3, dtype=torch.float64),
                                                            None, *scalars(loss, "mean"), True)
        _, ref_g = oracle_mixed_and_grad(x, yb, yb, 0.0, loss)  # part b alone, lam 0.3 folded below
        torch.testing.assert_close(grad, 0.7 * ref_g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_extreme_logits(backend, loss):
    """Either target leading by 200 (p = 1 in fp32: nllr's s overflows), or trailing."""
    x = torch.tensor([[200.0, 0.0, -3.0, 1.0], [0.0, 200.0, 1.0, 2.0], [-200.0, 0.0, 200.0, 1.0]])
    ya, yb = torch.tensor([0, 0, 0]), torch.tensor([1, 1, 2])
    lam = torch.tensor([0.3, 0.9, 0.5])
    xr = x.clone().requires_grad_(True)
    out = fl.softmax_loss(xr, (ya, yb, lam), loss, reduction="none", backend=backend, label_smoothing=0.1)
    out.sum().backward()
    ref, ref_g = oracle_mixed_and_grad(x, ya, yb, lam, loss, reduction="none", label_smoothing=0.1)
    assert torch.isfinite(xr.grad).all()
    assert_close(out, ref, torch.float32, "loss")
    assert_close(xr.grad, ref_g, torch.float32, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_part_counting_zero_on_a_masked_target(backend, loss):
    """A part with lam (or 1 - lam) = 0 whose target is masked (-inf): that part's loss is inf
    and its s may be NaN (focal's at p = 0); it must add nothing, so the row is the other part's
    single-target loss and gradient."""
    x = torch.tensor([[-math.inf, 0.5, -1.0, 2.0], [1.0, -math.inf, 0.0, -2.0], [0.0, 1.0, -math.inf, 3.0]])
    ya, yb = torch.tensor([0, 2, 3]), torch.tensor([3, 1, 2])
    lam = torch.tensor([0.0, 1.0, 1.0])
    xr = x.clone().requires_grad_(True)
    out = fl.softmax_loss(xr, (ya, yb, lam), loss, reduction="none", backend=backend)
    out.sum().backward()
    one = torch.where(lam == 0, yb, ya)  # the part that counts
    ref, ref_g = oracle_mixed_and_grad(x, one, one, 1.0, loss, reduction="none")
    assert torch.isfinite(xr.grad).all(), xr.grad
    assert_close(out, ref, torch.float32, "loss")
    assert_close(xr.grad, ref_g, torch.float32, "grad")


def test_cpu_mix_ops_opcheck_and_gradcheck():
    if "cpu" not in BACKENDS:
        pytest.skip("C++ extension not built")
    x, ya, yb, lam, w = _data(8, 6, torch.float64, seed=3)
    lam, w = lam.double(), w.double()
    fwd, bwd = torch.ops.fusedloss.ext_mix_fwd.default, torch.ops.fusedloss.ext_mix_bwd.default
    for loss, cap in (("ce", 0.0), ("crl", 0.0), ("bce", 0.0), ("bce", 4.0)):
        for red in Reduction:
            scal = (int(variant_id(loss)), int(red), -100, 0.1, 1.5, 1.0, 2.0, 1e-2, cap)
            for cg in (False, True):
                torch.library.opcheck(fwd, (x.clone().requires_grad_(True), ya, yb, lam, w, *scal, cg))
            lo, stats, _ = fwd(x, ya, yb, lam, w, *scal, False)
            torch.library.opcheck(bwd, (torch.rand_like(lo) + 0.5, x, ya, yb, lam, w, stats, *scal))
        xr = x.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda v: fl.softmax_loss(v, (ya, yb, lam), loss, weight=w, reduction="none", backend="cpu",
                                      label_smoothing=0.1, softcap=cap or None).square().sum(), (xr,))


def test_compile_fullgraph():
    x, ya, yb, lam, _ = _data(6, 9, torch.float32, seed=4)
    backend = BACKENDS[-1] if BACKENDS[-1] != "triton" else "cpu"
    fn = torch.compile(lambda v: fl.softmax_loss(v, (ya, yb, lam), "crl", backend=backend), fullgraph=True,
                       backend="aot_eager")
    xr = x.clone().requires_grad_(True)
    out = fn(xr)
    out.backward()
    ref, ref_g = oracle_mixed_and_grad(x, ya, yb, lam, "crl")
    assert_close(out, ref, torch.float32, "loss")
    assert_close(xr.grad, ref_g, torch.float32, "grad")


def test_extra_dims_and_scalar_tensor_lam():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 4, generator=g)
    ya, yb = torch.randint(0, 7, (3, 4), generator=g), torch.randint(0, 7, (3, 4), generator=g)
    out = fl.softmax_loss(x, (ya, yb, torch.tensor(0.25)), "focal", reduction="none")
    x2 = x.movedim(1, -1).reshape(-1, 7)
    ref = oracle_mixed(x2.double(), ya.reshape(-1), yb.reshape(-1), 0.25, "focal", reduction="none")
    assert out.shape == (3, 4)
    assert_close(out.reshape(-1), ref, torch.float32, "loss")


@pytest.mark.parametrize("target,exc,words", [
    (lambda ya, yb: (ya, yb), ValueError, "(y_a, y_b, lam)"),
    (lambda ya, yb: (ya, yb, 1.5), ValueError, "lam"),
    (lambda ya, yb: (ya, yb, math.nan), ValueError, "lam"),
    (lambda ya, yb: (ya, yb, torch.ones(2)), ValueError, "lam"),
    (lambda ya, yb: (ya, yb, torch.ones(5, dtype=torch.long)), TypeError, "lam"),
    (lambda ya, yb: (ya.float(), yb, 0.5), TypeError, "y_a"),
    (lambda ya, yb: (ya, yb[:3], 0.5), ValueError, "target"),
    (lambda ya, yb: (ya, yb, "half"), TypeError, "lam"),
])
def test_bad_mixed_targets_raise(target, exc, words):
    x = torch.randn(5, 4)
    ya, yb = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([1, 1, 0, 2, 3])
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        fl.softmax_loss(x, target(ya, yb), "crl")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight,exc,words", [
    (torch.ones(7), ValueError, "weight must have shape"),             # too long: the one-target check's error
    (torch.ones(3), ValueError, "weight must have shape"),             # too short: a kernel would read past it
    (torch.ones(1, 4), ValueError, "weight must have shape"),
    (torch.tensor([1, 2, 3, 4]), TypeError, "weight must be a floating"),
    (torch.ones(4, device="meta"), ValueError, "weight is on meta"),
])
def test_bad_weight_raises_with_mixed_targets(backend, weight, exc, words):
    x = torch.randn(5, 4)
    ya, yb = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([1, 1, 0, 2, 3])
    with pytest.raises(exc, match=words):
        fl.softmax_loss(x, (ya, yb, 0.5), "ce", weight=weight, backend=backend)


def test_cpu_scalar_lam_with_logits_elsewhere():
    """A 0-d CPU lam beside logits on another device is read as a float (PyTorch's CPU-scalar
    rule), range-checked like one; any other lam must be on the logits' device."""
    x = torch.randn(3, 4, device="meta")
    ya, yb = torch.zeros(3, dtype=torch.long, device="meta"), torch.ones(3, dtype=torch.long, device="meta")
    lam = mixup.check_mixed_target(x, (ya, yb, torch.tensor(0.25)))[2]
    assert isinstance(lam, float) and lam == 0.25
    with pytest.raises(ValueError, match="lam must be in"):
        mixup.check_mixed_target(x, (ya, yb, torch.tensor(1.5)))
    with pytest.raises(ValueError, match="lam is on cpu"):
        mixup.check_mixed_target(x, (ya, yb, torch.full((3,), 0.5)))


def test_bad_target_values_raise_on_cpu():
    x = torch.randn(3, 4)
    with pytest.raises(IndexError):
        fl.softmax_loss(x, (torch.tensor([0, 1, 2]), torch.tensor([0, 9, 2]), 0.5), "ce")
