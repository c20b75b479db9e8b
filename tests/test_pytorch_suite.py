"""PyTorch's own cross-entropy test inputs run against fusedloss, and the autograd transforms of
every loss (docs/autograd.md).

1. The ModuleInfo samples of ``nn.CrossEntropyLoss`` (``torch.testing._internal.common_modules``)
   and the OpInfo samples of ``nn.functional.cross_entropy`` (``common_methods_invocations``),
   imported from torch (nothing copied), with ``fl.CrossEntropyLoss`` / ``fl.cross_entropy`` in
   place of PyTorch's: forward and backward equal to PyTorch's (float64), ``gradcheck`` with
   batched gradients and forward AD, ``gradgradcheck`` with batched gradients, ``torch.func.jvp``
   and ``vmap`` equal to PyTorch's, and the ModuleInfo error inputs raising (a Python exception
   where PyTorch raises one; its type and wording are ours).
2. The five other losses (and ce with every option) under the same transforms, against float64
   ``torch.func`` on the closed forms of tests/oracle.py; per-sample gradients by
   ``vmap(grad(...))`` of a small model equal to a loop over the samples.
3. PyTorch's edge cases: ``C = 0`` and uint8 targets.

Backends: reference and cpu in this process; triton through Triton's interpreter in a
subprocess (``TRITON_INTERPRET=1``, which must be set before triton is imported), where this
module collects only its triton cases.

Exclusions: none of PyTorch's samples is left out. ``gradcheck`` runs in fast mode (a random
projection of the Jacobian, PyTorch's own ``fast_mode``) for inputs of more than 100 elements:
the full numerical Jacobian of the 600-element samples, twice over for ``gradgradcheck``, would
take minutes per backend on this 2-core machine.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call, grad, jvp, vmap

import fusedloss as fl
from oracle import oracle_loss

HERE = Path(__file__).resolve().parent
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
#: Under the interpreter this module runs only the triton cases (test_triton_interpreter_subprocess).
BACKENDS = ["triton"] if INTERPRETED else [b for b in ("reference", "cpu") if b in fl.available_backends()]

common_modules = pytest.importorskip("torch.testing._internal.common_modules")
common_methods = pytest.importorskip("torch.testing._internal.common_methods_invocations")

_MODULE_INFO = next(m for m in common_modules.module_db if m.module_cls is torch.nn.CrossEntropyLoss)
_OP_INFO = next(o for o in common_methods.op_db if o.name == "nn.functional.cross_entropy")


def _module_samples():
    return _MODULE_INFO.module_inputs_func(_MODULE_INFO, device="cpu", dtype=torch.float64, requires_grad=True,
                                           training=True)


def _op_samples():
    return list(_OP_INFO.sample_inputs("cpu", torch.float64, requires_grad=True))


torch.manual_seed(0)  # the samples draw their values from the global generator: the same set every run
MODULE_SAMPLES = _module_samples()
OP_SAMPLES = _op_samples()


class Case:
    """One sample as two callables of its differentiable inputs: PyTorch's and ours."""

    def __init__(self, name, torch_fn, ours_fn, inputs):
        self.name, self.torch_fn, self.ours_fn, self.inputs = name, torch_fn, ours_fn, inputs


def _module_case(i: int, backend: str) -> Case:
    s = MODULE_SAMPLES[i]
    kw = s.constructor_input.kwargs
    logits, target = s.forward_input.args
    theirs = torch.nn.CrossEntropyLoss(*s.constructor_input.args, **kw)
    ours = fl.CrossEntropyLoss(*s.constructor_input.args, backend=backend, **kw)
    return _case(f"module[{s.desc}]", theirs, ours, logits, target)


def _op_case(i: int, backend: str) -> Case:
    s = OP_SAMPLES[i]
    (target,) = s.args
    kw = s.kwargs
    return _case(f"op[{i}]", lambda x, t: F.cross_entropy(x, t, **kw),
                 lambda x, t: fl.cross_entropy(x, t, backend=backend, **kw), s.input, target)


