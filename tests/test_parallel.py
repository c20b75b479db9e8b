"""fusedloss.parallel: vocabulary-parallel losses over gloo processes on the CPU.

One process group per world size (2 and 4) runs every case below and writes its verdicts to a
file; each case is then one test here. Every rank builds the same full ``(N, V)`` logits from a
seed, computes the single-process loss and gradient with ``fl.softmax_loss`` on them (the
library's own result, itself tested against float64 oracles elsewhere), and compares its own
loss and its slice of the gradient with ``fusedloss.parallel.softmax_loss`` on its slice:
together the ranks' slices cover the whole gradient. Error cases must raise on every rank.
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
N = 24

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
    for loss in TARGET_ONLY:
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
    return out


#: Error case -> words its ValueError must contain on every rank.
ERROR_CASES = {"overlap": "an overlap", "gap": "a gap", "rows": "number of rows", "mixed_start": "class_start",
               "dtype": "dtype", "targets": "same global target", "bce": "bce", "bad_local": "rejected their arguments"}


def _data(case: dict, world: int, seed: int):
    sizes, _ = SPLITS[world][case["split"]]
    v = sum(sizes)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, v, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, v, (N,), generator=g)
    t[1] = 0                                   # the first class, the last class
    t[2] = v - 1
    x[4, t[4]] = x[4].max() + 25.0             # a confident row (p_c rounds to 1 in float32)
    x[5, (t[5] + 1) % v] = x[5].max() + 40.0   # a wrong class leads by 40
    x[6, : sizes[0]] = -math.inf               # the first rank's whole slice masked on this row
    t[6] = v - 1
    ii = case.get("ignore_index", -100)
    t[7] = ii                                  # ignored rows
    t[11] = ii
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
    out = flp.softmax_loss(local, t, case["loss"], weight=w, reduction=case["reduction"], backend=backend,
                           class_start=start if reverse else None, **kw)
    out.backward(go)
    if case.get("view"):
        outside = torch.ones(x.shape[-1], dtype=torch.bool)
        outside[start:start + size] = False
        assert not wide.grad[..., outside].any(), "gradient outside the rank's slice"
        local = wide[..., start:start + size]
        local.grad = wide.grad[..., start:start + size]
    tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2}[dtype]
    try:
        assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.dtype, ref.shape)
        torch.testing.assert_close(out, ref.detach(), rtol=tol, atol=tol, equal_nan=True, msg=lambda m: "loss: " + m)
        torch.testing.assert_close(local.grad, full.grad[..., start:start + size], rtol=tol, atol=tol,
                                   msg=lambda m: "grad: " + m)
    except AssertionError as e:
        return str(e)
    return None


def _run_error_case(name: str, rank: int, world: int) -> str | None:
    """Each rank must raise (the same ValueError, or its own error for its own bad argument)."""
    import fusedloss.parallel as flp

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
    elif name == "bce":
        loss = "bce"
    elif name == "bad_local":
        x = x.to(torch.int64) if rank == 0 else x
    try:
        flp.softmax_loss(x, t, loss, **kw)
    except NotImplementedError as e:
        return None if name == "bce" and "bce" in str(e) else f"unexpected NotImplementedError: {e}"
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
    ref = fl.softmax_loss(full, t, "focal", label_smoothing=0.1)
    ref.backward()
    out = flp.softmax_loss(dx, t, "focal", label_smoothing=0.1)
    out.backward()
    start = sum(c.shape[1] for c in chunks[:rank])
    try:
        torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(local.grad, full.grad[:, start:start + local.shape[1]], rtol=1e-5, atol=1e-5)
    except AssertionError as e:
        return str(e)
    return None


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}

    def record(name, fn):
        try:
            results[name] = fn()
        except Exception:  # noqa: BLE001 - every failure is reported to the parent, with its traceback
            results[name] = traceback.format_exc()

    for i, case in enumerate(_cases(world)):
        record(case["name"], lambda: _run_case(case, rank, world, 100 + i))
    for name in ERROR_CASES:
        record(f"error-{name}", lambda: _run_error_case(name, rank, world))
        dist.barrier()  # the group still works after every rejected call (no rank left waiting)
    record("dtensor", lambda: _run_dtensor(rank, world, 7))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


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
    return ([c["name"] for c in _cases(world)] + [f"error-{n}" for n in ERROR_CASES] + ["dtensor"])


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_matches_single_process(results, world):
    """Every case on every rank: loss and gradient slice equal to fl.softmax_loss on the full
    logits (float32 to 1e-5), and every bad call rejected on every rank."""
    per_rank = results(world)
    failures = [f"rank {r} {name}: {res[name]}" for r, res in enumerate(per_rank) for name in _names(world)
                if res.get(name, "missing") is not None]
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:20])


def test_case_table_covers_the_issue():
    names = _names(2)
    for loss in TARGET_ONLY:
        for opt in ("weight", "smooth", "zloss", "softcap", "ignore3"):
            assert any(n.startswith(f"{loss}-{opt}-") for n in names)
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
