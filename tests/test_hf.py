"""fusedloss.hf on tiny transformers models built from configs (random weights, nothing
downloaded), float32 on the CPU.

The reference is the stock model itself (for other losses, tests/oracle.py's float64 loss of
the stock logits): with ``ce`` a patched model must give the stock
``labels=`` loss and the gradient of every parameter (loss rtol 1e-5 / atol 1e-6; gradients
rtol 1e-4 / atol 1e-5 x the tensor's largest gradient: the fused head forms the same logits
blockwise, so only float32 summation order differs), or refuse at patch time. The Trainer
tests compare a patched and a stock run of the same seeded Trainer step by step (rtol 1e-4:
20 optimizer steps on gradients that agree to rounding).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")  # in requirements-dev.txt: runs in CI

import fusedloss as fl  # noqa: E402
from oracle import oracle_loss  # noqa: E402
from fusedloss.hf import (FAMILIES, PatchError, causal_lm_loss, patch_causal_lm, patched_loss,  # noqa: E402
                          unpatch_causal_lm)

V = 96
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _cfg(name, **kw):
    return getattr(transformers, name)(**{**SMALL, **kw})


#: model class -> config, one per row of docs/huggingface.md's table
CONFIGS = {
    "llama": lambda: ("LlamaForCausalLM", _cfg("LlamaConfig")),
    "llama_tied": lambda: ("LlamaForCausalLM", _cfg("LlamaConfig", tie_word_embeddings=True)),
    "mistral": lambda: ("MistralForCausalLM", _cfg("MistralConfig")),
    "qwen2": lambda: ("Qwen2ForCausalLM", _cfg("Qwen2Config")),
    "qwen3": lambda: ("Qwen3ForCausalLM", _cfg("Qwen3Config", head_dim=8)),
    "phi3": lambda: ("Phi3ForCausalLM", _cfg("Phi3Config", pad_token_id=0)),
    "phi": lambda: ("PhiForCausalLM", _cfg("PhiConfig", resid_pdrop=0.0, embd_pdrop=0.0)),
    "gemma": lambda: ("GemmaForCausalLM", _cfg("GemmaConfig", head_dim=8)),
    "gemma2": lambda: ("Gemma2ForCausalLM", _cfg("Gemma2Config", head_dim=8, final_logit_softcapping=0.5,
                                                 tie_word_embeddings=False, attn_implementation="eager")),
    "gemma3": lambda: ("Gemma3ForCausalLM", _cfg("Gemma3TextConfig", head_dim=8, final_logit_softcapping=0.5,
                                                 tie_word_embeddings=False, attn_implementation="eager")),
    "cohere": lambda: ("CohereForCausalLM", _cfg("CohereConfig", logit_scale=3.0, bos_token_id=1, eos_token_id=2,
                                                 pad_token_id=0)),
    "granite": lambda: ("GraniteForCausalLM", _cfg("GraniteConfig", logits_scaling=0.25)),
    "mixtral": lambda: ("MixtralForCausalLM", _cfg("MixtralConfig", num_local_experts=4, num_experts_per_tok=2,
                                                   output_router_logits=True, router_aux_loss_coef=0.5)),
    "qwen2_moe": lambda: ("Qwen2MoeForCausalLM", _cfg("Qwen2MoeConfig", num_experts=4, num_experts_per_tok=2,
                                                      moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                                      output_router_logits=True, router_aux_loss_coef=0.5)),
    "qwen3_moe": lambda: ("Qwen3MoeForCausalLM", _cfg("Qwen3MoeConfig", num_experts=4, num_experts_per_tok=2,
                                                      moe_intermediate_size=32, head_dim=8,
                                                      output_router_logits=True, router_aux_loss_coef=0.5)),
    "gpt2": lambda: ("GPT2LMHeadModel", transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                                                n_positions=64)),
    "opt": lambda: ("OPTForCausalLM", transformers.OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64,
                                                             num_hidden_layers=2, num_attention_heads=4,
                                                             max_position_embeddings=64, word_embed_proj_dim=32)),
}


def _model(family="llama", seed=0, **overrides):
    cls, cfg = CONFIGS[family]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(cfg).float()
    with torch.no_grad():  # random, larger head weights: the logits' post-processing must matter
        head = model.get_output_embeddings()
        if not model.config.tie_word_embeddings:
            head.weight.normal_(0, 0.5)
    return model


def _batch(seed=1, b=3, t=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100   # a prompt not trained on
    labels[2, -3:] = -100  # padding
    return ids, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(a, b):
    """rtol 1e-4, atol 1e-5 x the tensor's largest gradient, plus 1e-7 x the model's largest
    (a gradient that is 0 in exact arithmetic, e.g. attention's key bias, is rounding noise)."""
    ga, gb = _grads(a), _grads(b)
    assert ga.keys() == gb.keys() and ga
    top = max(g.abs().max().item() for g in ga.values())
    for name in ga:
        scale = ga[name].abs().max().item()
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-5 * scale + 1e-7 * top, msg=name)


