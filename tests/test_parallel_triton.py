"""fusedloss.parallel on the Triton backend, under Triton's CPU interpreter: two gloo processes.

tests/test_parallel.py covers the split losses on the cpu and reference backends. The split
path leans on each backend's statistics layout (the forward's ``lse``, ``lse_ex``, bce's arg-max
column) and on its backward reading global statistics in their place, so the Triton kernels are
checked here too, against the float64 oracle: every loss, with options, a rank holding no target
of a row, a masked (-inf) logit at a rank's first class (the fake target), a wrong class leading
by 60 on another rank than the target's, an ignored row, on-chip rows and a streamed one
(V_local > 4096). Each rank compares its loss and its slice of the gradient; bce's second round
must run the Triton backend's ops (fusedloss::triton_bce_partial / triton_bce_global_bwd, seen
by the profiler).
"""
from __future__ import annotations

import json
import math
import os
import traceback

import pytest
import torch

from oracle import assert_close, oracle_loss_and_grad
from test_parallel import close_gloo, init_gloo

LOSSES = ("ce", "bce", "nllr", "crl", "lace", "focal")
OPTIONS = {"plain": {}, "smooth_z": {"label_smoothing": 0.1, "z_loss": 1e-2}, "cap": {"softcap": 5.0},
           "weight_sum": {"weight": True, "reduction": "sum"}}
#: (V, the two ranks' slice sizes, the option sets): a short uneven split, and one whose second slice
#: streams (the Triton kernels keep rows of up to 4096 classes on chip).
SHAPES = ((14, (5, 9), tuple(OPTIONS)), (9000, (4000, 5000), ("plain", "smooth_z")))
N = 6


def _cases() -> list[dict]:
    # smooth_z for every loss: label smoothing's expected term (docs/losses.md) over the split rounds
    return [dict(loss=loss, option=o, v=v, sizes=sizes) for v, sizes, opts in SHAPES for o in opts for loss in LOSSES]


def _data(case: dict, seed: int):
    v, sizes = case["v"], case["sizes"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, v, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, v, (N,), generator=g)
    t[1] = -100                                  # an ignored row
    if case["option"] != "smooth_z":             # smoothing's sum_k x_k is -inf on a masked row
        x[2, 0] = -math.inf                      # rank 0's first class, the fake target of row 2
        t[2] = v - 1                             # whose target lives on rank 1
    t[3] = 1                                     # target on rank 0, a wrong class on rank 1 leads by 60
    x[3, v - 2] = x[3].max() + 60
    t[4] = sizes[0]                              # rank 1's first class
    w = torch.rand(v, generator=g, dtype=torch.float64) + 0.25 if OPTIONS[case["option"]].get("weight") else None
    return x, t, w


def _run(case: dict, rank: int, seed: int) -> str | None:
    import fusedloss.parallel as flp

    x64, t, w64 = _data(case, seed)
    opts = {k: v for k, v in OPTIONS[case["option"]].items() if k != "weight"}
    reduction = opts.pop("reduction", "mean")
    x = x64.float()
    w = None if w64 is None else w64.float()
    ref, ref_g = oracle_loss_and_grad(x, t, case["loss"], weight=w, reduction=reduction, **opts)
    start = sum(case["sizes"][:rank])
    local = x[:, start:start + case["sizes"][rank]].clone().requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = flp.softmax_loss(local, t, case["loss"], weight=w, reduction=reduction, backend="triton", **opts)
        out.backward()
    if case["loss"] == "bce":  # bce's second round on the Triton backend's own ops (split_vocab/launch.py)
        called = {e.key for e in prof.key_averages()}
        missing = {"fusedloss::triton_bce_partial", "fusedloss::triton_bce_global_bwd"} - called
        if missing:
            return f"bce did not call {sorted(missing)}"
    try:
        assert_close(out.detach(), ref, torch.float32, "loss")
        assert_close(local.grad, ref_g[:, start:start + local.shape[1]], torch.float32, "grad")
    except AssertionError as e:
        return str(e)[-1500:]
    return None


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before fusedloss imports triton
    init_gloo(rank, world, init_file)  # torch._dynamo imported first: destroy_process_group then ends the group
    results = {}
    for i, case in enumerate(_cases()):
        name = f"{case['loss']}-{case['option']}-V{case['v']}"
        try:
            results[name] = _run(case, rank, 500 + i)
        except Exception:  # noqa: BLE001 - reported to the parent with its traceback
            results[name] = traceback.format_exc()
    results["teardown"] = close_gloo()  # the group's gloo threads ended before the process exits
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def test_triton_backend_split_over_two_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(len(res) == len(_cases()) + 1 for res in per_rank)  # and "teardown"
    failures = [f"rank {r} {name}: {msg}" for r, res in enumerate(per_rank) for name, msg in res.items() if msg]
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:10])


@pytest.mark.parametrize("case", _cases()[:1])
def test_case_data_covers_the_ranks(case):
    """The rows meant to sit on a given rank do (the test above relies on it)."""
    x, t, _ = _data(case, 0)
    s0 = case["sizes"][0]
    assert t[2] >= s0 and x[2, 0] == -math.inf and t[3] < s0 and x[3, case["v"] - 2] == x[3].max() and t[4] == s0
