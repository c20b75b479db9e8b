"""Peak extra memory (and time) of eager forward+backward on CPU: the reference backend
against F.cross_entropy, the textbook formulas, and the obvious stable NLLR
(``scatter(-inf)`` + ``logsumexp``), each as a multiple of the logits' size / a copy's time.

    python bench/reference_memory.py [--n 1024 --c 32000] [--md bench/results/reference_memory.md]

Memory is counted with ``fusedloss.memtrack.PeakMemory`` (an allocation-tracking dispatch
mode; deterministic). Times are medians of a few runs as ratios to ``logits.clone()`` in
the same run: absolute CPU times on a shared machine mean little.
"""
from __future__ import annotations

import argparse
import torch
import torch.nn.functional as F

import fusedloss as fl
from fusedloss.bench.timing import measure
from fusedloss.memtrack import PeakMemory
from fusedloss.reference import naive_loss


def stable_nllr_scatter(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The obvious stable NLLR in eager PyTorch: log-sum-exp of the row with the target masked."""
    xf = x.float()
    lse = torch.logsumexp(xf, 1)
    lse_ex = torch.logsumexp(xf.scatter(1, t[:, None], float("-inf")), 1)
    return (lse_ex - xf.gather(1, t[:, None])[:, 0]).mean()


def candidates() -> dict:
    c = {"F.cross_entropy (ce)": lambda x, t: F.cross_entropy(x, t),
         "scatter+logsumexp (nllr)": stable_nllr_scatter}
    for loss in fl.LOSSES:
        c[f"naive ({loss})"] = lambda x, t, loss=loss: naive_loss(x, t, loss)
    for loss in fl.LOSSES:
        c[f"fusedloss reference ({loss})"] = lambda x, t, loss=loss: fl.softmax_loss(x, t, loss, backend="reference")
    return c


def peak_ratio(fn, x, t) -> float:
    with PeakMemory() as m:
        fn(x, t).backward()
    x.grad = None
    return m.peak_bytes / (x.numel() * x.element_size())


def median_time(fn, repeat: int) -> float:
    return measure(fn, torch.device("cpu"), warmup=1, repeat=repeat).median_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--c", type=int, default=32000)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--md", default=None, help="also write the table as markdown here")
    args = ap.parse_args()
    lines = [f"N={args.n}, C={args.c}, torch {torch.__version__}, {torch.get_num_threads()} threads. "
             f"Command: `python bench/reference_memory.py --n {args.n} --c {args.c} --repeat {args.repeat}`",
             "", "| dtype | fwd+bwd | peak extra memory (x logits) | time (x copy) |", "|---|---|---|---|"]
    for dname in args.dtype:
        dtype = getattr(torch, dname)
        x = torch.randn(args.n, args.c, dtype=dtype).requires_grad_(True)
        t = torch.randint(0, args.c, (args.n,))
        copy = median_time(lambda: x.detach().clone(), args.repeat)
        for name, fn in candidates().items():
            mem = peak_ratio(fn, x, t)

            def step(fn=fn):
                fn(x, t).backward()
                x.grad = None
            ratio = median_time(step, args.repeat) / copy
            lines.append(f"| {dname} | {name} | {mem:.2f} | {ratio:.1f} |")
            print(lines[-1], flush=True)
    if args.md:
        with open(args.md, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
