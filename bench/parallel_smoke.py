"""Training smoke run and timing of fusedloss.parallel: a classifier whose last layer's classes
are split across the processes of a torchrun job (gloo on the CPU, or NCCL on GPUs).

    torchrun --nproc-per-node 2 bench/parallel_smoke.py --out bench/results/parallel_smoke.md
    torchrun --nproc-per-node 2 bench/parallel_smoke.py --device cuda --backend nccl   # GPUs (one may be shared)

Training, for each loss of ``--losses``: a small MLP trunk (replicated: same initial weights and
batches on every rank) and a last layer of ``V`` classes whose rows are split across the ranks
(uneven when ``V`` does not divide), trained two ways: the local logits ``h @ W_r.T + b_r`` into
``flp.softmax_loss`` (the trunk's gradient summed over the ranks by an all-reduce of the hidden
activations' gradient, Megatron's column-parallel pattern), and the fused vocabulary-parallel head
``flp.linear_softmax_loss(h, W_r, y, bias=b_r)`` (which all-reduces that gradient itself). Every
rank also trains the same model unsplit, in-process, with ``fl.softmax_loss`` on the full logits,
from the same weights and batches: the three loss curves are printed side by side and must agree
(``--tol``).

Timing, for each loss: one loss forward + backward on ``(N, V)`` logits split over the ranks, against
the same loss after all-gathering the ``(N, V)`` logits onto every rank (then each rank slices its
gradient), and the parallel head on ``(N, D)`` hidden states against ``fl.linear_softmax_loss`` with
the full ``(V, D)`` weight in one process; median of ``--repeat`` runs, with the bytes each moves
(docs/parallel.md has the model).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import fusedloss as fl
import fusedloss.parallel as flp


class _CopyToClassParallel(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the ranks (each rank's slice of the
    classes contributes to the hidden activations' gradient)."""

    @staticmethod
    def forward(ctx, h, group):
        ctx.group = group
        return h

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def _split(v: int, world: int, rank: int) -> tuple[int, int]:
    """Rank's [start, end) of v classes, the first v % world ranks one class larger."""
    base, extra = divmod(v, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _model(d_in: int, hidden: int, v: int, seed: int, device) -> tuple[torch.nn.Module, torch.nn.Linear]:
    torch.manual_seed(seed)
    trunk = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden),
                                torch.nn.GELU()).to(device)
    head = torch.nn.Linear(hidden, v).to(device)
    return trunk, head


def train(args, loss: str, rank: int, world: int, device) -> list[tuple[int, float, float, float]]:
    """Loss per step of the split models (local logits, fused head) and of the unsplit one, from the
    same start."""
    g = torch.Generator().manual_seed(args.seed)
    centers = torch.randn(args.classes, args.d_in, generator=g) * 2
    start, end = _split(args.classes, world, rank)
    split = []
    for _ in range(2):  # [0]: local logits into flp.softmax_loss, [1]: flp.linear_softmax_loss
        trunk, head = _model(args.d_in, args.hidden, args.classes, args.seed, device)
        w_local = torch.nn.Parameter(head.weight.detach()[start:end].clone())
        b_local = torch.nn.Parameter(head.bias.detach()[start:end].clone())
        opt = torch.optim.SGD(list(trunk.parameters()) + [w_local, b_local], lr=args.lr, momentum=0.9)
        split.append((trunk, w_local, b_local, opt))
    trunk_s, head_s = _model(args.d_in, args.hidden, args.classes, args.seed, device)
    opt_s = torch.optim.SGD(list(trunk_s.parameters()) + list(head_s.parameters()), lr=args.lr, momentum=0.9)
    kw = dict(label_smoothing=args.label_smoothing, z_loss=args.z_loss)
    curve = []
    for step in range(args.steps):
        y = torch.randint(0, args.classes, (args.batch,), generator=g)
        x = (centers[y] + torch.randn(args.batch, args.d_in, generator=g)).to(device)
        y = y.to(device)
        y[::17] = -100  # a few ignored rows

        losses = []
        for mode, (trunk, w_local, b_local, opt) in enumerate(split):
            if mode == 0:
                h = _CopyToClassParallel.apply(trunk(x), None)
                loss_p = flp.softmax_loss(h @ w_local.T + b_local, y, loss, **kw)
            else:
                loss_p = flp.linear_softmax_loss(trunk(x), w_local, y, loss, bias=b_local, **kw)
            opt.zero_grad()
            loss_p.backward()
            opt.step()
            losses.append(float(loss_p.detach()))

        loss_s = fl.softmax_loss(head_s(trunk_s(x)), y, loss, **kw)
        opt_s.zero_grad()
        loss_s.backward()
        opt_s.step()
        curve.append((step, *losses, float(loss_s.detach())))
    return curve


