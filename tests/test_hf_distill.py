"""fusedloss.hf with a teacher: ``patch_causal_lm(student, loss, teacher=...)`` and ``DistillationTrainer``,
on tiny random-weight models built from configs (nothing downloaded), float32 on the CPU.

The reference: the two stock models' logits (the student's with grad), and the distillation loss
written here in float64 (tests/oracle.py's per-row hard loss, tests/oracle_distill.py's divergence,
ForCausalLMLoss's shift, ignored tokens and mean). The patched student's loss and every student
parameter's gradient must equal it (rtol 1e-5 / the gradient tolerances of tests/test_hf.py);
the teacher gets no gradient.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fusedloss as fl  # noqa: E402
from oracle import per_row_loss  # noqa: E402
from oracle_distill import divergence_rows  # noqa: E402
from test_hf import V, _Data, _args, _assert_same_grads, _batch, _losses, _model  # noqa: E402
from fusedloss.hf import PatchError, patch_causal_lm, patched_teacher, unpatch_causal_lm  # noqa: E402

HARD_OPTS = {"crl": dict(alpha=1.5, beta=1.0), "focal": dict(gamma=2.0)}


def _teacher(family="qwen2", seed=5, **overrides):
    """A teacher of another family and hidden size than the llama student (hidden 48 against 32)."""
    kw = dict(hidden_size=48, intermediate_size=96) if family in ("qwen2", "llama", "mistral") else {}
    model = _model(family, seed=seed, **{**kw, **overrides}) if kw else _model(family, seed=seed, **overrides)
    return model.eval().requires_grad_(False)


def _oracle(student_logits, teacher_logits, labels, loss, temperature, divergence, kd_weight, jsd_beta=0.5,
            num_items=None, **opts):
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    x = student_logits.double().reshape(-1, V)
    t = teacher_logits.double().reshape(-1, V)
    keep = shift != -100
    x, t, y = x[keep], t[keep], shift[keep]
    rows = (1 - kd_weight) * per_row_loss(x, y, loss, **opts) + kd_weight * divergence_rows(
        x, t, temperature, divergence, jsd_beta)
    return rows.sum() / (num_items if num_items is not None else keep.sum())


def _stock_reference(student, teacher, ids, labels, **kw):
    """The float64 loss of the stock logits of both models; backward fills the stock student's grads."""
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    s_logits = student(input_ids=ids).logits
    ref = _oracle(s_logits, t_logits, labels, **kw)
    ref.backward()
    return ref


@pytest.mark.parametrize("loss, divergence, temperature, kd_weight", [
    ("ce", "kl", 1.0, 0.5), ("crl", "reverse_kl", 2.0, 0.3), ("focal", "jsd", 4.0, 0.8), ("ce", "kl", 2.0, 1.0)])
@pytest.mark.parametrize("mode", ["fused", "logits"])
def test_patched_student_equals_float64(loss, divergence, temperature, kd_weight, mode):
    stock = _model("llama")
    teacher = _teacher()
    teacher_before = copy.deepcopy(teacher.state_dict())
    student = patch_causal_lm(copy.deepcopy(stock), loss, teacher=teacher, temperature=temperature,
                              divergence=divergence, kd_weight=kd_weight, skip_logits=mode == "fused",
                              **HARD_OPTS.get(loss, {}))
    ids, labels = _batch()
    out = student(input_ids=ids, labels=labels)
    assert (out.logits is None) == (mode == "fused")
    out.loss.backward()
    ref = _stock_reference(stock, teacher, ids, labels, loss=loss, temperature=temperature, divergence=divergence,
                           kd_weight=kd_weight, **HARD_OPTS.get(loss, {}))
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    _assert_same_grads(stock, student)
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


@pytest.mark.parametrize("student_family, teacher_family", [("cohere", "granite"), ("phi", "llama"),
                                                            ("gpt2", "qwen2")])
