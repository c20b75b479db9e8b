"""Public API surface: backends, modules, dispatch overrides."""
from __future__ import annotations

import pytest
import torch

import fusedloss as fl
from fusedloss import dispatch


def test_available_backends_lists_reference_first():
    backends = fl.available_backends()
    assert backends[0] == "reference"
    assert set(backends) <= {"reference", "cpu", "triton", "cuda"}


def test_unavailable_backend_says_why_and_how():
    """backend="cuda" on CPU tensors: with the CUDA part not built, how to build it; with it built,
    that it runs on CUDA tensors (and, on a machine without a GPU, that none is visible), never a
    rebuild hint for a part that is there."""
    with pytest.raises(fl.BackendUnavailableError) as info:
        fl.softmax_loss(torch.randn(2, 3), torch.tensor([0, 1]), backend="cuda")
    msg = str(info.value)
    assert "'cuda'" in msg
    if "cuda" in dispatch._registry:  # the extension has its CUDA kernels
        assert "does not run on cpu tensors: it runs on CUDA tensors" in msg and "FUSEDLOSS_BUILD_CUDA" not in msg
        assert ("no CUDA device is visible" in msg) == (not torch.cuda.is_available())
    else:
        assert "to get it" in msg and "FUSEDLOSS_BUILD_CUDA=1" in msg


def test_installed_triton_on_cpu_tensors_is_not_told_to_install_triton(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    msg = dispatch.unavailable_reason("triton", torch.device("cpu"))
    assert msg is not None and "pip install" not in msg
    assert "it runs on CUDA tensors" in msg and "TRITON_INTERPRET=1" in msg
    assert ("no CUDA device is visible" in msg) == (not torch.cuda.is_available())


def test_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "no-such-backend")
    with pytest.raises(fl.BackendUnavailableError, match="no-such-backend"):
        fl.softmax_loss(torch.randn(2, 3), torch.tensor([0, 1]))
    monkeypatch.setenv(dispatch.BACKEND_ENV, "reference")
    assert dispatch.resolve("auto", torch.device("cpu")).name == "reference"


def test_explicit_backend_ignores_environment(monkeypatch):
    monkeypatch.setenv(dispatch.BACKEND_ENV, "no-such-backend")
    out = fl.softmax_loss(torch.randn(2, 3), torch.tensor([0, 1]), backend="reference")
    assert torch.isfinite(out)


MODULES = {
    "ce": fl.CrossEntropyLoss, "bce": fl.MultiClassBCELoss, "nllr": fl.NLLRLoss,
    "crl": fl.CompetingRatioLoss, "lace": fl.LinearlyAdaptiveLoss, "focal": fl.FocalLoss,
}
FUNCTIONS = {
    "ce": fl.cross_entropy, "bce": fl.multiclass_bce, "nllr": fl.nllr,
    "crl": fl.competing_ratio, "lace": fl.linearly_adaptive, "focal": fl.focal,
}


@pytest.mark.parametrize("loss", fl.LOSSES)
def test_named_modules_and_functions_agree_with_softmax_loss(loss):
    x = torch.randn(6, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 3, -100, 1])
    w = torch.rand(4, dtype=torch.float64) + 0.5
    base = fl.softmax_loss(x, t, loss, weight=w, reduction="sum")
    torch.testing.assert_close(MODULES[loss](weight=w, reduction="sum")(x, t), base)
    torch.testing.assert_close(fl.SoftmaxLoss(loss, weight=w, reduction="sum")(x, t), base)
    torch.testing.assert_close(FUNCTIONS[loss](x, t, weight=w, reduction="sum"), base)


def test_module_weight_is_a_buffer_and_repr_is_informative():
    m = fl.CompetingRatioLoss(weight=torch.ones(3), alpha=2.0)
    assert "weight" in dict(m.named_buffers())
    assert "weight" in m.state_dict()
    assert "alpha=2.0" in repr(m) and "crl" in repr(m)
    assert isinstance(m, torch.nn.Module) and isinstance(m, fl.SoftmaxLoss)


def test_crl_hyperparameters_reach_the_loss():
    x = torch.randn(5, 4, dtype=torch.float64)
    t = torch.randint(0, 4, (5,))
    assert not torch.allclose(fl.competing_ratio(x, t, alpha=1.5), fl.competing_ratio(x, t, alpha=3.0))
    assert not torch.allclose(fl.focal(x, t, gamma=2.0), fl.focal(x, t, gamma=0.5))


def test_first_call_compiled() -> None:
    # A script whose first loss call is inside torch.compile(fullgraph=True): the backend must
    # already be loaded (dispatch.preload at import), Dynamo cannot trace its import. A fresh
    # process, so no earlier test has loaded it.
    import subprocess
    import sys

    code = ("import torch, fusedloss as fl\n"
            "f = torch.compile(lambda x, t: fl.cross_entropy(x, t), fullgraph=True, backend='eager')\n"
            "x = torch.randn(8, 10, requires_grad=True); t = torch.randint(0, 10, (8,))\n"
            "loss = f(x, t); loss.backward()\n"
            "ref = torch.nn.functional.cross_entropy(x.detach().double(), t)\n"
            "assert abs(loss.item() - ref.item()) < 1e-5, (loss, ref)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
