"""A description of the machine a result came from, stored with every result file.

Absolute times mean nothing without it; the ratio to the copy row travels
better, but still depends on the cache sizes and thread count recorded here.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The fusedloss checkout's commit, when it runs from one (editable install)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5, check=False).stdout.strip()
        # Uncommitted changes to the library's sources mean the numbers belong
        # to no commit: say so rather than credit HEAD with them.
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "csrc", "python",
                                "triton_kernels", "setup.py"],
                               capture_output=True, text=True, timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("-dirty" if dirty else "")) or None


def loadavg() -> float | None:
    """The 1-minute load average, or None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def describe(device: torch.device) -> dict[str, object]:
    """Host, software versions and, on CUDA, the GPU."""
    info: dict[str, object] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fusedloss": _version("fusedloss"),
        "fusedloss_commit": _git_commit(),
        "gpu": None,
        # Other processes on the same cores inflate every time (and, with
        # several torch threads, stall parallel regions): the load is part of
        # the result's provenance.
        "loadavg_1m": loadavg(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    return info


def one_line(info: dict[str, object]) -> str:
    """Short summary for the terminal header."""
    threads = info["torch_threads"]
    where = info["gpu"] or f"{info['cpu']}, {threads} thread{'' if threads == 1 else 's'}"
    return f"{info['device']} ({where}); torch {info['torch']}, triton {info['triton']}"