def _run(model, seed=0, **kw):
    torch.manual_seed(seed)  # dropout (GPT-2, OPT): the same masks in both models
    return model(**kw)


# ----------------------------------------------------------------------------
# Every family of the table: the patched ce equals the stock model
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_family_ce_equals_stock(family):
    stock = _model(family)
    fused = patch_causal_lm(copy.deepcopy(stock), "ce", chunk_rows=16)
    ids, labels = _batch()
    ref = _run(stock, input_ids=ids, labels=labels)
    out = _run(fused, input_ids=ids, labels=labels)
    assert type(out) is type(ref)
    assert out.logits is None  # the fused path: the (B, T, V) logits were never built
    if family in ("mixtral", "qwen2_moe", "qwen3_moe"):  # the stock forward added its router loss to ours
        assert ref.aux_loss is not None and ref.aux_loss.item() > 0.1
        torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    ref.loss.backward()
    out.loss.backward()
    _assert_same_grads(stock, fused)
    head = fused.get_output_embeddings()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite"])
def test_post_processing_matters(family):
    """The post-processing the table applies changes these losses (a patch ignoring it would fail
    test_family_ce_equals_stock): the stock loss differs from ce of the raw head output."""
    model = _model(family)
    ids, labels = _batch()
    ref = _run(model, input_ids=ids, labels=labels)
    hidden = model.model(input_ids=ids).last_hidden_state
    raw = model.get_output_embeddings()(hidden)[:, :-1].reshape(-1, V).double()
    assert abs(oracle_loss(raw, labels[:, 1:].reshape(-1)).item() - ref.loss.item()) > 0.05


def test_num_items_in_batch_as_stock():
    stock = _model("llama")
    fused = patch_causal_lm(copy.deepcopy(stock), "ce")
    ids, labels = _batch()
    ref = stock(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(41))
    out = fused(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(41))
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    ref.loss.backward()
    out.loss.backward()
    _assert_same_grads(stock, fused)


def test_shift_labels_as_stock():
    """shift_labels (already shifted, e.g. from a padding-free collator) with labels: as stock;
    shift_labels alone: no loss, as stock."""
    stock = _model("llama")
    fused = patch_causal_lm(copy.deepcopy(stock), "ce")
    ids, labels = _batch()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].clone()
    shifted[1, 2] = -100
    ref = stock(input_ids=ids, labels=labels, shift_labels=shifted)
    out = fused(input_ids=ids, labels=labels, shift_labels=shifted)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert stock(input_ids=ids, shift_labels=shifted).loss is None
    alone = fused(input_ids=ids, shift_labels=shifted)
    assert alone.loss is None and alone.logits is not None


def test_the_loss_is_the_chosen_one():
    """crl through the patch equals crl of the stock logits (float64 in the test)."""
    model = _model("cohere")
    ids, labels = _batch()
    logits = model(input_ids=ids).logits.double()  # the stock logits, logit_scale applied
    patch_causal_lm(model, "crl", alpha=1.5, beta=1.0)
    out = model(input_ids=ids, labels=labels)
    want = oracle_loss(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), "crl", alpha=1.5, beta=1.0)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Refusals, at patch time, naming the model and the attribute
# ----------------------------------------------------------------------------

def test_unknown_class_refused():
    cfg = transformers.GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4)
    with pytest.raises(PatchError, match="GPTNeoXForCausalLM.*not a model class"):
        patch_causal_lm(transformers.GPTNeoXForCausalLM(cfg))


def test_subclass_refused():
    class MyLlama(transformers.LlamaForCausalLM):
        def forward(self, *a, **k):
            out = super().forward(*a, **k)
            return out
    with pytest.raises(PatchError, match="MyLlama.*subclass"):
        patch_causal_lm(MyLlama(_cfg("LlamaConfig")))


@pytest.mark.parametrize("attr,value", [("logit_scale", 2.0), ("final_logit_softcapping", 30.0),
                                        ("logits_scaling", 4.0)])
def test_logits_attribute_not_honoured_refused(attr, value):
    model = _model("llama")
    setattr(model.config, attr, value)
    with pytest.raises(PatchError, match=f"LlamaForCausalLM.*{attr}"):
        patch_causal_lm(model)


