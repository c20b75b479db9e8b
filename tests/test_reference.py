"""The reference backend against the float64 oracle: every variant, dtype and option,
on ordinary and extreme logits, plus the identities and properties of docs/losses.md."""
from __future__ import annotations

import math

import pytest
import torch

import fusedloss as fl
from fusedloss.reference import extreme_logits
from oracle import assert_close, oracle_loss_and_grad

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
HALF = (torch.float16, torch.bfloat16)


def _logits(kind: str, n: int, c: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "extreme":
        x, t = extreme_logits(n, c, dtype=torch.float32, generator=g)
        if dtype == torch.float16:
            # float16 tops out at 65504 and its -inf is fine, but a lead of 1000 on top of
            # randn stays representable; keep the rows as they are.
            pass
        return x.to(dtype), t
    x = (3 * torch.randn(n, c, generator=g)).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    return x, t


def _run(x, t, loss, reduction="none", grad_output=None, **kw):
    x = x.detach().clone().requires_grad_(True)
    out = fl.softmax_loss(x, t, loss, reduction=reduction, backend="reference", **kw)
    go = torch.ones_like(out) if grad_output is None else grad_output.to(out.dtype)
    out.backward(go)
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "extreme"])
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_loss_and_grad_match_float64(loss, kind, dtype):
    x, t = _logits(kind, 21, 37, dtype)
    go = torch.rand(21, generator=torch.Generator().manual_seed(1)) + 0.5
    out, g = _run(x, t, loss, grad_output=go)
    ref, ref_g = oracle_loss_and_grad(x, t, loss, reduction="none", grad_output=go)
    assert out.dtype == dtype and g.dtype == dtype
    assert_close(out, ref, dtype, "loss", f"{loss} {kind} loss")
    assert_close(g, ref_g, dtype, "grad", f"{loss} {kind} grad")


@pytest.mark.parametrize("loss", fl.LOSSES)
@pytest.mark.parametrize("lead", [20.0, 100.0, 1000.0])
def test_extreme_leads_are_finite_and_exact_fp32(loss, lead):
    c = 64
    x = torch.randn(8, c, generator=torch.Generator().manual_seed(3))
    t = torch.arange(8) * 5
    x[torch.arange(8), t] = x.max(1).values + lead
    out, g = _run(x, t, loss)
    ref, ref_g = oracle_loss_and_grad(x, t, loss, reduction="none")
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    assert_close(out, ref, torch.float32, "loss", loss)
    assert_close(g, ref_g, torch.float32, "grad", loss)


@pytest.mark.parametrize("loss", ["ce", "nllr", "crl", "lace", "focal"])
def test_target_class_gradient_keeps_relative_accuracy_in_bf16(loss):
    """p_c near 1 in bf16: g_c = -s (1 - p_c) is tiny; it must be right relative to its own
    size, not lost by forming p_c - 1 in a bf16 buffer (Liger-Kernel PR #1329)."""
    c = 1000
    x = torch.randn(16, c, generator=torch.Generator().manual_seed(4))
    t = torch.randint(0, c, (16,), generator=torch.Generator().manual_seed(5))
    x[torch.arange(16), t] += torch.linspace(8.0, 20.0, 16)
    xb = x.bfloat16()
    _, g = _run(xb, t, loss)
    _, ref_g = oracle_loss_and_grad(xb, t, loss, reduction="none")
    gc, ref_gc = g[torch.arange(16), t].double(), ref_g[torch.arange(16), t]
    assert (ref_gc != 0).all()
    rel = ((gc - ref_gc).abs() / ref_gc.abs()).max().item()
    assert rel < 1e-2, f"target-class gradient relative error {rel}"


