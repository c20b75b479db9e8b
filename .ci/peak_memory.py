"""Run a command and report the peak memory of its whole process tree.

Usage: python .ci/peak_memory.py COMMAND [ARGS...]

The suite runs on pytest-xdist workers that start subprocesses of their own (interpreter runs,
builds, gloo ranks), so the peak of one process says little. Every 0.5 s this sums the
proportional set size (PSS: a page shared by k processes counts 1/k in each, so the torch
libraries every worker maps are counted once) over the command and all its descendants, and
prints the largest sum seen when the command ends. Exits with the command's status.
"""
from __future__ import annotations

import subprocess
import sys
import threading

import psutil


def tree_pss(root: psutil.Process) -> int:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass  # ended between the listing and the read
    return total


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    child = subprocess.Popen(argv)
    root = psutil.Process(child.pid)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.5):
            try:
                peak = max(peak, tree_pss(root))
            except psutil.NoSuchProcess:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rc = child.wait()
    done.set()
    sampler.join()
    print(f"peak memory of the process tree (PSS, sampled every 0.5 s): {peak / 2**30:.2f} GiB")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