@pytest.mark.parametrize("kw", [dict(softcap=3.0), dict(reduction="sum"), dict(ignore_index=0), dict(bias=None),
                                dict(return_lse=True)])
def test_options_the_model_sets_refused(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        patch_causal_lm(_model("llama"), **kw)


def test_bad_options_refused():
    with pytest.raises(ValueError, match="loss"):
        patch_causal_lm(_model("llama"), "nope")
    with pytest.raises(TypeError, match="unexpected keyword 'gama'"):
        patch_causal_lm(_model("llama"), "focal", gama=2.0)
    with pytest.raises(ValueError, match="gamma"):
        patch_causal_lm(_model("llama"), "focal", gamma=-1.0)
    with pytest.raises(ValueError, match="skip_logits"):
        patch_causal_lm(_model("llama"), skip_logits="yes")


# ----------------------------------------------------------------------------
# Outputs: logits where wanted, tuples, cache, generation
# ----------------------------------------------------------------------------

def test_eval_mode_gives_logits_and_our_loss():
    stock = _model("gemma2").eval()
    fused = patch_causal_lm(copy.deepcopy(stock), "ce")
    ids, labels = _batch()
    ref, out = stock(input_ids=ids, labels=labels), fused(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    # skip_logits=True: the fused loss in eval too
    patch_causal_lm(fused, "ce", skip_logits=True)
    out = fused(input_ids=ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    # skip_logits=False: logits in training too, our loss from them (focal here)
    fused.train()
    patch_causal_lm(fused, "focal", skip_logits=False)
    out = fused(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits)
    want = oracle_loss(ref.logits[:, :-1].reshape(-1, V).double(), labels[:, 1:].reshape(-1), "focal")
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_return_dict_false_and_cache(family):
    stock = _model(family)
    fused = patch_causal_lm(copy.deepcopy(stock), "ce")
    ids, labels = _batch()
    ref = stock(input_ids=ids, labels=labels, return_dict=False, use_cache=True)
    out = fused(input_ids=ids, labels=labels, return_dict=False, use_cache=True)
    assert isinstance(out, tuple) and len(out) == len(ref)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-6)
    at = 2 if family == "mixtral" else 1  # (loss, aux_loss, logits, ...) / (loss, logits, ...)
    assert out[at] is None and ref[at].shape == (*ids.shape, V)  # None at the logits' place
    for i, (a, b) in enumerate(zip(out, ref)):
        assert i == at or type(a) is type(b)
    cache = fused(input_ids=ids, labels=labels, use_cache=True).cache
    assert cache is not None and cache.get_seq_length() == ids.shape[1]


def test_without_labels_stock_and_generate_identical():
    stock = _model("qwen2").eval()
    fused = patch_causal_lm(copy.deepcopy(stock), "focal")
    ids, _ = _batch()
    torch.testing.assert_close(fused(input_ids=ids).logits, stock(input_ids=ids).logits)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(fused.generate(ids[:, :5], **kw), stock.generate(ids[:, :5], **kw))
    fused.train()  # generation in training mode too: no labels, stock path
    stock.train()
    assert torch.equal(fused.generate(ids[:, :5], **kw), stock.generate(ids[:, :5], **kw))


def test_unpatch_restores_the_stock_model():
    model = _model("llama")
    forward = model.forward
    patch_causal_lm(model, "focal")
    assert patched_loss(model) == ("focal", {})
    unpatch_causal_lm(model)
    assert "forward" not in model.__dict__ and "_loss_function" not in model.__dict__
    assert model.forward == forward and patched_loss(model) is None


def test_signature_kept():
    import inspect
    model = patch_causal_lm(_model("llama"))
    assert "input_ids" in inspect.signature(model.forward).parameters


# ----------------------------------------------------------------------------
# Resize, PEFT
# ----------------------------------------------------------------------------

def test_resize_after_patching():
    stock = _model("llama")
    fused = patch_causal_lm(copy.deepcopy(stock), "ce")
    for m in (stock, fused):
        torch.manual_seed(5)
        m.resize_token_embeddings(V + 20, mean_resizing=False)
        with torch.no_grad():
            m.lm_head.weight[V:].normal_(0, 0.5)
    ids, labels = _batch()
    ids[1, 3:6] = torch.tensor([V + 1, V + 7, V + 19])
    labels[1, 3:6] = ids[1, 3:6]
    ref, out = stock(input_ids=ids, labels=labels), fused(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    ref.loss.backward()
    out.loss.backward()
    _assert_same_grads(stock, fused)
    assert fused.lm_head.weight.shape[0] == V + 20 and fused.lm_head.weight.grad[V:].abs().sum() > 0


@pytest.mark.parametrize("order", ["patch_then_peft", "peft_then_patch"])
def test_peft_modules_to_save_head(order):
    peft = pytest.importorskip("peft")
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                task_type="CAUSAL_LM")
    base = _model("llama")

    def wrap(m):
        torch.manual_seed(3)
        return peft.get_peft_model(m, peft.LoraConfig(**lora))

    stock = wrap(copy.deepcopy(base))
    if order == "patch_then_peft":
        fused = wrap(patch_causal_lm(copy.deepcopy(base), "ce"))
    else:
        fused = patch_causal_lm(wrap(copy.deepcopy(base)), "ce")
    for m in (stock, fused):  # the trained copy differs from the original: the loss must use it
        with torch.no_grad():
            m.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    ids, labels = _batch()
    ref, out = stock(input_ids=ids, labels=labels), fused(input_ids=ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    ref.loss.backward()
    out.loss.backward()
    _assert_same_grads(stock, fused)
    copy_grad = fused.base_model.model.lm_head.modules_to_save["default"].weight.grad
    assert copy_grad is not None and copy_grad.abs().sum() > 0
    with fused.disable_adapter(), stock.disable_adapter():  # the original head, adapters off
        ref, out = stock(input_ids=ids, labels=labels), fused(input_ids=ids, labels=labels)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_peft_lora_on_the_head_refused_when_run():
    peft = pytest.importorskip("peft")
    model = patch_causal_lm(_model("llama"), "ce")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["lm_head"], task_type="CAUSAL_LM"))
    ids, labels = _batch()
    with pytest.raises(PatchError, match="LlamaForCausalLM.*wrapper"):
        model(input_ids=ids, labels=labels)


# ----------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------

class _Data(torch.utils.data.Dataset):
    """Rows of 16 tokens with prompts and padding of varying length (so num_items_in_batch matters),
    plus a column the model does not take (remove_unused_columns must drop it, not input_ids)."""

    def __init__(self, n=16, seed=7):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for i in range(n):
            ids = torch.randint(0, V, (16,), generator=g)
            labels = ids.clone()
            labels[: i % 5] = -100
            labels[16 - (i % 3) * 2:] = -100
            self.rows.append(dict(input_ids=ids, attention_mask=torch.ones(16, dtype=torch.long), labels=labels,
                                  source=i))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=2,
                per_device_eval_batch_size=4, gradient_accumulation_steps=2, max_steps=20, logging_steps=1,
                learning_rate=3e-3, save_strategy="no", seed=11, disable_tqdm=True)
    return transformers.TrainingArguments(**{**base, **kw})


