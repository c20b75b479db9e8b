"""Per-call cost of fusedloss against ``nn.CrossEntropyLoss`` (issue 24), one thread, CPU.

Small problems are where a loss's fixed cost shows: argument checks, backend choice, the
autograd wrapper of the ``torch.library`` op, allocations. For each shape and loss this times,
in one process and interleaved with PyTorch's ``nn.CrossEntropyLoss`` on the same tensors:

* ``fwd+bwd``: ``loss_fn(x, t).backward()`` (``x.grad`` set to None before each call);
* ``fwd no_grad``: ``loss_fn(x, t)`` under ``torch.no_grad()``.

Each figure is the median over ``--rounds`` rounds of the mean of ``--calls`` calls; every
round times every loss once, one after another. The ratio column is the median over the rounds
of the time over PyTorch's in the same round, for the same shape and mode (PyTorch has only ce:
every loss is compared with PyTorch's ce). ``--clock thread`` times the thread's CPU time
instead of wall-clock time: steadier on a machine shared with other jobs.

    python bench/per_call.py                   # writes bench/results/per_call_cpu.md
    python bench/per_call.py --backend reference --out -
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import fusedloss as fl

SHAPES = ((32, 10), (256, 100), (256, 1000))
ROOT = Path(__file__).resolve().parent


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def _interleaved(runs: dict, calls: int, rounds: int, clock) -> dict:
    """Per name, the ``rounds`` means of ``calls`` calls, the names timed one after another in
    every round (so a change of the machine's load hits every name of a round alike)."""
    for run in runs.values():
        for _ in range(max(3, calls // 10)):
            run()
    per = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            t0 = clock()
            for _ in range(calls):
                run()
            per[name].append((clock() - t0) / calls)
    return per


def modes(x: torch.Tensor, t: torch.Tensor) -> dict:
    """The timed modes, each a maker of the call for a loss function ``fn``: ``fwd+bwd``
    (``fn(x, t).backward()``, ``x.grad`` set to None first) and ``fwd no_grad``."""
    def fwd_bwd(fn):
        def run():
            x.grad = None
            fn(x, t).backward()
        return run

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn(x, t)
        return run

    return {"fwd+bwd": fwd_bwd, "fwd no_grad": fwd}


def measure(backends, calls: int, rounds: int, losses, clock=time.perf_counter, device="cpu", shapes=SHAPES,
            on_shape=None) -> list[dict]:
    """The rows (shape, mode, loss, backend, us, ratio) of every loss on each of ``backends`` (a
    name or a list) beside ``nn.CrossEntropyLoss`` (backend ``torch``) on ``device``. A function
    that raises on its first call gets a row with ``error`` instead and is left out of the
    rounds. ``on_shape(rows)`` is called after each shape (a caller that saves as it goes)."""
    backends = [backends] if isinstance(backends, str) else list(backends)
    base_key = ("nn.CrossEntropyLoss", "torch")
    rows = []
    for n, c in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, c, generator=g).to(device).requires_grad_()
        t = torch.randint(0, c, (n,), generator=g).to(device)
        fns = {base_key: torch.nn.CrossEntropyLoss()}
        for b in backends:
            for loss in losses:
                fns[(loss, b)] = fl.SoftmaxLoss(loss, backend=b)

        for mode, make in modes(x, t).items():
            runs = {}
            for key, fn in fns.items():
                try:
                    make(fn)()  # a backend that cannot run here is listed, not fatal
                    runs[key] = make(fn)
                except Exception as exc:  # noqa: BLE001
                    rows.append(dict(shape=f"{n} x {c}", mode=mode, loss=key[0], backend=key[1],
                                     error=f"{type(exc).__name__}: {str(exc)[:200]}"))
            if base_key not in runs:
                continue
            per = _interleaved(runs, calls, rounds, clock)
            base = per[base_key]
            for (loss, b), times in per.items():
                rows.append(dict(shape=f"{n} x {c}", mode=mode, loss=loss, backend=b, us=1e6 * statistics.median(times),
                                 ratio=statistics.median(t / b_ for t, b_ in zip(times, base))))
        if on_shape is not None:
            on_shape(rows)
    return rows


def to_markdown(rows: list[dict], backend: str, calls: int, rounds: int, clock: str = "wall") -> str:
    what = "wall-clock time" if clock == "wall" else "the calling thread's CPU time (time.thread_time)"
    flag = "" if clock == "wall" else f" --clock {clock}"
    lines = [
        "# Per-call cost, CPU, one thread",
        "",
        f"`python bench/per_call.py{flag}` (backend `{backend}`; {what}; {calls} calls x {rounds} rounds, "
        f"median of the rounds' means); torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}. Ratio: the median over the rounds of the time over `nn.CrossEntropyLoss`'s "
        "for the same shape and mode in the same round (every loss is timed in every round, one after "
        "another).",
        "",
        "| shape | mode | loss | us per call | ratio |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['mode']} | {r['loss']} | {r['error']} | |")
        else:
            lines.append(f"| {r['shape']} | {r['mode']} | {r['loss']} | {r['us']:.1f} | {r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--losses", default=",".join(fl.LOSSES))
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall: time.perf_counter; thread: the thread's CPU time (steadier on a loaded machine)")
    ap.add_argument("--out", default=str(ROOT / "results" / "per_call_cpu.md"), help="'-': print only")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(a.backend, a.calls, a.rounds, a.losses.split(","), CLOCKS[a.clock])
    md = to_markdown(rows, a.backend, a.calls, a.rounds, a.clock)
    if a.out == "-":
        sys.stdout.write(md)
    else:
        Path(a.out).write_text(md)
        sys.stdout.write(md)


if __name__ == "__main__":
    main()
