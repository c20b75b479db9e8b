"""fusedloss.parallel: vocabulary-parallel losses over gloo processes on the CPU.

One process group per world size (2 and 4) runs every case below and writes its verdicts to a
file; each case is then one test here. Every rank builds the same full ``(N, V)`` logits from a
seed, computes the single-process loss and gradient with ``fl.softmax_loss`` on them (the
library's own result, itself tested against float64 oracles elsewhere), and compares its own
loss and its slice of the gradient with ``fusedloss.parallel.softmax_loss`` on its slice:
together the ranks' slices cover the whole gradient. The head cases compare
``fusedloss.parallel.linear_softmax_loss`` on the rank's rows of the weight (and bias) with
``fl.linear_softmax_loss`` on the full weight: the loss, the hidden gradient (summed over the
ranks by the head) and the rank's rows of the weight and bias gradients. Error cases must raise
on every rank.
"""
from __future__ import annotations

import json
import math
import os
import traceback

import pytest
import torch

pytest.importorskip("torch.distributed")
import torch.distributed as dist  # noqa: E402

TARGET_ONLY = ("ce", "nllr", "crl", "lace", "focal")
LOSSES = TARGET_ONLY + ("bce",)
N = 24
#: The head's problem: rows (blocks of HEAD_CHUNK, the last one ragged) and hidden size.
HEAD_N, HEAD_D, HEAD_CHUNK = 19, 6, 5

#: (split name, world) -> the ranks' slice sizes in rank order, and whether class_start is passed
#: (then the slices are placed in reverse rank order, so the test also covers starts that do not
#: follow the ranks).
SPLITS = {
    2: {"even": ([7, 7], False), "uneven": ([4, 11], False), "reversed": ([6, 9], True)},
    4: {"even": ([4, 4, 4, 4], False), "uneven": ([1, 6, 2, 5], False), "reversed": ([3, 5, 1, 4], True)},
}


