"""fusedloss.hf: a tiny LlamaForCausalLM built from a config (random weights, no download):
the patched model's loss and gradients equal the stock model's for ce; crl and focal train."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")  # in requirements-dev.txt: runs in CI

from fusedloss.hf import causal_lm_loss, patch_causal_lm, unpatch_causal_lm  # noqa: E402


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).float()


def _batch(seed=1, b=3, t=20):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100   # a prompt not trained on
    labels[2, -3:] = -100  # padding
    return ids, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("num_items", [None, 41])
def test_ce_equals_stock_model(num_items):
    stock = _tiny_llama()
    fused = patch_causal_lm(copy.deepcopy(stock), "ce", backend="cpu", chunk_rows=16)
    ids, labels = _batch()
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    ref = stock(input_ids=ids, labels=labels, **kw)
    out = fused(input_ids=ids, labels=labels, **kw)
    assert out.logits is None  # the (B, T, V) logits were never built
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    ref.loss.backward()
    out.loss.backward()
    g_ref, g_out = _grads(stock), _grads(fused)
    assert g_ref.keys() == g_out.keys() and "lm_head.weight" in g_out
    for name in g_ref:
        scale = g_ref[name].abs().max().item()
        torch.testing.assert_close(g_out[name], g_ref[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("num_items", [None, 41])
def test_bfloat16_model_loss_is_float32_as_stock(num_items):
    """A bfloat16 model: transformers computes the loss from ``logits.float()``, so it is
    float32 (the sum and the division by num_items_in_batch too); so is the fused one. The two
    differ only by the logits' rounding: each is a bfloat16 product (8 significant bits,
    relative error <= 2^-8 each, so <= 2^-7 * max|logit| apart), and the row loss moves by at
    most twice the largest logit change (lse and the target logit each by at most that), so
    the mean, or the sum over num_items_in_batch, by at most 2^-6 * max|logit| times
    max(1, counted tokens / num_items_in_batch); plus float32 rounding."""
    stock = _tiny_llama().to(torch.bfloat16)
    fused = patch_causal_lm(copy.deepcopy(stock), "ce", backend="cpu", chunk_rows=16)
    ids, labels = _batch()
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    ref = stock(input_ids=ids, labels=labels, **kw)
    out = fused(input_ids=ids, labels=labels, **kw)
    assert ref.loss.dtype == torch.float32
    assert out.loss.dtype == torch.float32
    counted = (labels[:, 1:] != -100).sum().item()
    bound = 2.0 ** -6 * ref.logits.float().abs().max().item() * max(1.0, counted / (num_items or counted))
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=bound)
    out.loss.backward()
    assert fused.lm_head.weight.grad.dtype == torch.bfloat16


def test_without_labels_runs_the_stock_forward_and_unpatch():
    model = _tiny_llama()
    ids, _ = _batch()
    ref = model(input_ids=ids).logits
    patch_causal_lm(model, "focal")
    torch.testing.assert_close(model(input_ids=ids).logits, ref)
    unpatch_causal_lm(model)
    assert "forward" not in model.__dict__


def test_causal_lm_loss_shift_labels():
    model = _tiny_llama()
    ids, labels = _batch()
    hidden = model.model(input_ids=ids).last_hidden_state
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    a = causal_lm_loss(hidden, model.lm_head, labels, "nllr")
    b = causal_lm_loss(hidden, model.lm_head, None, "nllr", shift_labels=shifted)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("loss,opts", [("crl", dict(alpha=1.5, beta=1.0)), ("focal", dict(gamma=2.0))])
def test_training_reduces_the_loss(loss, opts):
    model = patch_causal_lm(_tiny_llama(), loss, **opts)
    ids, labels = _batch(t=24)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses
