"""``--plot``: a PNG of time and peak memory against C, one line per backend.

One row of panels per loss; left, the median time (the copy row drawn as a
dashed black line, the floor a memory-bound loss is measured against); right,
the peak extra memory of fwd+bwd (the logits' own size dashed: the gradient
alone costs that much). Both axes are logarithmic: C spans 1e3 to 2.6e5.
"""

from __future__ import annotations

from pathlib import Path

Record = dict[str, object]


def _series(records: list[Record], loss: str, key: str) -> dict[str, tuple[list[int], list[float]]]:
    """label -> (C values, y values), skipping cells without a value."""
    several = len({(r["n"], r["dtype"]) for r in records}) > 1
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        if r["loss"] != loss or r.get(key) is None:
            continue
        name = str(r["label"]) + (f" N={r['n']} {r['dtype']}" if several else "")
        xs, ys = out.setdefault(name, ([], []))
        xs.append(int(r["c"]))  # type: ignore[arg-type]
        ys.append(float(r[key]))  # type: ignore[arg-type]
    return out


def write_plot(path: Path, records: list[Record], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    losses = [str(x) for x in dict.fromkeys(r["loss"] for r in records if r["backend"] != "copy")]
    # One colour per line name across all panels, so "reference" is the same
    # colour in the ce row and the bce row.
    names = [n for loss in losses for n in _series(records, loss, "median_ms")]
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {n: cycle[i % len(cycle)] for i, n in enumerate(dict.fromkeys(names))}
    copies = [r for r in records if r["backend"] == "copy"]
    fig, axes = plt.subplots(max(1, len(losses)), 2, figsize=(11, 3.0 * max(1, len(losses))),
                             squeeze=False, constrained_layout=True)
    for row, loss in enumerate(losses):
        ax_t, ax_m = axes[row]
        for name, (xs, ys) in _series(records, loss, "median_ms").items():
            ax_t.plot(xs, ys, marker="o", label=name, color=colour.get(name))
        for name, (xs, ys) in _series(records, loss, "peak_extra_mib").items():
            ax_m.plot(xs, ys, marker="o", label=name, color=colour.get(name))
        for (n, dtype) in dict.fromkeys((r["n"], r["dtype"]) for r in copies):
            group = [r for r in copies if (r["n"], r["dtype"]) == (n, dtype)]
            cs = [int(r["c"]) for r in group]  # type: ignore[arg-type]
            ax_t.plot(cs, [float(r["median_ms"]) for r in group], "k--", label=f"copy N={n} {dtype}")  # type: ignore[arg-type]
            ax_m.plot(cs, [int(r["logits_bytes"]) / 2**20 for r in group], "k:",  # type: ignore[arg-type]
                      label=f"logits size N={n} {dtype}")
        ax_t.set_ylabel(f"{loss}: median ms")
        ax_m.set_ylabel(f"{loss}: peak extra MiB (fwd+bwd)")
        for ax in (ax_t, ax_m):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        for ax in (ax_t, ax_m):
            ax.legend(fontsize=7, loc="upper left")
    for ax in axes[-1]:
        ax.set_xlabel("C (classes, log scale)")
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