def _cases(world: int) -> list[dict]:
    """The numeric cases of one world size: every target-only loss with every option alone, the
    options together, the three reductions, ignored rows, the splits, and a few dtypes/backends."""
    out = []
    opts = {
        "plain": {},
        "weight": {"weight": True},
        "smooth": {"label_smoothing": 0.1},
        "smooth1": {"label_smoothing": 1.0, "z_loss": 1e-2},
        "zloss": {"z_loss": 1e-2},
        "softcap": {"softcap": 4.0},
        "all": {"weight": True, "label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 5.0},
        "ignore3": {"ignore_index": 3, "weight": True},
    }
    for loss in LOSSES:
        for name, o in opts.items():
            for red in ("mean", "sum", "none"):
                split = ("even", "uneven", "reversed")[(len(out)) % 3]
                out.append(dict(name=f"{loss}-{name}-{red}-{split}", loss=loss, reduction=red, split=split, **o))
    out.append(dict(name="crl-alpha0-mean-uneven", loss="crl", reduction="mean", split="uneven", alpha=0.0, beta=2.0))
    out.append(dict(name="focal-gamma05-sum-even", loss="focal", reduction="sum", split="even", gamma=0.5))
    out.append(dict(name="ce-float64-all-mean-uneven", loss="ce", reduction="mean", split="uneven",
                    dtype="float64", weight=True, label_smoothing=0.1, z_loss=1e-2, softcap=5.0))
    out.append(dict(name="focal-bfloat16-mean-even", loss="focal", reduction="mean", split="even", dtype="bfloat16"))
    out.append(dict(name="nllr-reference-all-none-reversed", loss="nllr", reduction="none", split="reversed",
                    backend="reference", weight=True, label_smoothing=0.1, z_loss=1e-2, softcap=5.0))
    out.append(dict(name="crl-reference-plain-mean-uneven", loss="crl", reduction="mean", split="uneven",
                    backend="reference"))
    out.append(dict(name="lace-view-all-mean-uneven", loss="lace", reduction="mean", split="uneven", view=True,
                    weight=True, label_smoothing=0.1, softcap=5.0))
    out.append(dict(name="ce-1d-sum-uneven", loss="ce", reduction="sum", split="uneven", one_row=True))
    out.append(dict(name="bce-float64-all-none-reversed", loss="bce", reduction="none", split="reversed",
                    dtype="float64", weight=True, label_smoothing=0.1, z_loss=1e-2, softcap=5.0))
    out.append(dict(name="bce-bfloat16-mean-uneven", loss="bce", reduction="mean", split="uneven", dtype="bfloat16"))
    out.append(dict(name="bce-reference-all-mean-even", loss="bce", reduction="mean", split="even",
                    backend="reference", weight=True, label_smoothing=0.1, z_loss=1e-2, softcap=5.0))
    out.append(dict(name="bce-view-smooth-sum-uneven", loss="bce", reduction="sum", split="uneven", view=True,
                    label_smoothing=0.1))
    out.append(dict(name="bce-1d-mean-reversed", loss="bce", reduction="mean", split="reversed", one_row=True))
    # The accelerator's path on the CPU: no host check of device data (masked fake targets by every
    # row's arg-max on the device), with and without the validation's exchange.
    for loss, validate in (("focal", True), ("nllr", False)):
        out.append(dict(name=f"{loss}-syncfree-weight-mean-reversed", loss=loss, reduction="mean", split="reversed",
                        weight=True, sync_free=True, validate=validate, label_smoothing=0.1))
    for loss in ("bce", "crl"):  # every target on the first slice: the other ranks hold no target at all
        out.append(dict(name=f"{loss}-first-weight-mean-uneven", loss=loss, reduction="mean", split="uneven",
                        first=True, weight=True))
    # Ignored rows under a wrong class leading by 40/60/100 (rows 5, 9, 10 ignored too): the
    # reference's backward read the zero stats parallel passes for an ignored row (exp(100) * 0 = NaN).
    # Label smoothing's passes over the slice in blocks of 5 rows (a ragged last block).
    for loss in ("nllr", "bce"):
        out.append(dict(name=f"{loss}-blocks5-smooth-weight-none-uneven", loss=loss, reduction="none", split="uneven",
                        weight=True, label_smoothing=0.3, smooth_blocks=5))
    for loss, backend, red, split, o in (("nllr", "reference", "none", "reversed", {}),
                                         ("nllr", "auto", "none", "reversed", {}),
                                         ("focal", "reference", "mean", "even", {"label_smoothing": 0.1,
                                                                                 "z_loss": 1e-2}),
                                         ("bce", "reference", "sum", "uneven", {"z_loss": 1e-2})):
        out.append(dict(name=f"{loss}-{backend}-ignoredlead-{red}-{split}", loss=loss, reduction=red, split=split,
                        backend=backend, ignore_index=3, weight=True, ignore_leads=True, **o))
    return out


def _head_cases(world: int) -> list[dict]:
    """The head: every loss x five option sets (plain, class weights, smoothing + z-loss + softcap,
    ignore_index = 3, a bias class leading by 60 on one rank), each with one reduction, plus
    float64, 3-D hidden with return_lse, the default chunk_rows, no bias, the reference backend,
    reduce_hidden_grad=False, and a second backward through the same graph."""
    opts = {
        "plain": {},
        "weight": {"class_weight": True},
        "all": {"class_weight": True, "label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 5.0},
        "ignore3": {"ignore_index": 3},
        "lead": {"lead": 60.0},
    }
    out = []
    for loss in LOSSES:
        for i, (name, o) in enumerate(opts.items()):
            red = ("mean", "sum", "none")[(i + len(out)) % 3]
            split = ("even", "uneven", "reversed")[len(out) % 3]
            out.append(dict(name=f"head-{loss}-{name}-{red}-{split}", loss=loss, reduction=red, split=split, **o))
    out += [
        dict(name="head-bce-float64-all-mean-uneven", loss="bce", reduction="mean", split="uneven", dtype="float64",
             class_weight=True, label_smoothing=0.1, z_loss=1e-2, softcap=5.0),
        dict(name="head-focal-3d-lse-none-reversed", loss="focal", reduction="none", split="reversed", lead3d=True,
             return_lse=True),
        dict(name="head-crl-defaultchunk-mean-even", loss="crl", reduction="mean", split="even", chunk_rows=None),
        dict(name="head-nllr-nobias-sum-uneven", loss="nllr", reduction="sum", split="uneven", bias=False),
        dict(name="head-bce-reference-lead-none-even", loss="bce", reduction="none", split="even",
             backend="reference", lead=80.0),
        dict(name="head-ce-partial-mean-uneven", loss="ce", reduction="mean", split="uneven", partial=True),
        dict(name="head-bce-partial-none-reversed", loss="bce", reduction="none", split="reversed", partial=True),
        dict(name="head-lace-twice-mean-uneven", loss="lace", reduction="mean", split="uneven", twice=True),
    ]
    return out


#: Error case -> words its ValueError must contain on every rank.
ERROR_CASES = {"overlap": "an overlap", "gap": "a gap", "rows": "number of rows", "mixed_start": "class_start",
               "dtype": "dtype", "targets": "same global target", "options": "same loss options", "unchecked_range": "must lie in [0, num_classes", "bad_local": "rejected their arguments",
               "head_overlap": "an overlap", "head_rows": "number of rows", "head_dim": "hidden size D",
               "head_chunk": "chunk_rows", "head_grad": "reduce_hidden_grad", "head_bad_local": "rejected their arguments",
               "head_options": "same loss options"}


def _class_elsewhere(c: int, world: int, split: str) -> int:
    """A class on the next rank's slice (not the one that holds class c)."""
    slices = _slices(world, split)
    r = next(r for r, (s, n) in enumerate(slices) if s <= c < s + n)
    return slices[(r + 1) % world][0]


def _data(case: dict, world: int, seed: int):
    sizes, _ = SPLITS[world][case["split"]]
    v = sum(sizes)
    first = min(_slices(world, case["split"]))[1]  # the size of the slice that starts at class 0
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, v, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, first if case.get("first") else v, (N,), generator=g)
    if not case.get("first"):
        t[1] = 0                               # the first class, the last class
        t[2] = v - 1
        x[6, : sizes[0]] = -math.inf           # the first rank's whole slice masked on this row
        t[6] = v - 1
        for start, _ in _slices(world, case["split"]):
            x[12, start] = -math.inf           # every slice's first class (K0) masked, the rest not
        t[12] = max(s for s, n in _slices(world, case["split"]) if n > 1) + 1  # a class not masked
    x[4, t[4]] = x[4].max() + 25.0             # a confident row (p_c rounds to 1 in float32)
    x[5, (t[5] + 1) % v] = x[5].max() + 40.0   # a wrong class leads by 40
    # A wrong class leading by 60, 100 and 200 on another rank than the target's (bce's arg-max w lives
    # elsewhere; in float32 p_w rounds to 1 and a_w = p_w / (1 - p_w) overflows at a lead of 89).
    for row, lead in ((9, 60.0), (10, 100.0), (13, 200.0)):
        k = _class_elsewhere(int(t[row]), world, case["split"])
        x[row, k] = x[row].max() + lead
    ii = case.get("ignore_index", -100)
    t[7] = ii                                  # ignored rows
    t[11] = ii
    if case.get("ignore_leads"):
        t[[5, 9, 10]] = ii                     # ignored rows whose wrong class leads by 40, 60, 100
    if case.get("one_row"):
        x, t = x[8], t[8]
    w = torch.rand(v, generator=g, dtype=torch.float64) + 0.25 if case.get("weight") else None
    return x, t, w


def _slices(world: int, split: str) -> list[tuple[int, int]]:
    sizes, reverse = SPLITS[world][split]
    order = list(reversed(range(world))) if reverse else list(range(world))
    starts, s = [0] * world, 0
    for r in order:
        starts[r] = s
        s += sizes[r]
    return [(starts[r], sizes[r]) for r in range(world)]


def _run_case(case: dict, rank: int, world: int, seed: int) -> str | None:
    import fusedloss as fl
    import fusedloss.parallel as flp
    from fusedloss.parallel import smoothing, target_only

    dtype = getattr(torch, case.get("dtype", "float32"))
    x64, t, w64 = _data(case, world, seed)
    x = x64.to(dtype)
    w = None if w64 is None else w64.to(torch.float32 if dtype != torch.float64 else dtype)
    kw = {k: case[k] for k in ("label_smoothing", "z_loss", "softcap", "alpha", "beta", "gamma", "ignore_index")
          if k in case}
    backend = case.get("backend", "auto")
    start, size = _slices(world, case["split"])[rank]
    _, reverse = SPLITS[world][case["split"]]

    full = x.clone().requires_grad_()
    ref = fl.softmax_loss(full, t, case["loss"], weight=w, reduction=case["reduction"], backend=backend, **kw)
    go = torch.rand(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(ref.dtype)
    ref.backward(go)

    if case.get("view"):  # the slice as a strided view of a wider tensor (rows of stride V), not a copy
        wide = x.clone().requires_grad_()
        local = wide[..., start:start + size]
    else:
        local = x[..., start:start + size].clone().requires_grad_()
    if "validate" in case:
        kw.update(validate=case["validate"], num_classes=None if case["validate"] else x.shape[-1])
    unchecked = "validate" in case and not case["validate"]
    sync_free = target_only._sync_free
    if case.get("sync_free"):
        target_only._sync_free = lambda device: True
    row_blocks = smoothing._row_blocks
    if case.get("smooth_blocks"):
        b = case["smooth_blocks"]
        smoothing._row_blocks = lambda n, vl, cdtype: [(i, min(i + b, n)) for i in range(0, n, b)]
    try:
        out = flp.softmax_loss(local, t, case["loss"], weight=w, reduction=case["reduction"], backend=backend,
                               class_start=start if reverse or unchecked else None, **kw)
        out.backward(go)
    finally:
        target_only._sync_free = sync_free
        smoothing._row_blocks = row_blocks
    if case.get("view"):
        outside = torch.ones(x.shape[-1], dtype=torch.bool)
        outside[start:start + size] = False
        assert not wide.grad[..., outside].any(), "gradient outside the rank's slice"
        local = wide[..., start:start + size]
        local.grad = wide.grad[..., start:start + size]
    tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2}[dtype]
    try:
        assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.dtype, ref.shape)
        # Finite (the extreme rows included) but for label smoothing's term of the masked row 6 (x_k = -inf).
        assert torch.isfinite(local.grad).all(), "a non-finite gradient"
        if not case.get("label_smoothing") or case.get("softcap") or case.get("first"):
            assert torch.isfinite(out).all(), "a non-finite loss"
        torch.testing.assert_close(out, ref.detach(), rtol=tol, atol=tol, equal_nan=True, msg=lambda m: "loss: " + m)
        torch.testing.assert_close(local.grad, full.grad[..., start:start + size], rtol=tol, atol=tol,
                                   msg=lambda m: "grad: " + m)
        if case.get("label_smoothing"):
            _check_oracle(case, x, t, w, kw, go, out, local.grad, start, size)
    except AssertionError as e:
        return str(e)
    return None


