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