def _median_time(fn, repeat: int, device) -> float:
    times = []
    for i in range(repeat + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first run warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timing(args, loss: str, rank: int, world: int, device) -> dict:
    n, v, d = args.time_rows, args.time_classes, args.time_hidden
    start, end = _split(v, world, rank)
    g = torch.Generator().manual_seed(1)
    full = torch.randn(n, v, generator=g).to(device)
    y = torch.randint(0, v, (n,), generator=g).to(device)
    local = full[:, start:end].clone()
    sizes = [_split(v, world, r)[1] - _split(v, world, r)[0] for r in range(world)]
    hidden = torch.randn(n, d, generator=g).to(device)
    weight = (torch.randn(v, d, generator=g) / d ** 0.5).to(device)
    w_local = weight[start:end].clone()

    def parallel():
        x = local.clone().requires_grad_()
        flp.softmax_loss(x, y, loss).backward()

    def gathered():
        x = local.clone().requires_grad_()
        parts = [torch.empty(n, s, device=device) for s in sizes]
        dist.all_gather(parts, x.detach().contiguous())
        xf = torch.cat(parts, 1).requires_grad_()
        fl.softmax_loss(xf, y, loss).backward()
        x.backward(xf.grad[:, start:end])

    def local_only():  # the loss on the slice alone: what the kernels cost without communication
        x = local.clone().requires_grad_()
        fl.softmax_loss(x, y.clamp(max=end - start - 1), loss).backward()

    def head_parallel():
        h, w = hidden.clone().requires_grad_(), w_local.clone().requires_grad_()
        flp.linear_softmax_loss(h, w, y, loss).backward()

    def head_full():  # the unsplit head, the full weight in one process
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        fl.linear_softmax_loss(h, w, y, loss).backward()

    out = {"rows": n, "classes": v, "hidden": d, "world": world, "local_classes": end - start}
    for name, fn in (("parallel", parallel), ("all_gather", gathered), ("local_slice", local_only),
                     ("head_parallel", head_parallel), ("head_full", head_full)):
        out[name] = _median_time(fn, args.repeat, device)
    return out


def _loss_report(args, loss: str, world: int, curve, times, ok: bool, worst: float) -> list[str]:
    n, v, d = times["rows"], times["classes"], times["hidden"]
    ring = 2 * (world - 1) / world  # a ring all-reduce of B bytes sends (and receives) ring * B per rank
    bytes_fwd = (ring * 3 * n * 4 if loss != "bce" else (world - 1) * 6 * n * 4 + ring * 2 * n * 4) + 136 * (world - 1)
    collectives = ("all-reduce MAX of N fp32 + all-reduce SUM of 2N fp32" if loss != "bce" else
                   "all-gather of 6N fp32 per rank + all-reduce SUM of 2N fp32")
    lines = [
        f"## Training: {loss}, {args.classes} classes split over {world} ranks, label_smoothing "
        f"{args.label_smoothing}, z_loss {args.z_loss}, every 17th row ignored",
        "",
        "| step | split: local logits, `flp.softmax_loss` | split: `flp.linear_softmax_loss` | unsplit (one process) "
        "| largest difference |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {s} | {a:.6f} | {b:.6f} | {c:.6f} | {max(abs(a - c), abs(b - c)):.2e} |" for s, a, b, c in curve
              if s % 5 == 0 or s == len(curve) - 1]
    lines += ["", f"Largest difference over {len(curve)} steps: {worst:.2e} (tolerance {args.tol:g}): "
              f"{'OK' if ok else 'FAIL'}.", "",
              f"## One loss forward + backward, {loss}, {world} ranks (median of {args.repeat})", "",
              "| method | time (ms) | bytes each rank sends and receives (model, docs/parallel.md) |",
              "|---|---:|---|",
              f"| ({n}, {v}) float32 logits: fusedloss.parallel.softmax_loss | {times['parallel'] * 1e3:.2f} | "
              f"{collectives} + all-gather of 17 int64 per rank: ~{bytes_fwd / 1024:.1f} KiB |",
              f"| all-gather the logits, then the loss | {times['all_gather'] * 1e3:.2f} | the other ranks' "
              f"slices: {n * (v - times['local_classes']) * 4 / 2**20:.1f} MiB |",
              f"| the loss on the local slice alone (no communication) | {times['local_slice'] * 1e3:.2f} | 0 |",
              f"| ({n}, {d}) hidden, ({v}, {d}) weight: fusedloss.parallel.linear_softmax_loss | "
              f"{times['head_parallel'] * 1e3:.2f} | the loss's, per block of rows, + all-reduce of d hidden "
              f"({n} x {d} fp32): ~{(bytes_fwd + ring * n * d * 4) / 1024:.1f} KiB |",
              f"| fl.linear_softmax_loss, the full weight in one process | {times['head_full'] * 1e3:.2f} | 0 |",
              ""]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", default="crl,bce", help="comma-separated losses to train and time")
    p.add_argument("--classes", type=int, default=1001)
    p.add_argument("--d-in", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=0.3)
    # 0 by default: fusedloss.parallel refuses label smoothing with a loss other than ce until its split
    # losses compute the expected-loss term (docs/losses.md, "Soft targets"; CHANGELOG.md).
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--z-loss", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4, help="max |split - unsplit| loss over the curve")
    p.add_argument("--time-rows", type=int, default=512)
    p.add_argument("--time-classes", type=int, default=32768)
    p.add_argument("--time-hidden", type=int, default=256, help="hidden size D of the head's timing")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="gloo", help="torch.distributed backend")
    p.add_argument("--out", default=None, help="write the markdown report here (rank 0)")
    args = p.parse_args(argv)

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# fusedloss.parallel: training smoke run and timing",
        "",
        "Command: `torchrun --nproc-per-node " + f"{world} bench/parallel_smoke.py " + " ".join(sys.argv[1:]) + "`",
        f"(torch {torch.__version__}, distributed backend {args.backend}, device {device.type}, "
        f"{torch.get_num_threads()} threads per rank, {os.cpu_count()} CPUs, 1-minute load average "
        f"{load:.1f} at the start{{end_load}})",
        "",
    ]
    ok = True
    for loss in args.losses.split(","):
        curve = train(args, loss, rank, world, device)
        times = timing(args, loss, rank, world, device)
        worst = max(max(abs(a - c), abs(b - c)) for _, a, b, c in curve)
        ok = ok and worst <= args.tol
        lines += _loss_report(args, loss, world, curve, times, worst <= args.tol, worst)
    if rank == 0:
        end_load = f", {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
        report = "\n".join(lines).replace("{end_load}", end_load)
        print(report)
        if args.out:
            with open(args.out, "w") as f:
                f.write(report)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