def _check_oracle(case, x, t, w, kw, go, out, grad, start, size) -> None:
    """Label smoothing's expected loss against the float64 oracle too (tests/oracle.py): the loss, and
    this rank's slice of the gradient where the oracle's is finite (a row with -inf logits has an
    infinite smoothed loss; the float64 autograd of some losses gives NaN at its -inf entries)."""
    from oracle import assert_close, oracle_loss_and_grad

    okw = {k: v for k, v in kw.items() if k in ("label_smoothing", "z_loss", "softcap", "alpha", "beta", "gamma",
                                                 "ignore_index")}
    x2 = x if x.dim() == 2 else x[None]
    t2 = t.reshape(-1)
    red = case["reduction"]
    go2 = go if go.dim() == 0 else go.reshape(-1)
    o_loss, o_grad = oracle_loss_and_grad(x2, t2, case["loss"], grad_output=go2, weight=w, reduction=red, **okw)
    o_grad = o_grad[:, start:start + size].reshape(grad.shape)
    o_loss = o_loss.reshape(out.shape)
    assert_close(out, o_loss, x.dtype, "loss", "oracle loss")
    fin = torch.isfinite(o_grad)
    assert fin.any(), "no finite oracle gradient"
    assert_close(grad[fin], o_grad[fin], x.dtype, "grad", "oracle grad")


