"""Two GPU measurements the CPU machine cannot make, in one script (the ``targets`` step of
``bench/gpu/check.sh``):

* **per-call** (issue 24): the fixed cost of one call at small shapes (N x C = 32 x 10, 256 x 100,
  256 x 1000), ``fwd+bwd`` (``loss_fn(x, t).backward()``) and ``fwd no_grad``, every loss on each
  fused backend (``triton``, ``cuda``) beside ``nn.CrossEntropyLoss`` (``F.cross_entropy``) on the
  same CUDA tensors. ``bench/per_call.py``'s interleaved rounds (every function timed in every
  round; the median over the rounds of the mean of ``--calls`` calls, and of the ratio to
  PyTorch's time in the same round), with the clock read after ``torch.cuda.synchronize()``: the
  host's cost per call, the launches included, as a training loop pays it.
* **soft targets** (issue 25): forward + backward of the expected loss for class probabilities
  (``fl.softmax_loss(x, q, loss)``, ``q`` a probability row per sample), every loss on each fused
  backend, beside ``F.cross_entropy(x, q)``, as a multiple of a copy of the logits and the targets
  (read both, write both) timed interleaved in the same run (CUDA events, L2 flushed:
  ``fusedloss.bench.timing``), and of the same backend's soft ``ce`` (the issue's goal: no loss
  over 1.15x soft ce); peak extra memory per step as a multiple of one logits tensor.

The JSON and markdown are rewritten after every row: a run cut by the budget keeps what it
measured. ``--tiny``: the CPU dry run (Triton's interpreter, the ``cpu`` backend for ``cuda``,
tiny shapes, one sample) that proves the script.

    python bench/gpu/targets_bench.py --json targets.json --md targets.md [--classes 32000 1000]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--backends", default="triton,cuda", help="comma-separated fused backends")
    p.add_argument("--classes", type=int, nargs="+", default=[32000, 1000], help="C of the soft-target rows")
    p.add_argument("--elements", type=int, default=1 << 27, help="N = elements // C (default 2^27: 256 MiB of bf16)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["bf16", "fp32"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--calls", type=int, default=100, help="per-call: calls per round")
    p.add_argument("--rounds", type=int, default=5, help="per-call: rounds")
    p.add_argument("--no-per-call", action="store_true")
    p.add_argument("--no-soft", action="store_true")
    p.add_argument("--tiny", action="store_true",
                   help="CPU dry run (the script's plumbing; the kernels have their own tests): backends triton "
                        "(interpreter) and cpu, per-call at 32 x 10 only, soft targets at 32 x 64 in bf16, one sample, "
                        "no memory measurement")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--md", type=Path, default=None)
    a = p.parse_args(argv)
    if a.tiny:
        a.classes, a.elements, a.dtypes, a.warmup, a.repeat, a.calls, a.rounds = [64], 1 << 11, ["bf16"], 0, 1, 1, 1
    return a


def _per_call_module():
    """bench/per_call.py (the CPU table's script): its interleaved rounds and shapes, one definition."""
    spec = importlib.util.spec_from_file_location("per_call", ROOT / "bench" / "per_call.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _markdown(doc: dict) -> str:
    lines = [f"# Per-call cost and soft targets: {doc['device_name']}", "",
             f"torch {doc['torch']}; `{doc['command']}`.", "",
             "## Per call (issue 24)", "",
             "Host time per call, the clock read after `torch.cuda.synchronize()` (launches included); the "
             "median over the rounds of the mean of the calls, and of the time over `nn.CrossEntropyLoss`'s in "
             "the same round (every function timed in every round).", "",
             "| shape | mode | loss | backend | us per call | x nn.CrossEntropyLoss |", "|---|---|---|---|---:|---:|"]
    for r in doc["per_call"]:
        lines.append(f"| {r['shape']} | {r['mode']} | {r['loss']} | {r['backend']} | {_fmt(r.get('us'), '.1f')} | "
                     f"{_fmt(r.get('ratio'), '.2f')} |" + (f" {r['error']}" if r.get("error") else ""))
    lines += ["", "## Soft targets, every loss (issue 25)", "",
              "Forward + backward of the expected loss for class probabilities, as a multiple of a copy of the "
              "logits and the targets (read both, write both) timed interleaved in the same run; `x soft ce`: "
              "over the same backend's soft `ce` (goal: <= 1.15); peak extra memory of one step over one logits "
              "tensor.", "",
              "| dtype | N x C | backend | loss | ms | x copy | x soft ce | peak / logits | note |",
              "|---|---|---|---|---:|---:|---:|---:|---|"]
    ce_ms = {(r["dtype"], r["c"], r["backend"]): r["ms"] for r in doc["soft"] if r["loss"] == "ce" and "ms" in r}
    for r in doc["soft"]:
        base = ce_ms.get((r["dtype"], r["c"], r["backend"]))
        rel = r["ms"] / base if base and "ms" in r else None
        lines.append(f"| {r['dtype']} | {r['n']} x {r['c']} | {r['backend']} | {r['loss']} | {_fmt(r.get('ms'), '.3f')} "
                     f"| {_fmt(r.get('x_copy'), '.2f')} | {_fmt(rel, '.2f')} | {_fmt(r.get('peak_x_logits'), '.2f')} "
                     f"| {r.get('error') or ''} |")
    if doc.get("unavailable"):
        lines += ["", "Not measured: " + "; ".join(f"{k}: {v}" for k, v in doc["unavailable"].items())]
    return "\n".join(lines) + "\n"


def per_call(a, dev: torch.device, backends: list[str], doc: dict, save) -> int:
    """The per-call rows: bench/per_call.py's rounds on ``dev``, every loss on every backend."""
    import fusedloss as fl

    pc = _per_call_module()
    shapes = pc.SHAPES[:1] if a.tiny else pc.SHAPES

    def clock():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    def on_shape(rows):
        doc["per_call"][:] = rows
        save()

    rows = pc.measure(backends, a.calls, a.rounds, fl.LOSSES, clock, device=dev, shapes=shapes, on_shape=on_shape)
    return sum("error" in r for r in rows)


def soft(a, dev: torch.device, backends: list[str], doc: dict, save) -> int:
    """The soft-target rows: every loss on every backend and F.cross_entropy, x a copy of both tensors."""
    import fusedloss as fl
    from gpubench_rows import measure_row

    failed = 0
    for dname in a.dtypes:
        dtype = DTYPES[dname]
        for c in a.classes:
            n = max(2, a.elements // c)
            g = torch.Generator().manual_seed(0)
            x = (2 * torch.randn(n, c, generator=g)).to(dtype).to(dev)
            # a probability row per sample, in the logits' dtype (as timm's mixup targets are)
            q = torch.softmax(3 * torch.randn(n, c, generator=g), 1).to(dtype).to(dev)
            x2, q2 = torch.empty_like(x), torch.empty_like(q)
            leaf = x.detach().clone().requires_grad_(True)

            def copy():
                x2.copy_(x)
                q2.copy_(q)

            def step_of(fn):
                def step():
                    leaf.grad = None
                    out = fn(leaf)
                    out.backward()
                    return out.detach()
                return step

            methods = [(b, loss, step_of(lambda z, b=b, loss=loss: fl.softmax_loss(z, q, loss, backend=b)))
                       for b in backends for loss in fl.LOSSES]
            methods.append(("torch", "ce", step_of(lambda z: F.cross_entropy(z, q))))
            for b, loss, step in methods:
                row = {"dtype": dname, "c": c, "n": n, "backend": b, "loss": loss}
                failed += not measure_row(row, step, copy, dev, a.warmup, a.repeat,
                                          None if a.tiny else x.numel() * x.element_size(), "loss_value")
                doc["soft"].append(row)
                save()
            del x, q, x2, q2, leaf, methods
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return failed


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    sys.path.insert(0, str(ROOT / "python"))  # a checkout without PYTHONPATH
    import fusedloss as fl
    from gpubench_rows import finish, saver

    dev = torch.device("cpu" if a.tiny else a.device)
    backends = ["triton", "cpu"] if a.tiny else a.backends.split(",")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (Triton interpreter)"
    doc = {"tool": "bench/gpu/targets_bench.py", "command": " ".join(["python bench/gpu/targets_bench.py",
                                                                        *(argv or sys.argv[1:])]),
           "device": str(dev), "device_name": name, "torch": torch.__version__, "per_call": [], "soft": [],
           "unavailable": {}, "complete": False}
    usable = []
    for b in backends:
        reason = None if b in fl.available_backends() else f"not available here ({fl.available_backends()})"
        if reason:
            doc["unavailable"][b] = reason
        else:
            usable.append(b)

    save = saver(doc, a.json, a.md, _markdown)

    save()
    failed = 0
    if not a.no_per_call:
        failed += per_call(a, dev, usable, doc, save)
    if not a.no_soft:
        failed += soft(a, dev, usable, doc, save)
    return finish(doc, save, a.md, failed)


if __name__ == "__main__":
    sys.exit(main())