def _collate(rows):  # the default collator stacks tensors; "source" is dropped by remove_unused_columns
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0] if k != "source"}


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_default_args_same_losses_as_stock(tmp_path):
    base = _model("llama")
    stock = transformers.Trainer(model=copy.deepcopy(base), args=_args(tmp_path / "a"), train_dataset=_Data())
    stock.train()
    fused = transformers.Trainer(model=patch_causal_lm(copy.deepcopy(base), "ce"), args=_args(tmp_path / "b"),
                                 train_dataset=_Data())
    fused.train()
    a, b = _losses(stock), _losses(fused)
    assert len(a) == 20 and len(b) == 20
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=0)
    assert b[-1] < b[0]


def _accuracy(pred):
    logits, labels = pred.predictions, pred.label_ids
    hit = (logits[:, :-1].argmax(-1) == labels[:, 1:]) & (labels[:, 1:] != -100)
    return {"accuracy": float(hit.sum() / (labels[:, 1:] != -100).sum())}


def test_trainer_evaluate_compute_metrics_as_stock(tmp_path):
    base = _model("llama")
    res = []
    for i, model in enumerate((copy.deepcopy(base), patch_causal_lm(copy.deepcopy(base), "ce"))):
        tr = transformers.Trainer(model=model, args=_args(tmp_path / str(i)), eval_dataset=_Data(8, seed=3),
                                  compute_metrics=_accuracy)
        res.append(tr.evaluate())
    assert math.isclose(res[1]["eval_loss"], res[0]["eval_loss"], rel_tol=1e-5)
    assert res[1]["eval_accuracy"] == res[0]["eval_accuracy"]