def _case(name, theirs, ours, logits, target) -> Case:
    if target.is_floating_point() and target.requires_grad:
        return Case(name, theirs, ours, (logits, target))
    return Case(name, lambda x: theirs(x, target), lambda x: ours(x, target), (logits,))


CASES = ([("module", i) for i in range(len(MODULE_SAMPLES))] + [("op", i) for i in range(len(OP_SAMPLES))])


def _get(kind: str, i: int, backend: str) -> Case:
    return _module_case(i, backend) if kind == "module" else _op_case(i, backend)


def _fresh(inputs):
    return tuple(t.detach().clone().requires_grad_() for t in inputs)


def _fast(inputs) -> bool:
    return sum(t.numel() for t in inputs) > 100


#: gradcheck's default atol (1e-5) passes a silently zero second derivative of a 'mean' over 50
#: rows (entries ~1e-4, projected by fast mode to ~1e-5), so the checks here use atol 1e-6 (and
#: rtol 1e-4): above the central differences' rounding on these samples (up to 5e-7 where the
#: summed losses reach 100), below that silent zero (the old code fails gradgradcheck with it).
TOL = dict(atol=1e-6, rtol=1e-4)


case_ids = [f"{k}{i}" for k, i in CASES]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,i", CASES, ids=case_ids)
def test_forward_backward_equal_pytorch(kind, i, backend):
    c = _get(kind, i, backend)
    xs_t, xs_o = _fresh(c.inputs), _fresh(c.inputs)
    expected, got = c.torch_fn(*xs_t), c.ours_fn(*xs_o)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, equal_nan=True, msg=c.name)
    go = torch.randn_like(expected)
    g_t = torch.autograd.grad(expected, xs_t, go)
    g_o = torch.autograd.grad(got, xs_o, go)
    for a, b in zip(g_o, g_t):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, equal_nan=True, msg=c.name)


