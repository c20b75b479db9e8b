"""Per-epoch JSON-lines logs of ``fusedloss.train``, and loss / accuracy curves drawn from them."""
from __future__ import annotations

import json
import os
from typing import Any

from fusedloss.train.data import TrainInputError

LOG_NAME = "log.jsonl"


def append_record(path: str, record: dict[str, Any]) -> None:
    """Append one epoch's record as one JSON line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def rewrite_log(path: str, records: list[dict[str, Any]]) -> None:
    """Replace the log with ``records`` (from a checkpoint's history) in one rename.

    On resume the log may hold an epoch the checkpoint does not (killed between
    the two writes) or lack one; the checkpoint is the truth.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def read_log(run: str) -> list[dict[str, Any]]:
    """Records of a run: ``run`` is a log file or a run directory holding ``log.jsonl``."""
    path = os.path.join(run, LOG_NAME) if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise TrainInputError(f"--plot {run!r}: no {LOG_NAME} there")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise TrainInputError(f"--plot {path!r}: line {n} is not JSON ({err})") from None
    if not records:
        raise TrainInputError(f"--plot {path!r}: the log is empty")
    return records


def run_label(run: str, records: list[dict[str, Any]]) -> str:
    """``<dir name> (<arch>, <loss>)``: the directory says which run, the record which recipe."""
    name = os.path.basename(os.path.normpath(run if os.path.isdir(run) else os.path.dirname(run) or run))
    first = records[0]
    return f"{name} ({first.get('arch', '?')}, {first.get('loss', '?')})"


def plot_runs(runs: list[str], out: str) -> str:
    """Draw training loss, validation cross-entropy and validation accuracy per epoch, one line per run.

    The training-loss panel shows each run's own objective, which is not comparable
    between losses; validation cross-entropy and accuracy are.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    logs = [(run_label(run, recs), recs) for run in runs for recs in [read_log(run)]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, recs in logs:
        epochs = [r["epoch"] for r in recs]
        line = axes[0].plot(epochs, [r["train_loss"] for r in recs], marker=".", label=label)[0]
        axes[1].plot(epochs, [r["val_nll"] for r in recs], marker=".", color=line.get_color(), label=label)
        axes[2].plot(epochs, [r["val_top1"] for r in recs], marker=".", color=line.get_color(), label=f"{label} top-1")
        axes[2].plot(epochs, [r["val_top5"] for r in recs], ls="--", color=line.get_color(), label=f"{label} top-5")
    titles = ("training loss (each run's own objective)", "validation cross-entropy", "validation accuracy (%)")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