def test_wrong_class_leading_by_50_bce_gradient_does_not_cancel():
    """a_w = p_w / (1 - p_w) ~ e^50: forming T = sum a_i cancels the gradient to 0 where it is ~2."""
    c = 10
    x = torch.zeros(4, c)
    t = torch.tensor([0, 1, 2, 3])
    x[torch.arange(4), (t + 1) % c] = torch.tensor([50.0, 89.0, 95.0, 30.0])
    _, g = _run(x, t, "bce")
    _, ref_g = oracle_loss_and_grad(x, t, "bce", reduction="none")
    assert torch.isfinite(g).all()
    assert_close(g, ref_g, torch.float32, "grad", "bce wrong class leads")


@pytest.mark.parametrize("loss", fl.LOSSES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_weight_ignore_index_reduction(loss, reduction):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(30, 7, generator=g, dtype=torch.float64)
    t = torch.randint(0, 7, (30,), generator=g)
    t[::4] = -1
    w = torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    kw = dict(weight=w, ignore_index=-1)
    go = torch.rand(30, generator=g, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    out, gx = _run(x, t, loss, reduction=reduction, grad_output=go, **kw)
    ref, ref_g = oracle_loss_and_grad(x, t, loss, reduction=reduction, grad_output=go, **kw)
    assert_close(out, ref, torch.float64, "loss", loss)
    assert_close(gx, ref_g, torch.float64, "grad", loss)
    assert (gx[::4] == 0).all() and (out[::4] == 0).all() if reduction == "none" else True


def test_ignored_row_pointing_at_minus_inf_gives_zero_not_nan():
    x = torch.randn(3, 5)
    x[:, 0] = -math.inf  # class 0 masked; ignored rows clamp their index to 0
    t = torch.tensor([-100, 2, -100])
    for loss in fl.LOSSES:
        out, g = _run(x, t, loss)
        assert out[0] == 0 and out[2] == 0 and torch.isfinite(out[1])
        assert (g[0] == 0).all() and (g[2] == 0).all()


IGNORED_ROW_OPTIONS = [{}, {"z_loss": 1e-2}, {"label_smoothing": 0.1}, {"label_smoothing": 1.0, "z_loss": 1e-2},
                       {"softcap": 4.0}]


@pytest.mark.parametrize("loss", fl.LOSSES)
@pytest.mark.parametrize("opts", IGNORED_ROW_OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_fully_masked_ignored_row_gives_zero_gradient(loss, opts):
    """An ignored row whose every logit is -inf (a padding row masked out): loss 0 and gradient 0,
    as the C++ kernel gives (it never reads an ignored row); the reference's lse is -inf there
    and its terms, only multiplied by the row's 0 scale, were NaN."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 6, generator=g) * 3
    x[1] = -math.inf
    t = torch.tensor([2, -100, 5, 0])
    w = torch.rand(6, generator=g) + 0.25
    go = torch.rand(4, generator=g) + 0.5
    out, gx = _run(x, t, loss, grad_output=go, weight=w, **opts)
    assert out[1] == 0 and (gx[1] == 0).all(), gx[1]
    kept = torch.tensor([0, 2, 3])
    ref, ref_g = oracle_loss_and_grad(x[kept], t[kept], loss, reduction="none", grad_output=go[kept], weight=w,
                                      **opts)
    assert_close(out[kept], ref, torch.float32, "loss", loss)
    assert_close(gx[kept], ref_g, torch.float32, "grad", loss)


@pytest.mark.parametrize("loss", fl.LOSSES)
@pytest.mark.parametrize("opts", IGNORED_ROW_OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_backward_op_never_reads_an_ignored_rows_stats(loss, opts):
    """``reference_bwd`` given stats of 0 on the ignored rows (what the C++ forward writes there,
    and what fusedloss.parallel passes as their neutral numbers), on ignored rows whose logits lead
    by 100 at the clamped index 0 and elsewhere: gradient 0 there (the kernels' contract, an
    ignored row's stats are never read), the float64 gradient on the other rows. The reference
    formed exp(x_j - lse + log s) with lse = 0: inf in float32, times the row's 0 scale, NaN."""
    from fusedloss import ops
    from fusedloss.variants import Reduction, variant_id

    g = torch.Generator().manual_seed(12)
    n, c, ii = 6, 7, 3
    x = torch.randn(n, c, generator=g) * 3
    t = torch.tensor([1, ii, 6, ii, 0, ii])
    x[1, 0] = x[1].max() + 100.0   # at the index an ignored row clamps its target to
    x[3, 5] = x[3].max() + 100.0   # elsewhere
    x[5, 2] = x[5].max() + 40.0
    w = torch.rand(c, generator=g) + 0.25
    go = torch.rand(n, generator=g) + 0.5
    scalars = (variant_id(loss), int(Reduction.NONE), ii, opts.get("label_smoothing", 0.0), 1.5, 1.0, 2.0,
               opts.get("z_loss", 0.0), opts.get("softcap", 0.0))
    _, stats, _ = ops.reference_fwd(x, t, w, *scalars, False)
    ignored = t == ii
    stats = torch.where(ignored[:, None], torch.zeros_like(stats), stats)
    gx = ops.reference_bwd(go, x, t, w, stats, *scalars)
    assert (gx[ignored] == 0).all(), gx[ignored]
    _, ref_g = oracle_loss_and_grad(x, t, loss, reduction="none", grad_output=go, weight=w, ignore_index=ii,
                                    **opts)
    assert_close(gx[~ignored], ref_g[~ignored], torch.float32, "grad", loss)


def test_out_of_range_target_still_gives_nan_gradient_on_the_reference():
    """Zeroing ignored rows by select leaves a bad target's NaN (no host check) in place."""
    from fusedloss import ops, reference
    from fusedloss.variants import Reduction, Variant

    x = torch.randn(3, 4)
    t = torch.tensor([1, 9, -100])
    scalars = (int(Variant.CE), int(Reduction.NONE), -100, 0.0, 1.5, 1.0, 2.0, 0.0, 0.0)
    _, stats, _ = ops.reference_fwd(x, torch.tensor([1, 0, -100]), None, *scalars, False)
    gx = reference.backward(torch.ones(3), x, t, None, stats, *scalars)
    assert gx[1].isnan().all() and (gx[2] == 0).all() and torch.isfinite(gx[0]).all()


@pytest.mark.parametrize("c", [1, 2, 3])
def test_tiny_class_counts(c):
    x = torch.randn(6, c, dtype=torch.float64)
    t = torch.randint(0, c, (6,))
    for loss in fl.LOSSES:
        out, gx = _run(x, t, loss)
        ref = oracle_loss_and_grad(x, t, loss, reduction="none")[0]
        assert_close(out, ref, torch.float64, "loss", f"{loss} C={c}")
        if c > 1:
            ref_g = oracle_loss_and_grad(x, t, loss, reduction="none")[1]
            assert_close(gx, ref_g, torch.float64, "grad", f"{loss} C={c}")
        elif loss == "nllr":
            # C = 1: NLLR is the constant log(0) - log(1) = -inf; its gradient 0 * inf is undefined.
            assert (out == -math.inf).all() and torch.isnan(gx).all()
        else:
            assert (gx == 0).all()


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in fl.available_backends()])
@pytest.mark.parametrize("loss,kw", [("focal", dict(gamma=0.0)), ("focal", dict(gamma=0.5)), ("lace", {}),
                                     ("crl", dict(alpha=0.0, beta=0.0))])
def test_single_class_bounded_losses_have_zero_gradient(backend, loss, kw):
    """C = 1 (p_c = 1, q = 0 exactly): these losses are the constant 0, so is their gradient.
    focal(gamma=0) and crl(beta=0) are ce there too. (Found by the layout property test:
    the second term of focal's s and crl's log s were (-inf) + inf = NaN.)"""
    x = torch.randn(4, 1, requires_grad=True)
    out = fl.softmax_loss(x, torch.zeros(4, dtype=torch.long), loss, reduction="none", backend=backend, **kw)
    out.sum().backward()
    assert (out == 0).all() and (x.grad == 0).all(), (out, x.grad)


# ---------------------------------------------------------------------------
# Identities and properties (docs/losses.md)
# ---------------------------------------------------------------------------

IDENTITIES = [
    (("crl", dict(beta=0.0)), ("ce", {})),
    (("crl", dict(alpha=0.0, beta=1.0)), ("nllr", {})),
    (("focal", dict(gamma=0.0)), ("ce", {})),
    (("focal", dict(gamma=1.0)), ("lace", {})),
]


@pytest.mark.parametrize("kind", ["random", "extreme"])
@pytest.mark.parametrize("lhs,rhs", IDENTITIES, ids=lambda p: f"{p[0]}{p[1]}")
def test_identities(lhs, rhs, kind):
    x, t = _logits(kind, 28, 11, torch.float64)
    a, ga = _run(x, t, lhs[0], **lhs[1])
    b, gb = _run(x, t, rhs[0], **rhs[1])
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", fl.LOSSES)
def test_shift_invariance_and_gradient_rows_sum_to_zero(loss):
    x, t = _logits("random", 16, 50, torch.float32)
    a, ga = _run(x, t, loss)
    b, gb = _run(x + 100.0, t, loss)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-6)
    assert ga.double().sum(1).abs().max() < 1e-6


def test_uniform_logits_give_closed_form_values():
    c = 1000
    x = torch.full((4, c), 0.5)
    t = torch.tensor([0, 5, 99, 999])
    expect = {
        "ce": math.log(c),
        "nllr": math.log(c - 1),
        "crl": math.log(1.5 + 1 - 1 / c) + math.log(c),
        "lace": (1 - 1 / c) * math.log(c),
        "focal": (1 - 1 / c) ** 2 * math.log(c),
        "bce": math.log(c) - (c - 1) * math.log1p(-1 / c),
    }
    for loss, value in expect.items():
        out, _ = _run(x, t, loss)
        torch.testing.assert_close(out, torch.full((4,), value), rtol=1e-5, atol=1e-5)


def test_nllr_is_unbounded_below_and_crl_positive_for_alpha_ge_1():
    x = torch.zeros(1, 10)
    x[0, 3] = 30.0
    t = torch.tensor([3])
    assert _run(x, t, "nllr")[0].item() < -25
    assert _run(x, t, "crl", alpha=1.0)[0].item() > 0


def test_all_but_target_masked_rows():
    """Every competitor at -inf: p_c = 1 exactly, log(1 - p_c) = -inf."""
    x = torch.full((2, 6), -math.inf)
    x[:, 2] = 1.0
    t = torch.tensor([2, 2])
    assert (_run(x, t, "ce")[0] == 0).all()
    assert (_run(x, t, "nllr")[0] == -math.inf).all()
    assert torch.isfinite(_run(x, t, "crl")[0]).all()


def test_strided_rows_and_extra_dims():
    x = torch.randn(10, 20, dtype=torch.float64)[:, ::2]  # class stride 2
    t = torch.randint(0, 10, (10,))
    for loss in fl.LOSSES:
        out, g = _run(x, t, loss)
        ref, ref_g = oracle_loss_and_grad(x, t, loss, reduction="none")
        assert_close(out, ref, torch.float64, "loss", loss)
        assert_close(g, ref_g, torch.float64, "grad", loss)
    x4 = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    t4 = torch.randint(0, 5, (2, 3, 4))
    out = fl.softmax_loss(x4, t4, "crl", reduction="none", backend="reference")
    rows = x4.movedim(1, -1).reshape(-1, 5)
    ref = oracle_loss_and_grad(rows, t4.reshape(-1), "crl", reduction="none")[0].reshape(2, 3, 4)
    torch.testing.assert_close(out, ref)


def test_one_dimensional_logits_like_pytorch():
    x = torch.randn(7, dtype=torch.float64)
    t = torch.tensor(3)
    torch.testing.assert_close(fl.cross_entropy(x, t), torch.nn.functional.cross_entropy(x, t))