def test_other_families_and_post_processing(student_family, teacher_family):
    """A logit scale on either side (Cohere's logit_scale, Granite's logits_scaling), a head with a bias
    (Phi), a tied head (GPT-2): the fused loss equals the stock logits' float64 loss."""
    stock = _model(student_family)
    teacher = _teacher(teacher_family)
    student = patch_causal_lm(copy.deepcopy(stock), "ce", teacher=teacher, temperature=2.0, kd_weight=0.6)
    student.train()
    stock.train()
    for m in (stock, student):  # dropout off in both (GPT-2): the comparison is of the loss, not of masks
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    ids, labels = _batch()
    out = student(input_ids=ids, labels=labels)
    out.loss.backward()
    ref = _stock_reference(stock, teacher, ids, labels, loss="ce", temperature=2.0, divergence="kl", kd_weight=0.6)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    _assert_same_grads(stock, student)


def test_num_items_in_batch_and_attention_mask():
    """Gradient accumulation's sum / num_items_in_batch; the teacher gets the attention mask too."""
    stock, teacher = _model("llama"), _teacher()
    student = patch_causal_lm(copy.deepcopy(stock), "ce", teacher=teacher, kd_weight=0.5).train()
    ids, labels = _batch()
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    out = student(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=41)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits
    ref = _oracle(stock(input_ids=ids, attention_mask=mask).logits, t_logits, labels, loss="ce", temperature=1.0,
                  divergence="kl", kd_weight=0.5, num_items=41)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["fused", "logits"])
def test_bfloat16_teacher_float32_student(mode):
    """A bfloat16 teacher beside a float32 student: the teacher's bfloat16 logits promoted (as fl.distill_loss
    promotes), the loss float32, equal to the float64 loss of the two stock models' logits."""
    stock, teacher = _model("llama"), _teacher().to(torch.bfloat16)
    student = patch_causal_lm(copy.deepcopy(stock), "ce", teacher=teacher, temperature=2.0,
                              skip_logits=mode == "fused")
    ids, labels = _batch()
    out = student.train()(input_ids=ids, labels=labels)
    out.loss.backward()
    ref = _stock_reference(stock, teacher, ids, labels, loss="ce", temperature=2.0, divergence="kl", kd_weight=0.5)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    _assert_same_grads(stock, student)


def test_bfloat16_pair_fused_loss_is_bfloat16():
    """Both models bfloat16: the fused path's loss is linear_distill_loss's, bfloat16 (float32 math rounded once),
    within bfloat16 rounding of the float64 loss of the stock bfloat16 logits; the logits path's is float32."""
    stock, teacher = _model("llama").to(torch.bfloat16), _teacher().to(torch.bfloat16)
    ids, labels = _batch()
    with torch.no_grad():
        ref = _oracle(stock(input_ids=ids).logits, teacher(input_ids=ids).logits, labels, loss="ce", temperature=2.0,
                      divergence="kl", kd_weight=0.5)
    for mode, dtype in (("fused", torch.bfloat16), ("logits", torch.float32)):
        student = patch_causal_lm(copy.deepcopy(stock), "ce", teacher=teacher, temperature=2.0,
                                  skip_logits=mode == "fused")
        out = student.train()(input_ids=ids, labels=labels)
        assert out.loss.dtype == dtype, mode
        torch.testing.assert_close(out.loss.double(), ref, rtol=2e-2, atol=0, msg=mode)


def test_softcap_needs_the_logits_path():
    """Gemma 2's final soft cap has no fused linear form: refused unless skip_logits=False, where the
    stock (capped) logits of both models go to fl.distill_loss."""
    stock, teacher = _model("llama"), _teacher("gemma2")
    with pytest.raises(PatchError, match="final_logit_softcapping=0.5.*skip_logits=False"):
        patch_causal_lm(copy.deepcopy(stock), "ce", teacher=teacher)
    student = patch_causal_lm(copy.deepcopy(stock), "ce", teacher=teacher, skip_logits=False, temperature=2.0)
    ids, labels = _batch()
    out = student.train()(input_ids=ids, labels=labels)
    out.loss.backward()
    ref = _stock_reference(stock, teacher, ids, labels, loss="ce", temperature=2.0, divergence="kl", kd_weight=0.5)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    _assert_same_grads(stock, student)


