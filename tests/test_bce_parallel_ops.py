"""The C++ CPU ops of a vocabulary-parallel bce row given its global numbers
(fusedloss::ext_bce_partial, fusedloss::ext_bce_global_bwd; layout in ops.BCE_PARTIAL_SCHEMA's
comment), checked against a float64 evaluation written here from docs/losses.md's definitions:
the partial sums term by term, and the gradient by autograd of the loss
L = -log p_c - sum_{k != c} log(1 - p_k) (log(1 - p_w) as lse_{k != w} - lse, exact for any lead),
of the soft-capped logits where a cap is given.

The same checks run on the Triton backend's twins (fusedloss::triton_bce_partial /
triton_bce_global_bwd, triton_kernels/split_vocab/launch.py), parametrized by ``backend``: those
cases need Triton's CPU interpreter (TRITON_INTERPRET=1, fixed when triton is imported), so in a
plain run they are skipped here and tests/test_triton_bce_parallel.py runs them in a subprocess.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("fusedloss._C")

from fusedloss import dispatch, ops  # noqa: E402

PARTIAL = torch.ops.fusedloss.ext_bce_partial.default
GLOBAL_BWD = torch.ops.fusedloss.ext_bce_global_bwd.default
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ("cpu", "triton")


def _ops(backend: str):
    """(partial, global_bwd) of a backend: the C++ CPU ops, or the Triton ones under the interpreter."""
    if backend == "cpu":
        return PARTIAL, GLOBAL_BWD
    if not INTERPRET:
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1 (tests/test_triton_bce_parallel.py runs it)")
    pytest.importorskip("triton")
    be = dispatch.resolve("triton", torch.device("cpu"))
    sv = be.family(ops.SplitVocabOps)
    return sv.bce_partial, sv.bce_global_bwd


# Per row: (where c is, where w is, the arg-max's lead over the row's other logits). "local": in
# the slice under test, "else": on another rank, "same": w == c (in the slice or elsewhere, by w's
# place), None: an ignored row.
SCENARIOS = [
    ("local", "local", 0.5), ("local", "else", 0.5), ("else", "local", 0.5), ("else", "else", 0.5),
    ("same", "local", 0.5), ("same", "else", 0.5), (None, "local", 0.5),
    ("local", "else", 60.0), ("else", "local", 60.0), ("local", "local", 100.0), ("else", "else", 100.0),
    ("same", "local", 100.0), ("same", "else", 60.0), ("local", "local", 10.0), ("else", "local", 25.0),
]


def _rows(vl: int, dtype, seed: int, ranks: int = 3, rank: int = 1):
    """Full float64 logits (rounded through dtype, as every rank holds them), the slice
    ``[cs, cs + vl)`` under test, global targets (-1: ignored) and the arg-max of each row."""
    g = torch.Generator().manual_seed(seed)
    v = vl * ranks
    cs = rank * vl
    n = len(SCENARIOS)
    full = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    t = torch.empty(n, dtype=torch.long)
    w = torch.empty(n, dtype=torch.long)

    def pick(where: str) -> int:
        if where == "local":
            return cs + int(torch.randint(vl, (1,), generator=g))
        other = int(torch.randint(v - vl, (1,), generator=g))
        return other if other < cs else other + vl

    for i, (c_at, w_at, lead) in enumerate(SCENARIOS):
        w[i] = pick(w_at)
        if c_at == "same":
            t[i] = w[i]
        elif c_at is None:
            t[i] = -1
        else:
            c = pick(c_at)
            while c == w[i]:
                c = pick(c_at)
            t[i] = c
        full[i, w[i]] = full[i].max() + lead
    full = full.to(dtype).to(torch.float64)
    assert torch.equal(full.argmax(1), w)
    return full, cs, t, w


def _capped(x: torch.Tensor, softcap: float) -> torch.Tensor:
    return softcap * torch.tanh(x / softcap) if softcap else x


def _global_numbers(full: torch.Tensor, t: torch.Tensor, w: torch.Tensor, softcap: float = 0.0):
    """float64 lse, R = sum_{k != w} a_k (a_c = -1), log(1 - p_w), x_w, and a_k, log(1 - p_k) per class,
    of the (capped) logits."""
    full = _capped(full, softcap)
    assert torch.equal(full.argmax(1), w)
    lse = torch.logsumexp(full, 1)
    p = torch.exp(full - lse[:, None])
    rows = torch.arange(full.shape[0])
    off_w = full.clone()
    off_w[rows, w] = -torch.inf
    log1m_pw = torch.logsumexp(off_w, 1) - lse
    a = p / (1 - p)
    log1m = torch.log1p(-p)
    a_r = a.clone()
    a_r[rows, w] = 0
    keep = t >= 0
    a_r[rows[keep], t[keep]] = torch.where(w[keep] == t[keep], 0.0, -1.0).to(a_r.dtype)
    r = a_r.sum(1)
    return lse, r, log1m_pw, full[rows, w], a, log1m


def _slice_idx(t, w, cs, vl):
    none = torch.full_like(t, -1)
    c_loc = torch.where((t >= cs) & (t < cs + vl), t - cs, none)
    w_loc = torch.where((w >= cs) & (w < cs + vl) & (t >= 0), w - cs, none)
    kind = torch.where(t >= 0, (w == t).long(), none)
    return torch.stack([c_loc, w_loc, kind], 1)


def _grad_by_autograd(full, t, w, own, z, softcap):
    """d/dx of own_i (L_i + z lse_i^2) in float64 (0 on ignored rows), x the raw logits."""
    raw = full.clone().requires_grad_()
    x = _capped(raw, softcap)
    rows = torch.arange(x.shape[0])
    lse = torch.logsumexp(x, 1)
    keep = t >= 0
    c = t.clamp(min=0)
    mask_c = torch.zeros_like(full, dtype=torch.bool)
    mask_c[rows, c] = True
    mask_w = torch.zeros_like(mask_c)
    mask_w[rows, w] = True
    nll = lse - x[rows, c]                                        # -log p_c
    log1m_pw = torch.logsumexp(x.masked_fill(mask_w, -torch.inf), 1) - lse
    # p_k = 0 at c and w before the log1p (p_w may round to 1: log1p(-1) has no gradient).
    log1m_rest = torch.log1p(-torch.exp(x - lse[:, None]).masked_fill(mask_c | mask_w, 0.0)).sum(1)
    loss = nll - log1m_rest - torch.where(w == c, 0.0, log1m_pw) + z * lse.square()
    (torch.where(keep, own * loss, 0.0)).sum().backward()
    return raw.grad


DTYPES = [(torch.float32, 1e-7, 1e-5), (torch.bfloat16, 1e-7, 1e-2), (torch.float64, 1e-14, 1e-12)]


def _as_slice(full, cs, vl, dtype, strided: bool):
    x = full[:, cs:cs + vl].to(dtype)
    if strided:  # rows of a wider buffer: row stride > V_local
        buf = torch.zeros(x.shape[0], vl + 13, dtype=dtype)
        buf[:, 5:5 + vl] = x
        x = buf[:, 5:5 + vl]
        assert x.stride(0) == vl + 13
    return x


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("vl,strided,softcap", [(37, False, 0.0), (5000, True, 0.0), (4099, False, 0.0),
                                                (37, False, 5.0), (4099, True, 30.0)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_sums(dtype, atol, rtol, vl, strided, softcap, backend):
    PARTIAL, _ = _ops(backend)
    full, cs, t, w = _rows(vl, dtype, seed=vl)
    lse, r, log1m_pw, x_w, a, log1m = _global_numbers(full, t, w, softcap)
    idx = _slice_idx(t, w, cs, vl)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    stats = torch.stack([lse, torch.full_like(lse, torch.nan), log1m_pw, x_w], 1).to(acc)  # only lse is read
    out = PARTIAL(_as_slice(full, cs, vl, dtype, strided), stats, idx, softcap)
    assert out.dtype == acc and out.shape == (len(SCENARIOS), 2)
    # Expected: over the slice's classes but c and w.
    rows = torch.arange(full.shape[0])
    skip = torch.zeros_like(full, dtype=torch.bool)
    skip[rows, w] = True
    keep = t >= 0
    skip[rows[keep], t[keep]] = True
    sl = slice(cs, cs + vl)

    def local_sum(terms):
        return terms[:, sl].masked_fill(skip[:, sl], 0).sum(1)

    want = torch.stack([local_sum(log1m), local_sum(a)], 1)
    want[~keep] = 0
    # Each term to the math type's rounding of p_k (lse rounded to acc: relative 2^-24 |lse| for float32).
    scale = torch.stack([local_sum(-log1m), local_sum(a)], 1)
    tol = atol + rtol * scale * (1 + lse.abs()[:, None])
    assert ((out.double() - want).abs() <= tol).all(), (out.double() - want).abs().max()
    assert torch.equal(out[~keep], torch.zeros_like(out[~keep]))


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("vl,strided,z,softcap", [(37, False, 0.0, 0.0), (5000, True, 0.01, 0.0),
                                                  (4099, False, 0.0, 0.0), (37, False, 0.01, 5.0),
                                                  (4099, True, 0.0, 30.0)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_given_global_r(dtype, atol, rtol, vl, strided, z, softcap, backend):
    _, GLOBAL_BWD = _ops(backend)
    full, cs, t, w = _rows(vl, dtype, seed=vl + 1)
    lse, r, log1m_pw, x_w, _, _ = _global_numbers(full, t, w, softcap)
    idx = _slice_idx(t, w, cs, vl)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    own = torch.linspace(-1.5, 2.0, len(SCENARIOS), dtype=torch.float64)
    own[t < 0] = 0
    stats = torch.stack([lse, r, log1m_pw, x_w], 1).to(acc)
    x = _as_slice(full, cs, vl, dtype, strided)
    out = GLOBAL_BWD(own.to(acc), x, stats, idx, z, softcap)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    want = _grad_by_autograd(full, t, w, own, z, softcap)[:, cs:cs + vl]
    assert torch.isfinite(want).all()
    err = (out.double() - want).abs()
    # Relative to the entry (bfloat16's rounding of the output), and absolute to the row's scale:
    # an entry is own times terms of at most ~1 + |R|, each p_j = exp(x_j - lse) with lse rounded
    # to the math type (relative error ~ eps |lse|).
    row_scale = own.abs() * (1 + r.abs()) * (1 + lse.abs())
    bad = err > rtol * want.abs() + atol * row_scale[:, None]
    assert not bad.any(), (err.max(), bad.nonzero()[:5])
    assert torch.equal(out[t < 0], torch.zeros_like(out[t < 0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_checks(backend):
    PARTIAL, GLOBAL_BWD = _ops(backend)
    x = torch.randn(2, 5)
    stats = torch.zeros(2, 4)
    idx = torch.tensor([[0, 1, 0], [-1, -1, 1]])
    PARTIAL(x, stats, idx, 0.0)
    with pytest.raises(IndexError, match="out of range"):
        PARTIAL(x, stats, torch.tensor([[5, 1, 0], [-1, -1, 1]]), 0.0)
    with pytest.raises(RuntimeError, match="says w == c"):
        PARTIAL(x, stats, torch.tensor([[0, 1, 1], [-1, -1, 1]]), 0.0)
    with pytest.raises(RuntimeError, match="says w != c"):
        PARTIAL(x, stats, torch.tensor([[2, 2, 0], [-1, -1, 1]]), 0.0)
    with pytest.raises(RuntimeError, match="slice_idx"):
        PARTIAL(x, stats, idx.int(), 0.0)
    with pytest.raises(RuntimeError, match="stats"):
        PARTIAL(x, stats[:, :3], idx, 0.0)
    with pytest.raises(RuntimeError, match="grad_rows"):
        GLOBAL_BWD(torch.zeros(3), x, stats, idx, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="softcap"):
        PARTIAL(x, stats, idx, -1.0)
    with pytest.raises(RuntimeError, match="z_loss"):
        GLOBAL_BWD(torch.zeros(2), x, stats, idx, -1.0, 0.0)


def test_schemas_and_backend():
    assert str(PARTIAL._schema) == f"fusedloss::ext_bce_partial{ops.BCE_PARTIAL_SCHEMA}"
    assert str(GLOBAL_BWD._schema) == f"fusedloss::ext_bce_global_bwd{ops.BCE_GLOBAL_BWD_SCHEMA}"
    be = dispatch.resolve("cpu", torch.device("cpu"))
    sv = be.family(ops.SplitVocabOps)
    assert sv.bce_partial is PARTIAL and sv.bce_global_bwd is GLOBAL_BWD
    assert dispatch.resolve("reference", torch.device("cpu")).family(ops.SplitVocabOps) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    PARTIAL, GLOBAL_BWD = _ops(backend)
    full, cs, t, w = _rows(7, torch.float64, seed=3)
    lse, r, log1m_pw, x_w, _, _ = _global_numbers(full, t, w)
    idx = _slice_idx(t, w, cs, 7)
    stats = torch.stack([lse, r, log1m_pw, x_w], 1)
    x = full[:, cs:cs + 7].contiguous()
    own = torch.linspace(-1, 1, len(SCENARIOS), dtype=torch.float64)
    torch.library.opcheck(PARTIAL, (x, stats, idx, 0.0))
    torch.library.opcheck(GLOBAL_BWD, (own, x, stats, idx, 0.01, 0.0))
    torch.library.opcheck(PARTIAL, (x.float(), stats.float(), idx, 0.0))
    torch.library.opcheck(GLOBAL_BWD, (own.float(), x.float(), stats.float(), idx, 0.0, 5.0))
