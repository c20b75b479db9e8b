"""The Triton kernels on a CUDA GPU: real shapes, C up to 262144, N x C past 2^31,
torch.compile(fullgraph=True) through the triton_op, memory of inplace_backward.

    python -m pytest -m gpu tests/test_triton_gpu.py

Skipped without CUDA (and under TRITON_INTERPRET=1, which makes every kernel
interpreted). Nothing here touches the GPU at import time. The float64 oracle runs on
CPU copies (it is written for CPU tensors).
"""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    # a string condition: evaluated when a test runs, not at import (no GPU query on import)
    pytest.mark.skipif("not torch.cuda.is_available()", reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1 interprets every kernel"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

triton = pytest.importorskip("triton")

import fusedloss as fl  # noqa: E402
from fusedloss.reference import extreme_logits  # noqa: E402
from oracle import assert_close, oracle_loss_and_grad  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: (N, C): ImageNet, a 32k vocabulary, Llama-3's 128256, 262144.
SHAPES = ((512, 1000), (256, 32000), (32, 128256), (8, 262144))


def _data(n, c, dtype, seed=0, weighted=False):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(n, c, generator=g)).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    t[::7] = -100
    w = (0.5 + torch.rand(c, generator=g)) if weighted else None
    return x, t, w


def _gpu_loss_grad(loss, x, t, go=None, **kw):
    xd = x.cuda().requires_grad_(True)
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out = fl.softmax_loss(xd, t.cuda(), loss, backend="triton", **kw)
    out.backward(torch.ones_like(out) if go is None else go.cuda().to(out.dtype))
    return out.detach().cpu(), xd.grad.cpu()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_real_shapes_match_float64(loss, dtype, shape):
    n, c = shape
    x, t, w = _data(n, c, dtype, weighted=True)
    go = torch.tensor(0.8)
    out, grad = _gpu_loss_grad(loss, x, t, go, weight=w)
    ref, gref = oracle_loss_and_grad(x, t, loss, grad_output=go.double(), weight=w)
    assert_close(out, ref, dtype, "loss", f"{loss} {dtype} {shape}")
    assert_close(grad, gref, dtype, "grad", f"{loss} {dtype} {shape}")