def _nan_sample(c: Case) -> bool:
    """A sample whose every row is ignored: 'mean' is 0/0 = NaN (PyTorch's and ours), so a
    numerical Jacobian is NaN where the analytical one is 0, for PyTorch's own function too.
    There the check is that ours gives NaN and the zero gradient PyTorch gives."""
    xs = _fresh(c.inputs)
    expected = c.torch_fn(*xs)
    if not bool(torch.isnan(expected).any()):
        return False
    ys = _fresh(c.inputs)
    got = c.ours_fn(*ys)
    torch.testing.assert_close(got, expected, equal_nan=True)
    for a, b in zip(torch.autograd.grad(got.sum(), ys), torch.autograd.grad(expected.sum(), xs)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    return True


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,i", CASES, ids=case_ids)
def test_gradcheck_batched_and_forward_ad(kind, i, backend):
    c = _get(kind, i, backend)
    if _nan_sample(c):
        return
    xs = _fresh(c.inputs)
    assert gradcheck(c.ours_fn, xs, check_batched_grad=True, check_forward_ad=True, check_batched_forward_grad=True,
                     fast_mode=_fast(xs), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,i", CASES, ids=case_ids)
def test_gradgradcheck_batched(kind, i, backend):
    c = _get(kind, i, backend)
    if _nan_sample(c):
        return
    xs = _fresh(c.inputs)
    assert gradgradcheck(c.ours_fn, xs, check_batched_grad=True, fast_mode=_fast(xs), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,i", CASES, ids=case_ids)
def test_func_transforms_equal_pytorch(kind, i, backend):
    """torch.func.jvp, a double backward (Hessian-vector product) and vmap over a batch of
    inputs, each equal to the same transform of PyTorch's function."""
    c = _get(kind, i, backend)
    xs = tuple(t.detach() for t in c.inputs)
    g = torch.Generator().manual_seed(i)
    tangents = tuple(torch.randn(t.shape, dtype=t.dtype, generator=g) for t in xs)
    out_t, tan_t = jvp(c.torch_fn, xs, tangents)
    out_o, tan_o = jvp(c.ours_fn, xs, tangents)
    # A sample whose rows are all ignored gives NaN for 'mean', as PyTorch does: NaN must match NaN.
    torch.testing.assert_close(out_o, out_t, rtol=1e-10, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(tan_o, tan_t, rtol=1e-9, atol=1e-12, equal_nan=True)

    def hvp(fn):
        x = _fresh(xs)
        out = fn(*x)
        gs = torch.autograd.grad(out, x, torch.ones_like(out), create_graph=True)
        dot = sum((gi * ti).sum() for gi, ti in zip(gs, tangents))
        return torch.autograd.grad(dot, x)

    for a, b in zip(hvp(c.ours_fn), hvp(c.torch_fn)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, equal_nan=True)

    batch = tuple(torch.stack([t, 2 * t + 0.5]) for t in xs)
    torch.testing.assert_close(vmap(c.ours_fn)(*batch), vmap(c.torch_fn)(*batch), rtol=1e-10, atol=1e-12,
                               equal_nan=True)
    gi_o = vmap(grad(lambda *a: c.ours_fn(*a).sum(), argnums=tuple(range(len(xs)))))(*batch)
    gi_t = vmap(grad(lambda *a: c.torch_fn(*a).sum(), argnums=tuple(range(len(xs)))))(*batch)
    for a, b in zip(gi_o, gi_t):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, equal_nan=True)


def _error_inputs():
    return list(_MODULE_INFO.module_error_inputs_func(_MODULE_INFO, device="cpu", dtype=torch.float64,
                                                      requires_grad=False, training=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("i", range(len(_error_inputs())))
def test_module_error_inputs_raise(i, backend):
    e = _error_inputs()[i]
    mi = e.module_error_input
    with pytest.raises(e.error_type, match=e.error_regex):  # PyTorch's own raises: the input is bad
        torch.nn.CrossEntropyLoss(*mi.constructor_input.args, **mi.constructor_input.kwargs)(*mi.forward_input.args)
    with pytest.raises((ValueError, TypeError, IndexError, RuntimeError)):
        m = fl.CrossEntropyLoss(*mi.constructor_input.args, backend=backend, **mi.constructor_input.kwargs)
        m(*mi.forward_input.args)


# ----------------------------------------------------------------------------
# Every loss and option: the transforms against float64 torch.func on tests/oracle.py's forms
# ----------------------------------------------------------------------------

OPTIONS = {
    "plain": {},
    "smooth": dict(label_smoothing=0.1),
    "weight_ignore": dict(weight=torch.tensor([0.5, 1.5, 1.0, 2.0, 0.7], dtype=torch.float64), ignore_index=1),
    "z_cap": dict(z_loss=0.1, softcap=3.0),
    "none": dict(reduction="none"),
    "sum": dict(reduction="sum", alpha=0.5, beta=2.0, gamma=1.5),
}
TARGET = torch.tensor([0, 1, 2, 4])


def _logits(seed=0, n=4, c=5):
    return 2 * torch.randn(n, c, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _ours(loss, backend, opts, target=TARGET):
    return lambda x: fl.softmax_loss(x, target, loss, backend=backend, **opts)


def _oracle(loss, opts, target=TARGET):
    kw = dict(opts)
    return lambda x: oracle_loss(x, target, loss, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt", OPTIONS)
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_losses_gradcheck_gradgradcheck(loss, opt, backend):
    x = _logits().requires_grad_()
    f = _ours(loss, backend, OPTIONS[opt])
    assert gradcheck(f, (x,), check_batched_grad=True, check_forward_ad=True, check_batched_forward_grad=True, **TOL)
    assert gradgradcheck(f, (x,), check_batched_grad=True, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt", OPTIONS)
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_losses_transforms_equal_oracle(loss, opt, backend):
    """jvp, forward AD, the Hessian-vector product of a double backward, vmap and vmap(grad),
    each against the same transform of the float64 closed form."""
    opts = OPTIONS[opt]
    x, v = _logits(1), _logits(2)
    ours, orc = _ours(loss, backend, opts), _oracle(loss, opts)
    tol = dict(rtol=1e-9, atol=1e-12)
    o1, t1 = jvp(ours, (x,), (v,))
    o2, t2 = jvp(orc, (x,), (v,))
    torch.testing.assert_close(o1, o2, **tol)
    torch.testing.assert_close(t1, t2, **tol)
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        t3 = fwAD.unpack_dual(ours(fwAD.make_dual(x, v))).tangent
    torch.testing.assert_close(t3, t2, **tol)

    def hvp(fn):
        xr = x.clone().requires_grad_()
        out = fn(xr)
        (g,) = torch.autograd.grad(out, xr, torch.ones_like(out), create_graph=True)
        assert g.grad_fn is not None
        return torch.autograd.grad((g * v).sum(), xr)[0]

    torch.testing.assert_close(hvp(ours), hvp(orc), **tol)
    xb = torch.stack([x, v, x - v])
    torch.testing.assert_close(vmap(ours)(xb), vmap(orc)(xb), **tol)
    torch.testing.assert_close(vmap(grad(lambda z: ours(z).sum()))(xb), vmap(grad(lambda z: orc(z).sum()))(xb), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_per_sample_gradients_equal_a_loop(loss, backend):
    """Opacus-style per-sample gradients: vmap(grad(loss of one sample)) over a batch through a
    small model equals the loop of one-sample backward passes (and the float64 closed form)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5)).double()
    params = {k: p.detach() for k, p in model.named_parameters()}
    xs = torch.randn(6, 3, dtype=torch.float64)
    ts = torch.tensor([0, 4, 2, 1, 3, 4])

    def one(p, xi, ti, fn):
        return fn(functional_call(model, p, (xi[None],)), ti[None])

    ours = lambda out, t: fl.softmax_loss(out, t, loss, backend=backend, label_smoothing=0.05)  # noqa: E731
    orc = lambda out, t: oracle_loss(out, t, loss, label_smoothing=0.05)  # noqa: E731
    per_sample = vmap(grad(one), in_dims=(None, 0, 0, None))(params, xs, ts, ours)
    expected = vmap(grad(one), in_dims=(None, 0, 0, None))(params, xs, ts, orc)
    for i in range(len(xs)):
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        gs = torch.autograd.grad(one(p, xs[i], ts[i], ours), list(p.values()))
        for (k, _), g in zip(p.items(), gs):
            torch.testing.assert_close(per_sample[k][i], g, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(per_sample[k][i], expected[k][i], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_and_mixed_targets_second_order(backend):
    x = _logits().requires_grad_()
    y = torch.softmax(_logits(3), 1).requires_grad_()
    for red in ("mean", "none"):
        f = lambda a, b: fl.cross_entropy(a, b, backend=backend, reduction=red, label_smoothing=0.1)  # noqa: E731
        assert gradcheck(f, (x, y), check_batched_grad=True, check_forward_ad=True, **TOL)
        assert gradgradcheck(f, (x, y), check_batched_grad=True, **TOL)
    lam = torch.rand(4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for loss in fl.LOSSES:
        for k in (0.3, lam):
            f = lambda a: fl.softmax_loss(a, (TARGET, TARGET.flip(0), k), loss, backend=backend)  # noqa: E731
            assert gradcheck(f, (x,), check_batched_grad=True, check_forward_ad=True, **TOL)
            assert gradgradcheck(f, (x,), check_batched_grad=True, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_and_lam_gradients(backend):
    """Inputs the kernels do not differentiate (class weights, a mixup lam tensor) get their
    gradient from the composite path, never a silent zero."""
    x = _logits().requires_grad_()
    w = torch.tensor([0.5, 1.5, 1.0, 2.0, 0.7], dtype=torch.float64, requires_grad=True)
    for loss in fl.LOSSES:
        assert gradcheck(lambda a, b: fl.softmax_loss(a, TARGET, loss, weight=b, backend=backend), (x, w), **TOL)
    lam = torch.rand(4, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_()
    assert gradcheck(lambda a, k: fl.softmax_loss(a, (TARGET, TARGET.flip(0), k), "focal", backend=backend), (x, lam), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_classes_and_uint8_targets_as_pytorch(backend):
    for red in ("mean", "sum", "none"):
        x0 = torch.randn(3, 0, dtype=torch.float64, requires_grad=True)
        y0 = torch.randn(3, 0, dtype=torch.float64)
        expected = F.cross_entropy(x0, y0, reduction=red)
        got = fl.cross_entropy(x0, y0, reduction=red, backend=backend)
        torch.testing.assert_close(got, expected, equal_nan=True)
        got.sum().backward()
        assert x0.grad.shape == (3, 0)
        t_ign = torch.full((3,), -100)
        torch.testing.assert_close(fl.cross_entropy(x0, t_ign, reduction=red, backend=backend),
                                   F.cross_entropy(x0, t_ign, reduction=red), equal_nan=True)
    with pytest.raises(IndexError):
        fl.cross_entropy(torch.randn(3, 0), torch.zeros(3, dtype=torch.long), backend=backend)
    x = torch.randn(4, 5, dtype=torch.float64)
    t8 = torch.tensor([0, 4, 2, 1], dtype=torch.uint8)
    torch.testing.assert_close(fl.cross_entropy(x, t8, backend=backend), F.cross_entropy(x, t8), rtol=1e-10, atol=0)
    torch.testing.assert_close(fl.cross_entropy(x, (t8, t8.flip(0), 0.3), backend=backend),
                               0.3 * F.cross_entropy(x, t8) + 0.7 * F.cross_entropy(x, t8.flip(0)), rtol=1e-10, atol=0)
    for dt in (torch.int8, torch.int16, torch.bool):
        with pytest.raises(TypeError, match="target"):
            fl.cross_entropy(x, t8.to(dt), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transform_target_check_and_unsupported(backend):
    """Under vmap the CPU target check still reads the values (under the batch wrapper), and a
    transform the composite path cannot honour (inplace_backward) says so."""
    x = _logits()
    bad = torch.tensor([[0, 1, 2, 4], [0, 1, 9, 4]])
    with pytest.raises(IndexError, match="9"):
        vmap(lambda t: fl.softmax_loss(x, t, "ce", backend=backend))(bad)
    with pytest.raises(NotImplementedError, match="inplace_backward"):
        vmap(lambda z: fl.softmax_loss(z, TARGET, "ce", backend=backend, inplace_backward=True))(x[None])


@pytest.mark.slow
def test_triton_interpreter_subprocess():
    """The triton cases of this module under Triton's interpreter, in a subprocess (the
    interpreter must be chosen before triton is imported)."""
    if INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 already: the triton cases run in this process")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning",
           str(HERE / "test_pytorch_suite.py"), "-k", "triton and not subprocess"]
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    print(out[-3000:])
    assert proc.returncode == 0, f"interpreter cases failed (rc={proc.returncode}):\n{out[-12000:]}"


def test_first_order_paths_raise_on_double_backward(tmp_path):
    """The LLM head and the vocabulary-parallel loss are first order: a double backward through
    them raises (once_differentiable), never a silent zero."""
    import torch.distributed as dist

    from fusedloss import parallel

    x = _logits().float().requires_grad_()
    h, w = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    (g,) = torch.autograd.grad(fl.linear_softmax_loss(h, w, TARGET, backend="reference"), h, create_graph=True)
    with pytest.raises(RuntimeError, match="first order"):
        g.sum().backward()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        (g,) = torch.autograd.grad(parallel.softmax_loss(x, TARGET, "ce", backend="reference"), x, create_graph=True)
        with pytest.raises(RuntimeError, match="first order"):
            g.sum().backward()
    finally:
        dist.destroy_process_group()


if INTERPRETED:
    def test_triton_inplace_backward_double_backward_raises():
        x = _logits().float().requires_grad_()
        y = x * 1.0  # inplace_backward consumes its input: a non-leaf copy
        (g,) = torch.autograd.grad(fl.softmax_loss(y, TARGET, "ce", backend="triton", inplace_backward=True), x,
                                   create_graph=True)
        with pytest.raises(RuntimeError, match="first order"):
            g.sum().backward()
