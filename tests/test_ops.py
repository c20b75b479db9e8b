"""The torch.library ops: gradcheck, opcheck, torch.compile without graph breaks,
and what the backward keeps alive (no (N, C) tensor besides the logits)."""
from __future__ import annotations

import pytest
import torch

import fusedloss as fl
from fusedloss import ops
from fusedloss.memtrack import PeakMemory
from fusedloss.variants import Reduction, Variant

SCALARS = dict(ignore_index=-100, label_smoothing=0.0, alpha=1.5, beta=1.0, gamma=2.0)


def _args(variant, reduction, *, n=6, c=5, weight=True, eps=0.0, compute_grad=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=g, dtype=dtype)
    t = torch.randint(0, c, (n,), generator=g)
    t[1] = -100
    w = torch.rand(c, generator=g, dtype=dtype) + 0.5 if weight else None
    return (x, t, w, int(variant), int(reduction), -100, eps, 1.5, 1.0, 2.0, 0.0, 0.0, compute_grad)


@pytest.mark.parametrize("loss", fl.LOSSES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradcheck_float64(loss, reduction):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.tensor([0, 3, -100, 6, 2])
    w = torch.rand(7, dtype=torch.float64, generator=g) + 0.5
    kw = dict(weight=w, reduction=reduction, backend="reference")
    if loss == "ce":
        kw["label_smoothing"] = 0.1
    assert torch.autograd.gradcheck(lambda x: fl.softmax_loss(x, t, loss, **kw), (x,))


def test_gradcheck_soft_targets_both_inputs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.softmax(torch.randn(4, 5, dtype=torch.float64, generator=g), 1).requires_grad_(True)
    w = torch.rand(5, dtype=torch.float64, generator=g) + 0.5
    assert torch.autograd.gradcheck(lambda x, y: fl.cross_entropy(x, y, weight=w, label_smoothing=0.1), (x, y))


@pytest.mark.parametrize("variant", list(Variant), ids=lambda v: v.name.lower())
@pytest.mark.parametrize("reduction", list(Reduction), ids=lambda r: r.name.lower())
@pytest.mark.parametrize("compute_grad", [False, True])
def test_opcheck_reference_fwd(variant, reduction, compute_grad):
    args = _args(variant, reduction, compute_grad=compute_grad, eps=0.1 if variant == Variant.CE else 0.0)
    x = args[0].requires_grad_(True)
    torch.library.opcheck(ops.reference_fwd, (x,) + args[1:])


@pytest.mark.parametrize("reduction", list(Reduction), ids=lambda r: r.name.lower())
def test_opcheck_reference_bwd(reduction):
    for variant in Variant:
        args = _args(variant, reduction)
        loss, stats, _ = ops.reference_fwd(*args)
        x, t, w = args[:3]
        torch.library.opcheck(ops.reference_bwd, (torch.ones_like(loss), x, t, w, stats) + args[3:12])


def test_opcheck_soft_ce():
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.softmax(torch.randn(4, 5, dtype=torch.float64), 1)
    for red in Reduction:
        for cg in (False, True):
            torch.library.opcheck(ops.reference_soft_fwd, (x, y, None, int(red), 0.1, cg))
        _, stats, _ = ops.reference_soft_fwd(x, y, None, int(red), 0.1, False)
        go = torch.rand(()) if red != Reduction.NONE else torch.rand(4)
        torch.library.opcheck(ops.reference_soft_bwd, (go.double(), x.detach(), y, None, stats, int(red), 0.1))


def test_fused_gradient_path_matches_recomputed_backward():
    """compute_grad=True (the forward returns the gradient, as kernel backends do) gives the
    same gradient as the backward that recomputes from the logits."""
    for variant in Variant:
        for red in Reduction:
            args = _args(variant, red)
            x = args[0].requires_grad_(True)
            loss, _, _ = ops.reference_fwd(x, *args[1:12], False)
            go = torch.rand_like(loss) + 0.5
            (g_recomputed,) = torch.autograd.grad(loss, x, go)
            loss2, _, grad = ops.reference_fwd(x, *args[1:12], True)
            (g_fused,) = torch.autograd.grad(loss2, x, go)
            assert grad.shape == x.shape
            torch.testing.assert_close(g_fused, g_recomputed)


class _Net(torch.nn.Module):
    def __init__(self, loss: str):
        super().__init__()
        self.fc = torch.nn.Linear(8, 10)
        self.loss = fl.SoftmaxLoss(loss, weight=torch.linspace(0.5, 1.5, 10), backend="reference")

    def forward(self, x, t):
        return self.loss(self.fc(x), t)


@pytest.mark.parametrize("loss", fl.LOSSES)
def test_compile_fullgraph_matches_eager(loss):
    """fullgraph=True fails on any graph break; aot_eager traces the ops through fake
    tensors and AOT autograd (the op registrations) without paying inductor's C++ compile."""
    torch.manual_seed(0)
    net = _Net(loss)
    x, t = torch.randn(16, 8), torch.randint(0, 10, (16,))
    eager = net(x, t)
    eager.backward()
    g_eager = net.fc.weight.grad.clone()
    net.zero_grad()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    out = compiled(x, t)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(net.fc.weight.grad, g_eager)


def test_compile_inductor_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = _Net("crl")
    x, t = torch.randn(16, 8), torch.randint(0, 10, (16,))
    eager = net(x, t)
    out = torch.compile(net, fullgraph=True)(x, t)
    torch.testing.assert_close(out, eager)


@pytest.mark.parametrize("loss", fl.LOSSES)
def test_backward_saves_no_class_sized_tensor_besides_logits(loss):
    n, c = 32, 50
    x = torch.randn(n, c, requires_grad=True)
    t = torch.randint(0, c, (n,))
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fl.softmax_loss(x, t, loss, backend="reference")
    big = [s for s in saved if s.numel() >= n * c]
    assert all(s.data_ptr() == x.data_ptr() for s in big), [tuple(s.shape) for s in big]


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1.05), (torch.bfloat16, 3.05)], ids=str)
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_reference_peak_memory(loss, dtype, bound):
    """Eager forward+backward within ~3x the logits' bytes (F.cross_entropy takes 3x). The
    math runs in float32, so half logits pay float32 buffers: 2 bytes per byte of logits.
    bce keeps one more buffer (its R reduction) than the target-only family."""
    x = torch.randn(256, 1000, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 1000, (256,))
    with PeakMemory() as m:
        fl.softmax_loss(x, t, loss, backend="reference").backward()
    ratio = m.peak_bytes / (x.numel() * x.element_size())
    limit = bound + (1.0 if loss == "bce" else 0.0)
    assert ratio <= limit, f"{loss} {dtype}: peak {ratio:.2f}x the logits"
