"""Every bad input raises a clear Python exception naming the argument, before any kernel runs."""
from __future__ import annotations

import math

import pytest
import torch

import fusedloss as fl
from fusedloss import reference
from fusedloss.variants import Reduction, Variant

X = torch.randn(4, 5)
T = torch.tensor([0, 1, 2, 3])

CASES = [
    # (kwargs for softmax_loss, exception, words the message must contain)
    (dict(loss="softmax"), ValueError, ["loss", "'softmax'"]),
    (dict(reduction="avg"), ValueError, ["reduction", "'avg'"]),
    (dict(logits=[1.0, 2.0]), TypeError, ["logits", "list"]),
    (dict(logits=X.long()), TypeError, ["logits", "int64"]),
    (dict(logits=torch.tensor(1.0)), ValueError, ["logits", "0-d"]),
    # C = 0 is PyTorch's legal empty case (docs/autograd.md); a class index there is out of range
    (dict(logits=torch.randn(4, 0), target=torch.zeros(4, dtype=torch.long)), IndexError, ["target", "C=0"]),
    (dict(target=[0, 1, 2, 3]), TypeError, ["target", "list"]),
    (dict(target=T.to(torch.int16)), TypeError, ["target", "int16"]),
    (dict(target=T[:3]), ValueError, ["target", "(4,)", "(3,)"]),
    (dict(target=torch.rand(4, 5), loss="nllr", ignore_index=0), ValueError, ["ignore_index", "soft"]),
    (dict(target=torch.rand(4, 6)), ValueError, ["target", "(4, 5)", "(4, 6)"]),
    (dict(weight=torch.ones(4)), ValueError, ["weight", "(5,)", "(4,)"]),
    (dict(weight=torch.ones(5, dtype=torch.long)), TypeError, ["weight", "int64"]),
    (dict(weight=[1.0] * 5), TypeError, ["weight", "list"]),
    (dict(weight=torch.ones(5, device="meta")), ValueError, ["weight", "meta", "cpu"]),
    (dict(target=T.to("meta")), ValueError, ["target", "meta"]),
    (dict(ignore_index=1.5), TypeError, ["ignore_index", "float"]),
    (dict(label_smoothing=1.5), ValueError, ["label_smoothing", "1.5"]),
    (dict(label_smoothing=-0.1), ValueError, ["label_smoothing", "-0.1"]),
    (dict(z_loss=-0.5), ValueError, ["z_loss", "-0.5"]),
    (dict(softcap=0.0), ValueError, ["softcap", "0.0"]),
    (dict(alpha=-1.0, loss="crl"), ValueError, ["alpha", "-1.0"]),
    (dict(beta=math.nan, loss="crl"), ValueError, ["beta", "nan"]),
    (dict(gamma=-2.0, loss="focal"), ValueError, ["gamma", "-2.0"]),
    (dict(gamma="2", loss="focal"), TypeError, ["gamma", "str"]),
    (dict(backend="gpu"), RuntimeError, ["unknown backend", "'gpu'"]),
    (dict(backend=3), TypeError, ["backend", "int"]),
    (dict(target=torch.tensor([0, 1, 5, 3])), IndexError, ["target", "5", "C=5"]),
    (dict(target=torch.tensor([0, -3, 2, 3])), IndexError, ["target", "-3"]),
]


@pytest.mark.parametrize("kwargs,exc,words", CASES, ids=[str(i) for i in range(len(CASES))])
def test_bad_input_raises_naming_the_argument(kwargs, exc, words):
    kwargs = dict(kwargs)
    logits = kwargs.pop("logits", X)
    target = kwargs.pop("target", T)
    loss = kwargs.pop("loss", "ce")
    with pytest.raises(exc) as info:
        fl.softmax_loss(logits, target, loss, **kwargs)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


def test_target_check_runs_before_any_memory_is_read_with_it():
    """A huge bad index must raise, not read out of bounds (it would segfault or return garbage)."""
    with pytest.raises(IndexError, match="target"):
        fl.softmax_loss(X, torch.tensor([0, 1, 2**40, 3]), "bce", backend="reference")


def test_module_rejects_unknown_loss_at_construction():
    with pytest.raises(ValueError, match="loss"):
        fl.SoftmaxLoss("hinge")


def test_unchecked_devices_mark_bad_rows_nan():
    """What GPUs do by default (no host sync): a bad target reads nothing out of bounds and
    its row's loss is NaN; the other rows are exact. Exercised on the CPU through the
    reference math directly, which is what the op runs after its (CPU-only) check."""
    x = torch.randn(4, 5, dtype=torch.float64)
    t = torch.tensor([0, 7, -100, 3])
    loss, _ = reference.forward(x, t, None, Variant.CE, Reduction.NONE, -100, 0.0, 1.5, 1.0, 2.0)
    assert torch.isnan(loss[1]) and loss[2] == 0
    expect = torch.logsumexp(x, 1) - x.gather(1, t.clamp(0, 4)[:, None])[:, 0]
    torch.testing.assert_close(loss[[0, 3]], expect[[0, 3]])


def test_strict_mode_flag(monkeypatch):
    from fusedloss import validation
    assert validation.must_check_targets(torch.device("cpu"))
    monkeypatch.delenv(validation.STRICT_ENV, raising=False)
    assert not validation.must_check_targets(torch.device("cuda"))
    monkeypatch.setenv(validation.STRICT_ENV, "1")
    assert validation.must_check_targets(torch.device("cuda"))


def test_strict_mode_keeps_the_host_target_check_off_the_cpu(monkeypatch):
    """FUSEDLOSS_STRICT=1 on a GPU: the eager fast path (which calls the extension's op, whose CUDA
    kernel does not read target values on the host) steps aside for the checked path and its
    IndexError. Meta tensors stand in for a device that is not the CPU."""
    from fusedloss import dispatch, functional

    def reached(*args):
        raise AssertionError("the fast path chose an op under strict mode")

    monkeypatch.setattr(dispatch, "checked_one_target", reached)
    monkeypatch.setenv("FUSEDLOSS_STRICT", "1")
    x = torch.empty(4, 3, device="meta")
    t = torch.zeros(4, dtype=torch.long, device="meta")
    assert functional._eager_fast(x, t, "ce", None, -100, "mean", 0.0, 1.0, 1.0, 2.0, "auto", 0.0, None) is None
