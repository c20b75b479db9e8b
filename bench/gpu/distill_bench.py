"""Distillation on the GPU: forward + backward of the fused Triton op (``fusedloss::triton_distill``:
D per row and the student's gradient in one launch) as a multiple of a copy of the two logits
tensors, beside what users run today, in the same run:

* ``torch``:   ``T^2 F.kl_div(F.log_softmax(s / T), F.log_softmax(t / T), log_target=True,
               reduction="batchmean")`` and ``.backward()`` (eager);
* ``compile``: the same function under ``torch.compile`` (forward and backward compiled);
* ``liger``:   Liger-Kernel's ``LigerKLDIVLoss`` (log_target) and ``LigerJSD`` on the eager
               ``log_softmax``es, when its wheel is carried (``bench/gpu/vendor.sh``);
* ``api``:     ``fl.distill_loss(s, t, temperature=T, divergence=...)`` with ``backend="triton"``,
               when this checkout has it (the autograd Function around the op).

Every row: median time (CUDA events, L2 flushed before each sample, interleaved with the copy
it is divided by: ``fusedloss.bench.timing``), the time as a multiple of the copy, the peak
extra memory of one step as a multiple of one logits tensor (``fusedloss.bench.memory``), and
``D`` (the batch mean) beside the fused op's, a sanity check of what each row computes.
The JSON and markdown are rewritten after every row: a run cut by a budget keeps what it
measured. ``--dry-run``-style tiny shapes on the CPU (Triton's interpreter) prove the script.

    python bench/gpu/distill_bench.py --json distill.json --md distill.md [--vocab 32000 128256]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

DIVERGENCES = {"kl": 0, "reverse_kl": 1, "jsd": 2}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    p.add_argument("--elements", type=int, default=1 << 27, help="N = elements // V (default 2^27: 256 MiB of bf16)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--tiny", action="store_true",
                   help="CPU dry run: V 64 and 2100 (one tile, two streamed blocks), N = 2^11 // V, one sample, no "
                        "memory measurement")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--md", type=Path, default=None)
    a = p.parse_args(argv)
    if a.tiny:
        a.vocab, a.elements, a.warmup, a.repeat, a.no_compile = [64, 2100], 1 << 11, 1, 1, True
    return a


def _markdown(doc: dict) -> str:
    lines = [f"# Distillation fwd+bwd, {doc['dtype']}, T = {doc['temperature']}: {doc['device_name']}", "",
             "Time as a multiple of a copy of the two logits tensors (read both, write both), timed in the same run; "
             "peak extra memory of one step as a multiple of one logits tensor (the student's gradient alone is "
             "1.0). `D` is the batch mean each computes (T^2 included).", "",
             "| V | N | method | divergence | ms | x copy | peak / logits | D | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        def f(k, spec):
            v = r.get(k)
            return "" if v is None else format(v, spec)
        lines.append(f"| {r['v']} | {r['n']} | {r['method']} | {r['divergence']} | {f('ms', '.3f')} | "
                     f"{f('x_copy', '.2f')} | {f('peak_x_logits', '.2f')} | {f('d_mean', '.5g')} | "
                     f"{r.get('error') or r.get('note') or ''} |")
    if doc.get("unavailable"):
        lines += ["", "Not measured: " + "; ".join(f"{k}: {v}" for k, v in doc["unavailable"].items())]
    return "\n".join(lines) + "\n"


def _methods(s: torch.Tensor, t: torch.Tensor, temperature: float, with_compile: bool, unavailable: dict):
    """(method, divergence, step) triples; step() runs forward + backward and returns D's mean."""
    import fusedloss as fl
    from fusedloss.triton_kernels.distill import launch

    n = s.shape[0]
    rs = torch.full((n,), 1.0 / n, device=s.device)          # 'batchmean': d mean / d D_i = 1 / N
    t2 = temperature * temperature
    out = []
    for div, i in DIVERGENCES.items():
        def fused(i=i):
            grad = torch.empty_like(s)
            return launch.triton_distill(s, t, rs, temperature, i, 0.5, grad, False).mean()
        out.append(("fused", div, fused))
    leaf = s.detach().clone().requires_grad_(True)

    def torch_kl(student):
        return t2 * F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(t / temperature, -1),
                             log_target=True, reduction="batchmean")

    def backward(fn):
        def step():
            leaf.grad = None
            loss = fn(leaf)
            loss.backward()
            return loss.detach()
        return step

    out.append(("torch", "kl", backward(torch_kl)))
    if hasattr(fl, "distill_loss"):
        for div in DIVERGENCES:
            out.append(("api", div, backward(lambda x, div=div: fl.distill_loss(
                x, t, temperature=temperature, divergence=div, backend="triton"))))
    else:
        unavailable["api"] = "fl.distill_loss is not in this checkout"
    try:
        from liger_kernel.transformers.jsd import LigerJSD
        from liger_kernel.transformers.kl_div import LigerKLDIVLoss
    except Exception as exc:  # noqa: BLE001 - any import failure: listed, not fatal
        unavailable["liger"] = f"{type(exc).__name__}: {exc} (bench/gpu/vendor.sh carries it)"
    else:
        kl_mod = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        jsd_mod = LigerJSD(beta=0.5)

        def liger_kl(x):
            return t2 * kl_mod(F.log_softmax(x / temperature, -1), F.log_softmax(t / temperature, -1))

        def liger_jsd(x):
            # LigerJSD(log_q = student, log_p = teacher): beta KL(P || M) + (1 - beta) KL(Q || M), a mean per row
            return t2 * jsd_mod(F.log_softmax(x / temperature, -1), F.log_softmax(t / temperature, -1))

        out += [("liger", "kl", backward(liger_kl)), ("liger", "jsd", backward(liger_jsd))]
    if with_compile:
        out.append(("compile", "kl", backward(torch.compile(torch_kl, dynamic=False))))
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))  # a checkout without PYTHONPATH
    from gpubench_rows import finish, measure_row, saver

    dev = torch.device(a.device)
    dtype = DTYPES[a.dtype]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (Triton interpreter)"
    doc = {"tool": "bench/gpu/distill_bench.py", "device": str(dev), "device_name": name, "dtype": a.dtype,
           "temperature": a.temperature, "torch": torch.__version__, "rows": [], "unavailable": {},
           "complete": False}

    save = saver(doc, a.json, a.md, _markdown)

    failed = 0
    # compile last: tens of seconds of Inductor per shape, the first rows are worth more
    for phase in ("eager", "compile"):
        if phase == "compile" and a.no_compile:
            break
        for v in a.vocab:
            n = max(2, a.elements // v)
            g = torch.Generator().manual_seed(0)
            s = (2 * torch.randn(n, v, generator=g)).to(dtype).to(dev)
            t = (2 * torch.randn(n, v, generator=g)).to(dtype).to(dev)
            s2, t2 = torch.empty_like(s), torch.empty_like(t)

            def copy():
                s2.copy_(s)
                t2.copy_(t)

            methods = _methods(s, t, a.temperature, phase == "compile", doc["unavailable"])
            for method, div, step in methods:
                if (method == "compile") != (phase == "compile"):
                    continue
                row = {"v": v, "n": n, "method": method, "divergence": div}
                failed += not measure_row(row, step, copy, dev, max(0, a.warmup - 1), a.repeat,
                                          None if a.tiny else s.numel() * s.element_size(), "d_mean")
                doc["rows"].append(row)
                save()
            del s, t, s2, t2, methods
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return finish(doc, save, a.md, failed)


if __name__ == "__main__":
    sys.exit(main())