def _head_data(case: dict, world: int, seed: int):
    sizes, _ = SPLITS[world][case["split"]]
    v = sum(sizes)
    dtype = getattr(torch, case.get("dtype", "float32"))
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(HEAD_N, HEAD_D, generator=g, dtype=torch.float64)
    w = torch.randn(v, HEAD_D, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.5
    t = torch.randint(0, v, (HEAD_N,), generator=g)
    ii = case.get("ignore_index", -100)
    t[::6] = ii                                          # ignored rows
    if "lead" in case:  # one class leads every row by ~lead: the arg-max on one rank, most targets elsewhere
        b[_class_elsewhere(0, world, case["split"])] += case["lead"]
    cw = torch.rand(v, generator=g, dtype=torch.float64) + 0.25 if case.get("class_weight") else None
    if case.get("lead3d"):
        h, t = h[:18].reshape(3, 6, HEAD_D), t[:18].reshape(3, 6)
    cast = [a.to(dtype) if a is not None else None for a in (h, w, b, cw)]
    return (*cast, t)


def _run_head_case(case: dict, rank: int, world: int, seed: int) -> str | None:
    import fusedloss as fl
    import fusedloss.parallel as flp

    h, w, b, cw, t = _head_data(case, world, seed)
    if not case.get("bias", True):
        b = None
    kw = {k: case[k] for k in ("label_smoothing", "z_loss", "softcap", "ignore_index", "return_lse") if k in case}
    kw.update(class_weight=cw, reduction=case["reduction"], backend=case.get("backend", "auto"),
              chunk_rows=case.get("chunk_rows", HEAD_CHUNK))
    start, size = _slices(world, case["split"])[rank]
    _, reverse = SPLITS[world][case["split"]]
    leaves = [a.clone().requires_grad_() if a is not None else None for a in (h, w, b)]
    ref = fl.linear_softmax_loss(leaves[0], leaves[1], t, case["loss"], bias=leaves[2], **kw)
    ref, ref_lse = ref if case.get("return_lse") else (ref, None)
    go = torch.rand(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(ref.dtype)
    ref.backward(go)

    mine = [h.clone().requires_grad_(), w[start:start + size].clone().requires_grad_(),
            b[start:start + size].clone().requires_grad_() if b is not None else None]
    out = flp.linear_softmax_loss(mine[0], mine[1], t, case["loss"], bias=mine[2],
                                  class_start=start if reverse else None,
                                  reduce_hidden_grad=not case.get("partial"), **kw)
    out, lse = out if case.get("return_lse") else (out, None)
    times = 2 if case.get("twice") else 1  # a second backward through the same graph recomputes the gradients
    for i in range(times):
        out.backward(go, retain_graph=i + 1 < times)
    expect_dh = leaves[0].grad
    if case.get("partial"):  # reduce_hidden_grad=False: this rank's g_r W_r, from the full logits' gradient
        logits = (h @ w.T + b).reshape(-1, w.shape[0]).requires_grad_()
        kw_l = {k: kw[k] for k in ("label_smoothing", "z_loss", "softcap", "ignore_index", "reduction", "backend")
                if k in kw}
        fl.softmax_loss(logits, t.reshape(-1), case["loss"], weight=cw, **kw_l).backward(go.reshape(-1)
                                                                                        if go.dim() else go)
        expect_dh = (logits.grad[:, start:start + size] @ w[start:start + size]).reshape(h.shape)
    tol = {torch.float32: 1e-5, torch.float64: 1e-10}[h.dtype]
    check = dict(rtol=tol, atol=tol)
    try:
        assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.dtype, ref.shape)
        torch.testing.assert_close(out, ref.detach(), **check, msg=lambda m: "loss: " + m)
        if lse is not None:
            torch.testing.assert_close(lse, ref_lse, **check, msg=lambda m: "lse: " + m)
        torch.testing.assert_close(mine[0].grad, times * expect_dh, **check, msg=lambda m: "d hidden: " + m)
        torch.testing.assert_close(mine[1].grad, times * leaves[1].grad[start:start + size], **check,
                                   msg=lambda m: "d weight: " + m)
        if b is not None:
            torch.testing.assert_close(mine[2].grad, times * leaves[2].grad[start:start + size], **check,
                                       msg=lambda m: "d bias: " + m)
    except AssertionError as e:
        return str(e)
    return None


def _run_head_error_case(name: str, rank: int, world: int) -> str | None:
    import fusedloss.parallel as flp

    v_local, n, d = 3, 5, 4
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = torch.randn(v_local, d, generator=g)
    t = torch.randint(0, v_local * world, (n,), generator=g)
    kw: dict = {}
    if name == "head_overlap":
        kw["class_start"] = max(0, rank * v_local - (1 if rank == world - 1 else 0))
    elif name == "head_rows":
        h = torch.randn(n + (rank == 1), d)
        t = torch.randint(0, v_local * world, (h.shape[0],), generator=torch.Generator().manual_seed(0))
    elif name == "head_dim":
        h, w = torch.randn(n, d + (rank == 0)), torch.randn(v_local, d + (rank == 0))
    elif name == "head_chunk":
        kw["chunk_rows"] = 2 + rank
    elif name == "head_grad":
        h = h.detach().requires_grad_(rank != 0)
    elif name == "head_bad_local":
        w = w.double() if rank == 0 else w
    elif name == "head_options":
        kw["softcap"] = 30.0 if rank == world - 1 else None
    try:
        flp.linear_softmax_loss(h, w, t, "bce", **kw)
    except (ValueError, TypeError) as e:
        own = name == "head_bad_local" and rank == 0
        expect_type, words = (TypeError, "dtype") if own else (ValueError, ERROR_CASES[name])
        if not isinstance(e, expect_type) or words not in str(e):
            return f"raised {type(e).__name__}: {e}"
        return None
    return "did not raise"


def _run_error_case(name: str, rank: int, world: int) -> str | None:
    """Each rank must raise (the same ValueError, or its own error for its own bad argument)."""
    import fusedloss.parallel as flp

    if name.startswith("head_"):
        return _run_head_error_case(name, rank, world)

    v_local = 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, v_local, generator=g)
    t = torch.randint(0, v_local * world, (5,), generator=g)
    kw: dict = {}
    loss = "ce"
    if name == "overlap":
        kw["class_start"] = max(0, rank * v_local - (1 if rank == world - 1 else 0))
    elif name == "gap":
        kw["class_start"] = rank * v_local + (1 if rank == world - 1 else 0)
    elif name == "rows":
        x = torch.randn(5 + (rank == 1), v_local)
        t = torch.randint(0, v_local * world, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    elif name == "mixed_start":
        kw["class_start"] = 0 if rank == 0 else None
    elif name == "dtype":
        x = x.double() if rank == world - 1 else x
    elif name == "targets":
        t[0] = rank
        loss = "bce"
    elif name == "bad_local":
        x = x.to(torch.int64) if rank == 0 else x
    elif name == "options":
        kw["label_smoothing"] = 0.1 if rank == 0 else 0.0
    elif name == "unchecked_range":  # validate=False: each rank checks its own slice against num_classes
        kw.update(validate=False, class_start=rank * v_local, num_classes=v_local - 1)
    try:
        flp.softmax_loss(x, t, loss, **kw)
    except (ValueError, TypeError) as e:
        own = name == "bad_local" and rank == 0   # the rank with the bad argument raises its own error
        expect_type, words = (TypeError, "float16") if own else (ValueError, ERROR_CASES[name])
        if not isinstance(e, expect_type) or words not in str(e):
            return f"raised {type(e).__name__}: {e}"
        return None
    return "did not raise"


def _run_dtensor(rank: int, world: int, seed: int) -> str | None:
    """A DTensor sharded on the class dimension: the local tensor and the mesh group are used, and
    the gradient arrives on the DTensor's local shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    import fusedloss as fl
    import fusedloss.parallel as flp

    mesh = init_device_mesh("cpu", (world,))
    v = 4 * world + 1   # DTensor splits like torch.chunk: uneven, the last shard smaller
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, v, generator=g)
    t = torch.randint(0, v, (N,), generator=g)
    chunks = torch.chunk(x, world, dim=1)
    local = chunks[rank].clone().requires_grad_()
    dx = DTensor.from_local(local, mesh, [Shard(1)], run_check=False, shape=x.shape,
                            stride=x.stride())
    full = x.clone().requires_grad_()
    ref = fl.softmax_loss(full, t, "focal", z_loss=1e-2)
    ref.backward()
    out = flp.softmax_loss(dx, t, "focal", z_loss=1e-2)
    out.backward()
    start = sum(c.shape[1] for c in chunks[:rank])
    try:
        torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(local.grad, full.grad[:, start:start + local.shape[1]], rtol=1e-5, atol=1e-5)
    except AssertionError as e:
        return str(e)

    # The head with its weight and bias DTensors sharded on their rows, Shard(0).
    h = torch.randn(HEAD_N, HEAD_D, generator=g)
    w = torch.randn(v, HEAD_D, generator=g)
    b = torch.randn(v, generator=g)
    leaves = [a.clone().requires_grad_() for a in (h, w, b)]
    ref = fl.linear_softmax_loss(*leaves[:2], t[:HEAD_N], "bce", bias=leaves[2], z_loss=1e-2)
    ref.backward()
    w_loc, b_loc = (torch.chunk(a, world, dim=0)[rank].clone().requires_grad_() for a in (w, b))
    dw = DTensor.from_local(w_loc, mesh, [Shard(0)], run_check=False, shape=w.shape, stride=w.stride())
    db = DTensor.from_local(b_loc, mesh, [Shard(0)], run_check=False, shape=b.shape, stride=b.stride())
    h_mine = h.clone().requires_grad_()
    out = flp.linear_softmax_loss(h_mine, dw, t[:HEAD_N], "bce", bias=db, z_loss=1e-2)
    out.backward()
    rows = slice(start, start + w_loc.shape[0])
    try:
        torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h_mine.grad, leaves[0].grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w_loc.grad, leaves[1].grad[rows], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b_loc.grad, leaves[2].grad[rows], rtol=1e-5, atol=1e-5)
    except AssertionError as e:
        return "head: " + str(e)
    return None


GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")  # the names gloo gives its worker and transport threads


def _gloo_threads() -> list[str]:
    """This process's threads that belong to a gloo process group (Linux: /proc/self/task/*/comm)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(n for n in names if n in GLOO_THREADS)


def init_gloo(rank: int, world: int, init_file: str) -> None:
    """Join a gloo group such that destroy_process_group() really ends it.

    The first call of a ``torch.library`` custom op (fusedloss's reference ops) imports torch._dynamo,
    and that import, made while a process group exists, takes references to it that
    destroy_process_group() does not drop: the group then outlives it with its gloo threads running
    until the interpreter exits, which tore them down mid-flight in ~1 of 5 runs under load (SIGABRT,
    "terminate called without an active exception"). Imported before the group exists, it holds none.
    """
    import torch._dynamo  # noqa: F401  (see above)

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def close_gloo() -> str | None:
    """Leave the group after every rank is done with it (no collective in flight anywhere), destroy it
    and check its threads ended with it; the verdict, None when they did."""
    import gc

    dist.barrier()
    dist.destroy_process_group()
    gc.collect()
    left = _gloo_threads()
    return f"gloo threads still running after destroy_process_group: {left}" if left else None


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, world, init_file)
    results = {}

    def record(name, fn):
        try:
            results[name] = fn()
        except Exception:  # noqa: BLE001 - every failure is reported to the parent, with its traceback
            results[name] = traceback.format_exc()

    for i, case in enumerate(_cases(world)):
        record(case["name"], lambda: _run_case(case, rank, world, 100 + i))
    for i, case in enumerate(_head_cases(world)):
        record(case["name"], lambda: _run_head_case(case, rank, world, 300 + i))
    for name in ERROR_CASES:
        record(f"error-{name}", lambda: _run_error_case(name, rank, world))
        dist.barrier()  # the group still works after every rejected call (no rank left waiting)
    record("dtensor", lambda: _run_dtensor(rank, world, 7))
    record("teardown", close_gloo)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


