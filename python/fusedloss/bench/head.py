"""``fusedloss-bench --head`` (or ``python -m fusedloss.bench.head``): the LLM head.

Forward + backward of ``loss(hidden @ weight.T, target)`` with gradients w.r.t. ``hidden``
and ``weight``, for

* ``floor``: the three matmuls alone (``h @ W.T``; ``g @ W``; ``g.T @ h`` with a ready-made
  ``g``), timed in the same run: every head has to do them, so times are reported as
  multiples of this floor;
* ``fused``: :func:`fusedloss.linear_softmax_loss` (chunked GEMMs + the fused loss kernel);
* ``eager F.cross_entropy`` and ``eager fl.softmax_loss``: the logits materialized;
* ``compiled F.cross_entropy``: ``torch.compile`` of the eager CE head (inductor);
* ``liger`` (``LigerFusedLinearCrossEntropyLoss``) and ``cce`` (cut-cross-entropy's
  ``linear_cross_entropy``) when installed and on a GPU (both are Triton/CUDA kernels).

Peak extra memory (everything the step allocates, the gradients included) is reported as a
multiple of the ``(N, V)`` logits' bytes: CUDA from the caching allocator; CPU from
``fusedloss.memtrack`` (which cannot see inside inductor-generated code, so the compiled
row has no CPU memory figure).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import fusedloss as fl

from . import machine, memory, timing

MIB = 2**20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fusedloss-bench --head", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096, help="rows (batch x sequence)")
    p.add_argument("--d", type=int, default=512, help="hidden size")
    p.add_argument("--v", type=int, default=32000, help="vocabulary size")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--loss", default="ce,crl,bce", help="comma-separated losses for the fused head")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    return p.parse_args(argv)


def _methods(args, h, w, t, g_ready) -> list[tuple[str, str, Callable | None, str]]:
    """(method, loss, step or None, note)."""
    dev = h.device
    out: list[tuple[str, str, Callable | None, str]] = []

    def floor():
        x = h.detach() @ w.detach().T
        dh = g_ready @ w.detach()
        dw = g_ready.T @ h.detach()
        return x, dh, dw

    out.append(("floor (3 matmuls)", "-", floor, ""))
    for loss in args.loss.split(","):
        def fused(loss=loss):
            val = fl.linear_softmax_loss(h, w, t, loss)
            return torch.autograd.grad(val, (h, w))
        out.append(("fused linear_softmax_loss", loss, fused, ""))

    def eager_ce():
        val = F.cross_entropy((h @ w.T).float(), t)
        return torch.autograd.grad(val, (h, w))

    def eager_fl(loss="ce"):
        val = fl.softmax_loss(h @ w.T, t, loss)
        return torch.autograd.grad(val, (h, w))

    out.append(("eager F.cross_entropy(h @ W.T)", "ce", eager_ce, ""))
    for loss in args.loss.split(","):
        out.append(("eager fl.softmax_loss(h @ W.T)", loss, lambda loss=loss: eager_fl(loss), ""))
    if args.no_compile:
        out.append(("compiled F.cross_entropy(h @ W.T)", "ce", None, "skipped (--no-compile)"))
    else:
        compiled = torch.compile(lambda h, w, t: F.cross_entropy((h @ w.T).float(), t))

        def comp():
            return torch.autograd.grad(compiled(h, w, t), (h, w))
        out.append(("compiled F.cross_entropy(h @ W.T)", "ce", comp, ""))
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as e:  # noqa: BLE001 - any import failure: not installed here
        out.append(("liger fused linear CE", "ce", None, f"not installed ({type(e).__name__})"))
    else:
        if dev.type != "cuda":
            out.append(("liger fused linear CE", "ce", None, "n/a on CPU (Triton kernels on CUDA tensors)"))
        else:
            liger = LigerFusedLinearCrossEntropyLoss()
            out.append(("liger fused linear CE", "ce",
                        lambda: torch.autograd.grad(liger(w, h, t), (h, w)), ""))
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as e:  # noqa: BLE001
        out.append(("cut-cross-entropy", "ce", None, f"not installed ({type(e).__name__})"))
    else:
        if dev.type != "cuda":
            out.append(("cut-cross-entropy", "ce", None, "n/a on CPU (Triton kernels on CUDA tensors)"))
        else:
            out.append(("cut-cross-entropy", "ce",
                        lambda: torch.autograd.grad(linear_cross_entropy(h, w, t), (h, w)), ""))
    return out


def run(args: argparse.Namespace) -> dict[str, object]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    allocator = "system"
    if dev.type == "cpu":
        from .allocator import keep_freed_memory
        allocator = keep_freed_memory()
    gen = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(args.n, args.d, generator=gen).to(dev, dtype).requires_grad_(True)
    w = (torch.randn(args.v, args.d, generator=gen) / args.d ** 0.5).to(dev, dtype).requires_grad_(True)
    t = torch.randint(0, args.v, (args.n,), generator=gen).to(dev)
    g_ready = torch.randn(args.n, args.v, generator=gen).to(dev, dtype) * 1e-4
    logits_bytes = args.n * args.v * h.element_size()
    info = machine.describe(dev)
    info["cpu_allocator"] = allocator
    info["loadavg_1m_start"] = machine.loadavg()
    records = []
    floor_ms = None
    for method, loss, step, note in _methods(args, h, w, t, g_ready):
        rec: dict[str, object] = {"method": method, "loss": loss, "note": note}
        if step is not None:
            try:
                tm = timing.measure(step, dev, args.warmup, args.repeat)
                rec.update(tm.as_dict())
                if floor_ms is None:
                    floor_ms = tm.median_ms
                rec["x_floor"] = tm.median_ms / floor_ms
                if method.startswith("compiled") and dev.type == "cpu":
                    rec["note"] = "memory n/a: inductor's CPU code allocates outside the dispatcher"
                else:
                    peak = memory.peak_extra_bytes(step, dev)
                    rec["peak_extra_bytes"] = peak
                    rec["x_logits"] = peak / logits_bytes
            except Exception as e:  # noqa: BLE001 - report the cell, keep going
                rec["error"] = f"{type(e).__name__}: {e}"[:300]
        records.append(rec)
        print(_row(rec), file=sys.stderr, flush=True)
    info["loadavg_1m_end"] = machine.loadavg()
    return {
        "command": "",  # set by main()
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": info,
        "logits_bytes": logits_bytes,
        "results": records,
    }


def _fmt(v, spec):
    return "–" if v is None else format(v, spec)


def _row(r: dict) -> str:
    return (f"| {r['method']} | {r['loss']} | {_fmt(r.get('median_ms'), '.0f')} | {_fmt(r.get('x_floor'), '.2f')} | "
            f"{_fmt(r.get('peak_extra_bytes') and r['peak_extra_bytes'] / MIB, '.0f')} | "
            f"{_fmt(r.get('x_logits'), '.2f')} | {r.get('error') or r.get('note') or ''} |")


def markdown(doc: dict) -> str:
    c, m = doc["config"], doc["machine"]
    lines = [f"# LLM head: N {c['n']}, D {c['d']}, V {c['v']}, {c['dtype']}, {c['device']}",
             "",
             f"`{doc['command'].strip()}` on {machine.one_line(m)}; load average (1 min) "
             f"{m.get('loadavg_1m_start')} at the start, {m.get('loadavg_1m_end')} at the end.",
             "",
             "Forward + backward (gradients w.r.t. hidden and weight). `x floor`: median time over the "
             "three matmuls' (`h @ W.T`, `g @ W`, `g.T @ h`) in the same run. `x logits`: peak extra "
             f"memory over the (N, V) logits' {doc['logits_bytes'] / MIB:.0f} MiB (gradients included).",
             "",
             "| method | loss | median ms | x floor | peak extra MiB | x logits | note |",
             "|---|---|---|---|---|---|---|"]
    lines += [_row(r) for r in doc["results"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    doc = run(args)
    doc["command"] = "fusedloss-bench --head " + " ".join(argv)
    md = markdown(doc)
    print(md)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(md)
    return 1 if any(r.get("error") for r in doc["results"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