def test_refusals():
    student, teacher = _model("llama"), _teacher()
    with pytest.raises(PatchError, match="vocabulary of 128.*student LlamaForCausalLM .* 96"):
        patch_causal_lm(copy.deepcopy(student), "ce", teacher=_teacher(vocab_size=128))
    with pytest.raises(ValueError, match="temperature=, kd_weight= without teacher="):
        patch_causal_lm(copy.deepcopy(student), "ce", temperature=2.0, kd_weight=0.3)
    with pytest.raises(ValueError, match="temperature"):
        patch_causal_lm(copy.deepcopy(student), "ce", teacher=teacher, temperature=0.0)
    with pytest.raises(ValueError, match="divergence"):
        patch_causal_lm(copy.deepcopy(student), "ce", teacher=teacher, divergence="js")
    with pytest.raises(ValueError, match="kd_weight"):
        patch_causal_lm(copy.deepcopy(student), "ce", teacher=teacher, kd_weight=1.5)
    with pytest.raises(ValueError, match="jsd_beta=0.3 is used by divergence='jsd' only"):
        patch_causal_lm(copy.deepcopy(student), "ce", teacher=teacher, jsd_beta=0.3)
    with pytest.raises(PatchError, match="teacher is the student itself"):
        patch_causal_lm(student, "ce", teacher=student)
    with pytest.raises(PatchError, match="not a model class fusedloss.hf knows"):
        patch_causal_lm(copy.deepcopy(student), "ce", teacher=transformers.GPTNeoXForCausalLM(
            transformers.GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       intermediate_size=64)))
    patched = patch_causal_lm(copy.deepcopy(student), "ce", teacher=teacher)
    ids, labels = _batch()
    embeds = patched.get_input_embeddings()(ids)
    with pytest.raises(PatchError, match="inputs_embeds="):
        patched(inputs_embeds=embeds, labels=labels)
    # Without labels: the stock forward, no teacher run.
    torch.testing.assert_close(patched(input_ids=ids).logits, student(input_ids=ids).logits, rtol=0, atol=0)
    assert patched_teacher(patched)[0] is teacher
    assert patched_teacher(unpatch_causal_lm(patched)) is None


def test_distillation_trainer(tmp_path):
    """DistillationTrainer: trains the student only (the teacher's weights and eval mode untouched), the
    teacher moved to args.device; its eval_loss is the float64 distillation loss of the stock logits."""
    student, teacher = _model("llama"), _teacher()
    teacher.train()  # the trainer puts it in eval mode
    before = copy.deepcopy(teacher.state_dict())
    data = _Data(8, seed=3)
    tr = fl.hf.DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher,
                                   args=_args(tmp_path, max_steps=12, per_device_eval_batch_size=8),
                                   train_dataset=_Data(4), eval_dataset=data, temperature=2.0, divergence="jsd",
                                   jsd_beta=0.3, kd_weight=0.7, loss="crl", loss_options=HARD_OPTS["crl"])
    assert not teacher.training
    ev = tr.evaluate()
    ids = torch.stack([r["input_ids"] for r in data.rows])
    labels = torch.stack([r["labels"] for r in data.rows])
    with torch.no_grad():
        ref = _oracle(student(input_ids=ids).logits, teacher(input_ids=ids).logits, labels, loss="crl",
                      temperature=2.0, divergence="jsd", kd_weight=0.7, jsd_beta=0.3, **HARD_OPTS["crl"])
    assert math.isclose(ev["eval_loss"], ref.item(), rel_tol=1e-5)
    tr.train()
    losses = _losses(tr)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    assert not teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in teacher.parameters())


def test_distillation_trainer_refuses_a_differently_patched_model(tmp_path):
    student = patch_causal_lm(_model("llama"), "ce")
    with pytest.raises(PatchError, match="already patched"):
        fl.hf.DistillationTrainer(model=student, teacher_model=_teacher(), args=_args(tmp_path))