@pytest.mark.parametrize("c", (1000, 32000), ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_extreme_logits(loss, dtype, c):
    g = torch.Generator().manual_seed(1)
    x, t = extreme_logits(70, c, dtype=dtype, generator=g)
    out, grad = _gpu_loss_grad(loss, x, t, reduction="none")
    ref, gref = oracle_loss_and_grad(x, t, loss, reduction="none")
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert_close(out, ref, dtype, "loss")
    assert_close(grad, gref, dtype, "grad")


def test_label_smoothing_with_weights_against_pytorch():
    x, t, w = _data(256, 32000, torch.float32, seed=2, weighted=True)
    xd = x.cuda().requires_grad_(True)
    out = fl.softmax_loss(xd, t.cuda(), "ce", backend="triton", weight=w.cuda(), label_smoothing=0.1)
    out.backward()
    xr = x.cuda().double().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(xr, t.cuda(), weight=w.cuda().double(), label_smoothing=0.1)
    ref.backward()
    assert_close(out.cpu(), ref.detach().cpu(), torch.float32, "loss")
    assert_close(xd.grad.cpu(), xr.grad.cpu(), torch.float32, "grad")


def test_bf16_target_gradient_rounded_once():
    """On a GPU the float32 -> bf16 conversion rounds to nearest: g_c within half an ulp."""
    x, t, _ = _data(64, 32000, torch.float32, seed=3)
    t[:] = torch.randint(0, 32000, (64,))
    rows = torch.arange(64)
    x[rows, t] = x.max(1).values + torch.linspace(5, 25, 64)
    x = x.to(torch.bfloat16)
    for loss in ("ce", "focal", "crl", "lace"):
        _, grad = _gpu_loss_grad(loss, x, t, reduction="sum")
        _, gref = oracle_loss_and_grad(x, t, loss, reduction="sum")
        rel = ((grad[rows, t].double() - gref[rows, t]) / gref[rows, t]).abs()
        assert rel.max() <= 2 ** -8 * 1.01, (loss, rel.max())


def test_rows_past_2_31_elements():
    """N x C > 2^31 (64-bit offsets): the rows at the end of the buffer are exact."""
    c = 262144
    n = (1 << 31) // c + 2
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * c * 2 + (1 << 30):
        pytest.skip("needs ~14 GB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(n, c, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    t = torch.randint(0, c, (n,), device="cuda", generator=g)
    out = fl.softmax_loss(x, t, "focal", backend="triton", reduction="none")
    out.sum().backward()
    tail = slice(n - 3, n)
    ref, gref = oracle_loss_and_grad(x.detach()[tail].cpu(), t[tail].cpu(), "focal", reduction="none")
    assert_close(out.detach()[tail].cpu(), ref, torch.bfloat16, "loss")
    assert_close(x.grad[tail].cpu(), gref, torch.bfloat16, "grad")


@pytest.mark.parametrize("loss", fl.LOSSES)
def test_torch_compile_fullgraph(loss):
    x, t, w = _data(256, 32000, torch.bfloat16, seed=5, weighted=True)
    x, t, w = x.cuda(), t.cuda(), w.cuda()

    def step(logits, target):
        return fl.softmax_loss(logits, target, loss, backend="triton", weight=w)

    compiled = torch.compile(step, fullgraph=True)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    a = compiled(xa, t)
    a.backward()
    b = step(xb, t)
    b.backward()
    assert_close(a.float().cpu(), b.double().cpu(), torch.bfloat16, "loss")
    assert_close(xa.grad.cpu(), xb.grad.double().cpu(), torch.bfloat16, "grad")


def test_opcheck():
    from fusedloss.triton_kernels.one_target import launch
    x, t, w = _data(64, 1000, torch.float32, seed=6, weighted=True)
    args = (x.cuda(), t.cuda(), w.cuda(), 3, 1, -100, 0.0, 1.5, 1.0, 2.0, 0.0, 0.0, False)
    torch.library.opcheck(launch.triton_fwd, args, test_utils=("test_schema", "test_faketensor"))


def test_bad_target_is_a_nan_row_without_strict_mode(monkeypatch):
    monkeypatch.delenv("FUSEDLOSS_STRICT", raising=False)
    x, t, _ = _data(32, 1000, torch.float32, seed=7)
    t[3] = 5000
    out = fl.softmax_loss(x.cuda(), t.cuda(), "ce", backend="triton", reduction="none").cpu()
    assert torch.isnan(out[3]) and torch.isfinite(out[torch.arange(32) != 3]).all()
    monkeypatch.setenv("FUSEDLOSS_STRICT", "1")
    with pytest.raises(IndexError):
        fl.softmax_loss(x.cuda(), t.cuda(), "ce", backend="triton")


def test_inplace_backward_allocates_no_gradient_buffer():
    """Forward peak memory: the fused gradient (N C E) without inplace_backward, ~nothing
    with it (the gradient goes into the logits' storage)."""
    n, c = 4096, 32000
    leaf = torch.randn(n, c, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, c, (n,), device="cuda")
    for inplace in (False, True):
        logits = leaf * 1.0                     # a non-leaf, like a model's output
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fl.softmax_loss(logits, t, "ce", backend="triton", inplace_backward=inplace)
        peak = torch.cuda.max_memory_allocated() - base
        out.backward()
        leaf.grad = None
        if inplace:
            assert peak < 0.05 * n * c * 2, peak
        else:
            assert n * c * 2 <= peak <= 1.05 * n * c * 2, peak


def test_deterministic():
    x, t, w = _data(4096, 1000, torch.float32, seed=8, weighted=True)
    a, ga = _gpu_loss_grad("bce", x, t, weight=w)
    b, gb = _gpu_loss_grad("bce", x, t, weight=w)
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_auto_picks_triton_on_cuda():
    from fusedloss import dispatch
    assert dispatch.resolve("auto", torch.device("cuda")).name == "triton"
    assert "triton" in fl.available_backends()


# ----------------------------------------------------------------------------
# Knowledge distillation: fusedloss::triton_distill (triton_kernels/distill/), the op itself
# (tests/test_triton_distill.py has the interpreter's cases; the API's own tests run it through
# fl.distill_loss)
# ----------------------------------------------------------------------------

DIVERGENCE_IDS = {"kl": 0, "reverse_kl": 1, "jsd": 2}


def _distill_data(n, v, dtype, seed=0, extreme=False):
    g = torch.Generator().manual_seed(seed)
    s = 2 * torch.randn(n, v, generator=g)
    t = 2 * torch.randn(n, v, generator=g)
    if extreme:  # leads of 30 and 100, teacher and student on different classes, then on the same one
        for i, (lead, tc) in enumerate(((30.0, 5), (100.0, 5), (30.0, 20), (100.0, 20))):
            s[i, 20] += lead
            t[i, tc] += lead
    rs = 0.5 + torch.rand(n, generator=g)
    rs[-1] = 0.0
    return s.to(dtype), t.to(dtype), rs


def _gpu_distill(s, t, rs, temperature, div, beta=0.5, accumulate=True, seed=1):
    from fusedloss.triton_kernels.distill import launch
    g0 = torch.randn(s.shape, generator=torch.Generator().manual_seed(seed)).to(s.dtype)
    grad = g0.cuda()
    d = launch.triton_distill(s.cuda(), t.cuda(), rs.cuda(), temperature, DIVERGENCE_IDS[div], beta, grad,
                              accumulate)
    return d.cpu(), grad.cpu(), g0


@pytest.mark.parametrize("shape", ((64, 1000), (32, 32000), (8, 128256)), ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("div", DIVERGENCE_IDS)
def test_distill_real_shapes_match_float64(div, dtype, shape):
    """On chip (V 1000) and streamed (V 32000, 128256), T = 2, accumulated into a buffer, a row of
    row_scale 0 left unchanged."""
    from oracle_distill import divergence_grad, divergence_rows
    s, t, rs = _distill_data(*shape, dtype)
    d, grad, g0 = _gpu_distill(s, t, rs, 2.0, div, 0.3)
    assert_close(d, divergence_rows(s, t, 2.0, div, 0.3), dtype, "loss", div)
    expected = g0.double() + divergence_grad(s, t, 2.0, div, 0.3, rs)
    assert_close(grad[:-1], expected[:-1], dtype, "grad", div)
    assert torch.equal(grad[-1], g0[-1])


@pytest.mark.parametrize("v", (1000, 5000), ids=lambda v: f"V{v}")
@pytest.mark.parametrize("temperature", (1.0, 4.0))
@pytest.mark.parametrize("div", DIVERGENCE_IDS)
def test_distill_extreme_rows(div, temperature, v):
    """Leads of 30 and 100 (different and same classes), fp32, on chip and streamed, written (not
    accumulated): against the cancellation-free float64 gradient of tests/test_triton_distill.py.
    (GPU exp flushes subnormals to zero: values below ~1e-38 compare within the gradient's atol.)"""
    from oracle_distill import divergence_rows
    from test_triton_distill import _exact_grad
    s, t, rs = _distill_data(5, v, torch.float32, seed=2, extreme=True)
    d, grad, _ = _gpu_distill(s, t, rs, temperature, div, accumulate=False)
    assert_close(d, divergence_rows(s, t, temperature, div), torch.float32, "loss", div)
    assert_close(grad[:-1], (rs.double()[:, None] * _exact_grad(s, t, temperature, div))[:-1], torch.float32,
                 "grad", div)
    assert not grad[-1].any()


@pytest.mark.parametrize("div", DIVERGENCE_IDS)
def test_distill_no_host_sync_deterministic_and_strided(div):
    """No host synchronization inside the op; two runs bit-identical; rows of a wider buffer read in
    place give the same numbers as contiguous rows; without a gradient the same D."""
    from fusedloss.triton_kernels.distill import launch
    s, t, rs = _distill_data(256, 32000, torch.bfloat16, seed=3)
    s, t, rs = s.cuda(), t.cuda(), rs.cuda()
    outs = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            grad = torch.zeros_like(s)
            outs.append((launch.triton_distill(s, t, rs, 2.0, DIVERGENCE_IDS[div], 0.5, grad, False), grad))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    wide = torch.zeros(256, 32000 + 64, device="cuda", dtype=s.dtype)
    wide[:, 64:] = s
    gw = torch.zeros(256, 32000 + 8, device="cuda", dtype=s.dtype)
    d = launch.triton_distill(wide[:, 64:], t, rs, 2.0, DIVERGENCE_IDS[div], 0.5, gw[:, 8:], False)
    assert torch.equal(d, outs[0][0]) and torch.equal(gw[:, 8:], outs[0][1]) and not gw[:, :8].any()
    assert torch.equal(launch.triton_distill(s, t, rs, 2.0, DIVERGENCE_IDS[div], 0.5, None, False), d)


def test_distill_torch_compile_fullgraph_and_opcheck():
    """torch.compile(fullgraph=True) traces into the triton_op (the mutated gradient buffer
    functionalized) with the eager numbers; opcheck's schema and fake-tensor checks."""
    from fusedloss.triton_kernels.distill import launch
    s, t, rs = (x.cuda() for x in _distill_data(128, 32000, torch.bfloat16, seed=4))

    def step(s, t, rs, grad):
        return launch.triton_distill(s, t, rs, 2.0, 2, 0.5, grad, True)

    g_eager, g_comp = torch.ones_like(s), torch.ones_like(s)
    d_eager = step(s, t, rs, g_eager)
    d_comp = torch.compile(step, fullgraph=True)(s, t, rs, g_comp)
    assert torch.equal(d_eager, d_comp) and torch.equal(g_eager, g_comp)
    torch.library.opcheck(launch.triton_distill, (s[:16], t[:16], rs[:16], 2.0, 1, 0.5, torch.zeros_like(s[:16]),
                                                  False), test_utils=("test_schema", "test_faketensor"))


def test_triton_backend_has_the_distill_family():
    from fusedloss import dispatch
    from fusedloss.distill.ops import DistillOps
    from fusedloss.triton_kernels.distill import launch
    assert dispatch.resolve("triton", torch.device("cuda")).family(DistillOps).fwd is launch.triton_distill