def test_trainer_label_smoothing(tmp_path):
    """FusedLossTrainer gives label_smoothing_factor to the fused loss; the plain Trainer with a
    patched model refuses (it would smooth the logits with its own cross-entropy)."""
    base = _model("llama")
    batch = _collate([_Data()[i] for i in range(4)])
    args = _args(tmp_path, label_smoothing_factor=0.1)
    ft = fl.hf.FusedLossTrainer(model=copy.deepcopy(base), args=args, loss="crl", train_dataset=_Data())
    assert ft.label_smoother is None and patched_loss(ft.model) == ("crl", {"label_smoothing": 0.1})
    got = ft.compute_loss(ft.model, dict(batch))
    logits = base(input_ids=batch["input_ids"]).logits.double()
    want = oracle_loss(logits[:, :-1].reshape(-1, V), batch["labels"][:, 1:].reshape(-1), "crl", label_smoothing=0.1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # ce: the same loss as the stock Trainer's label smoother
    ft = fl.hf.FusedLossTrainer(model=copy.deepcopy(base), args=args, train_dataset=_Data())
    st = transformers.Trainer(model=copy.deepcopy(base), args=args, train_dataset=_Data())
    torch.testing.assert_close(ft.compute_loss(ft.model, dict(batch)), st.compute_loss(st.model, dict(batch)),
                               rtol=1e-5, atol=1e-6)
    plain = transformers.Trainer(model=patch_causal_lm(copy.deepcopy(base), "crl"), args=args,
                                 train_dataset=_Data())
    with pytest.raises(PatchError, match="label_smoothing_factor=0.1.*FusedLossTrainer"):
        plain.train()


def test_fused_trainer_conflicts_refused(tmp_path):
    model = patch_causal_lm(_model("llama"), "crl", label_smoothing=0.2)
    with pytest.raises(PatchError, match="already patched"):
        fl.hf.FusedLossTrainer(model=model, args=_args(tmp_path), loss="focal")
    with pytest.raises(PatchError, match="label_smoothing"):
        fl.hf.FusedLossTrainer(model=model, args=_args(tmp_path, label_smoothing_factor=0.1))


@pytest.mark.parametrize("loss,opts", [("crl", dict(alpha=1.5, beta=1.0)), ("focal", dict(gamma=2.0))])
def test_trainer_trains_crl_focal(tmp_path, loss, opts):
    tr = fl.hf.FusedLossTrainer(model=_model("llama"), args=_args(tmp_path, max_steps=16), loss=loss,
                                loss_options=opts, train_dataset=_Data(4))
    tr.train()
    losses = _losses(tr)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses


# ----------------------------------------------------------------------------
# bfloat16, causal_lm_loss
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("num_items", [None, 41])
def test_bfloat16_model_loss_is_float32_as_stock(num_items):
    """A bfloat16 model: transformers computes the loss from ``logits.float()``, so it is
    float32 (the sum and the division by num_items_in_batch too); so is the fused one. The two
    differ only by the logits' rounding: each is a bfloat16 product (8 significant bits,
    relative error <= 2^-8 each, so <= 2^-7 * max|logit| apart), and the row loss moves by at
    most twice the largest logit change (lse and the target logit each by at most that), so
    the mean, or the sum over num_items_in_batch, by at most 2^-6 * max|logit| times
    max(1, counted tokens / num_items_in_batch); plus float32 rounding."""
    stock = _model("llama").to(torch.bfloat16)
    fused = patch_causal_lm(copy.deepcopy(stock), "ce", chunk_rows=16)
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


def test_causal_lm_loss_shift_labels():
    model = _model("llama")
    ids, labels = _batch()
    hidden = model.model(input_ids=ids).last_hidden_state
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    a = causal_lm_loss(hidden, model.lm_head, labels, "nllr")
    b = causal_lm_loss(hidden, model.lm_head, None, "nllr", shift_labels=shifted)
    torch.testing.assert_close(a, b)


def test_table_lists_every_tested_family():
    tested = {CONFIGS[f]()[0] for f in CONFIGS}
    assert tested == set(FAMILIES)


def test_deepcopy_of_a_patched_model_runs_the_copy():
    model = patch_causal_lm(_model("llama"), "ce")
    twin = copy.deepcopy(model)
    ids, labels = _batch()
    twin(input_ids=ids, labels=labels).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert twin.lm_head.weight.grad is not None and patched_loss(twin) == ("ce", {})


def test_fused_trainer_model_init_is_patched(tmp_path):
    tr = fl.hf.FusedLossTrainer(model_init=lambda: _model("llama"), args=_args(tmp_path, max_steps=2),
                                loss="focal", train_dataset=_Data(4))
    tr.train()
    assert patched_loss(tr.model) == ("focal", {})