_RESULTS: dict[int, list[dict]] = {}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    def get(world: int) -> list[dict]:
        if world not in _RESULTS:
            import torch.multiprocessing as mp

            d = tmp_path_factory.mktemp(f"parallel{world}")
            mp.spawn(_worker, args=(world, str(d / "init"), str(d)), nprocs=world, join=True)
            _RESULTS[world] = [json.loads((d / f"rank{r}.json").read_text()) for r in range(world)]
        return _RESULTS[world]
    return get


def _names(world: int) -> list[str]:
    return ([c["name"] for c in _cases(world) + _head_cases(world)] + [f"error-{n}" for n in ERROR_CASES]
            + ["dtensor", "teardown"])


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_matches_single_process(results, world):
    """Every case on every rank: loss and gradient slice equal to fl.softmax_loss on the full
    logits (float32 to 1e-5), every bad call rejected on every rank, and the group's gloo threads
    ended by destroy_process_group() before the process exits ("teardown", see init_gloo)."""
    per_rank = results(world)
    failures = [f"rank {r} {name}: {res[name]}" for r, res in enumerate(per_rank) for name in _names(world)
                if res.get(name, "missing") is not None]
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:20])


def test_case_table_covers_the_issue():
    names = _names(2)
    for loss in LOSSES:
        for opt in ("weight", "smooth", "smooth1", "zloss", "softcap", "all", "ignore3"):
            assert any(n.startswith(f"{loss}-{opt}-") for n in names)
        assert any(n.startswith(f"head-{loss}-") for n in names)
    for red in ("mean", "sum", "none"):
        assert sum(n.startswith("head-") and f"-{red}-" in n for n in names) >= 5
    for red in ("mean", "sum", "none"):
        assert any(f"-{red}-" in n for n in names)
    for split in ("even", "uneven", "reversed"):
        assert sum(n.endswith(split) for n in names) >= 10


def test_training_smoke_under_torchrun(tmp_path):
    """bench/parallel_smoke.py under torchrun (2 gloo processes), a few steps: the split and the
    unsplit loss curves agree (the script exits 1 otherwise) and the report is written."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "parallel_smoke.py"
    out = tmp_path / "smoke.md"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), "--steps", "4", "--classes", "37", "--time-rows", "16", "--time-classes", "64",
           "--repeat", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "Largest difference over 4 steps" in text and ": OK." in text
