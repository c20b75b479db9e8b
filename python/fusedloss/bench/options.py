"""Command-line parsing: turns ``argv`` into a validated :class:`BenchConfig`.

Every user mistake becomes a :class:`UsageError` carrying one line of text; the
CLI prints it and exits with status 2 (argparse's own convention for usage
errors), so scripts can tell "you asked for something impossible" (2) from
"a measurement failed" (1).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

import fusedloss as fl

MODES = ("fwd", "bwd", "fwd+bwd")
LOGITS_KINDS = ("normal", "extreme")
CPU_ALLOCATORS = ("warm", "system")

# Class-count presets named after the workloads they stand for.
C_PRESETS: dict[str, tuple[int, ...]] = {
    "imagenet": (1000,),
    "imagenet21k": (21841,),
    "llm": (32000, 128256, 262144),  # Llama-2, Llama-3, Gemma-3 vocabularies
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the canonical spelling used in reports)."""
    return str(dtype).removeprefix("torch.")


class UsageError(Exception):
    """A request the benchmark refuses; the message is one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse prints usage plus the error on two lines and exits; we want one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


@dataclass(frozen=True)
class Defaults:
    """The sweep run when the user gives no option, per device type.

    The CPU sweep is sized so that the whole default run (every loss, every
    available backend, timing + memory + float64 accuracy check) stays under
    five minutes on a 2-core machine; the CUDA one covers the classification
    and LLM vocabulary sizes that matter on a GPU.
    """

    ns: tuple[int, ...]
    cs: tuple[int, ...]
    baselines: tuple[str, ...]


DEFAULTS: dict[str, Defaults] = {
    # torch.compile is left out of the CPU default: each shape costs a compile
    # of tens of seconds on 2 cores, more than the measurement itself. The
    # peers are GPU-only; listed so the run says why they are missing.
    "cpu": Defaults(ns=(512,), cs=(1000, 8192, 32000),
                    baselines=("torch", "reference", "naive", "liger", "quack")),
    "cuda": Defaults(
        ns=(4096,),
        cs=(1000, 32000, 128256),
        baselines=("torch", "reference", "naive", "compile", "liger", "quack"),
    ),
}


@dataclass(frozen=True)
class BenchConfig:
    """Everything one run needs, already validated."""

    losses: tuple[str, ...]
    backends: tuple[str, ...]  # in display order
    backends_explicit: bool  # False: the default list, unavailable ones are skipped quietly
    ns: tuple[int, ...]
    cs: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    mode: str
    device: torch.device
    repeat: int | None  # None: as many repeats as fit in the per-cell time budget
    warmup: int
    logits: str
    seed: int
    threads: int | None
    cpu_allocator: str
    check_accuracy: bool
    check_memory: bool
    json_path: Path | None = None
    csv_path: Path | None = None
    plot_path: Path | None = None
    markdown_path: Path | None = None
    from_json: Path | None = None
    quiet: bool = False
    skip_unavailable: bool = False  # a named backend that cannot run here is listed, not an error


def _split(values: list[str] | None) -> list[str]:
    """Accept both ``--loss ce bce`` and ``--loss ce,bce``."""
    out: list[str] = []
    for v in values or []:
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return out


def _positive_ints(words: list[str], what: str, presets: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    out: list[int] = []
    for w in words:
        if w.lower() in presets:
            out.extend(presets[w.lower()])
            continue
        try:
            value = int(w.replace("_", ""))
        except ValueError:
            choices = f" or a preset ({', '.join(presets)})" if presets else ""
            raise UsageError(f"--{what}: '{w}' is not a positive integer{choices}") from None
        if value <= 0:
            raise UsageError(f"--{what}: '{w}' must be positive")
        out.append(value)
    # Keep the user's order but drop repeats (e.g. "--c 32000 llm").
    return tuple(dict.fromkeys(out))


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser; kept separate so ``--help`` text is testable."""
    p = _Parser(
        prog="fusedloss-bench",
        description=(
            "Time, memory and accuracy of the fusedloss backends and PyTorch baselines. "
            "Every time is also given as a ratio to a copy of the logits measured in the "
            "same run (comparable across machines, absolute times are not)."
        ),
    )
    p.add_argument("--loss", nargs="+", metavar="LOSS",
                   help=f"losses to run: {', '.join(fl.LOSSES)} or 'all' (default: all)")
    p.add_argument("--backend", nargs="+", metavar="NAME",
                   help="fused backends (see fl.available_backends()), baselines torch, reference, "
                        "naive, compile, peers liger, quack, or 'all' (default: every available "
                        "one except compile on CPU)")
    p.add_argument("--n", nargs="+", metavar="N", help="rows (tokens/samples); a list")
    p.add_argument("--c", nargs="+", metavar="C",
                   help="classes; a list of integers and/or presets imagenet=1000, "
                        "imagenet21k=21841, llm=32000,128256,262144")
    p.add_argument("--dtype", nargs="+", metavar="DTYPE",
                   help="float32 (default), float16, bfloat16 (or fp32, fp16, bf16)")
    p.add_argument("--mode", default="fwd+bwd", help="fwd, bwd or fwd+bwd (default)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if present)")
    p.add_argument("--repeat", default=None,
                   help="timed repeats per cell (default: as many as fit in about 1 s on CPU, "
                        "5..50, or 0.5 s on CUDA, 20..200)")
    p.add_argument("--warmup", default=None, help="untimed calls before timing (default 1 CPU, 10 CUDA)")
    p.add_argument("--logits", default="normal",
                   help="normal: N(0, 1) logits; extreme: rows with huge leads and -inf classes "
                        "(fusedloss.reference.extreme_logits)")
    p.add_argument("--threads", default=None,
                   help="CPU threads for torch (torch.set_num_threads; default: torch's choice, reported)")
    p.add_argument("--cpu-allocator", default="warm",
                   help="warm (default): freed CPU memory is kept and reused, as CUDA's caching allocator "
                        "does, so times exclude page faults; system: glibc's defaults (see "
                        "fusedloss/bench/allocator.py)")
    p.add_argument("--seed", default="0", help="random seed for the inputs (default 0)")
    p.add_argument("--no-accuracy", action="store_true", help="skip the float64 accuracy check")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", type=Path, metavar="PATH", help="write results + machine description")
    p.add_argument("--csv", type=Path, metavar="PATH", help="write one CSV row per measurement")
    p.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG of time and memory vs C")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="write the table as markdown")
    p.add_argument("--from-json", type=Path, metavar="PATH",
                   help="measure nothing: re-render a previous --json file (table, csv, plot, markdown)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--skip-unavailable", action="store_true",
                   help="skip (and list) a backend named in --backend that cannot run here instead of "
                        "stopping with exit status 2 (scripted runs on machines of unknown content)")
    return p


def _int_option(value: str | None, name: str, minimum: int) -> int | None:
    if value is None:
        return None
    try:
        out = int(value)
    except ValueError:
        raise UsageError(f"--{name}: '{value}' is not an integer") from None
    if out < minimum:
        raise UsageError(f"--{name}: must be at least {minimum}, got {out}")
    return out


def _device(text: str | None) -> torch.device:
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device: unknown device '{text}'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device: '{text}' requested but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device: '{text}' but only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    if dev.type != "cpu":
        raise UsageError(f"--device: '{text}' is not supported (cpu or cuda)")
    return dev


def parse_args(argv: list[str] | None, known_backends: tuple[str, ...]) -> BenchConfig:
    """Parse and validate ``argv``; raises :class:`UsageError` on any mistake.

    ``known_backends`` is every backend name the benchmark knows of (available
    or not); availability is decided later, by :mod:`fusedloss.bench.backends`.
    """
    a = build_parser().parse_args(argv)
    device = _device(a.device)
    defaults = DEFAULTS[device.type]

    losses = _split(a.loss) or ["all"]
    if "all" in losses:
        losses = list(fl.LOSSES)
    for name in losses:
        if name not in fl.LOSSES:
            raise UsageError(f"--loss: unknown loss '{name}' (choose from {', '.join(fl.LOSSES)}, all)")

    backends = _split(a.backend)
    explicit = bool(backends) and backends != ["all"]
    if not backends or "all" in backends:
        fused = [b for b in fl.available_backends() if b != "reference"]
        backends = fused + list(defaults.baselines)
        if "all" in _split(a.backend):
            backends.append("compile")
    for name in backends:
        if name not in known_backends:
            raise UsageError(f"--backend: unknown backend '{name}' (choose from {', '.join(known_backends)}, all)")

    dtypes: list[torch.dtype] = []
    for word in _split(a.dtype) or ["float32"]:
        if word.lower() not in DTYPES:
            raise UsageError(f"--dtype: unknown dtype '{word}' (choose from float32, float16, bfloat16)")
        dtypes.append(DTYPES[word.lower()])

    if a.mode not in MODES:
        raise UsageError(f"--mode: unknown mode '{a.mode}' (choose from {', '.join(MODES)})")
    if a.cpu_allocator not in CPU_ALLOCATORS:
        raise UsageError(f"--cpu-allocator: unknown choice '{a.cpu_allocator}' (choose from {', '.join(CPU_ALLOCATORS)})")
    if a.logits not in LOGITS_KINDS:
        raise UsageError(f"--logits: unknown kind '{a.logits}' (choose from {', '.join(LOGITS_KINDS)})")

    ns = _positive_ints(_split(a.n), "n", {}) or defaults.ns
    cs = _positive_ints(_split(a.c), "c", C_PRESETS) or defaults.cs
    if a.logits == "extreme" and min(cs) < 3:
        raise UsageError("--logits extreme needs every C >= 3")
    warmup = _int_option(a.warmup, "warmup", 0)
    return BenchConfig(
        losses=tuple(dict.fromkeys(losses)),
        backends=tuple(dict.fromkeys(backends)),
        backends_explicit=explicit,
        ns=ns,
        cs=cs,
        dtypes=tuple(dict.fromkeys(dtypes)),
        mode=a.mode,
        device=device,
        repeat=_int_option(a.repeat, "repeat", 1),
        # CPU: one warm-up call suffices (no JIT, no autotuning; the first
        # timed round is interleaved anyway); CUDA: Triton autotuning and
        # cuBLAS/cuDNN heuristics want a few.
        warmup=warmup if warmup is not None else (10 if device.type == "cuda" else 1),
        logits=a.logits,
        seed=_int_option(a.seed, "seed", 0) or 0,
        threads=_int_option(a.threads, "threads", 1),
        cpu_allocator=a.cpu_allocator,
        check_accuracy=not a.no_accuracy,
        check_memory=not a.no_memory,
        json_path=a.json,
        csv_path=a.csv,
        plot_path=a.plot,
        markdown_path=a.markdown,
        from_json=a.from_json,
        quiet=a.quiet,
        skip_unavailable=a.skip_unavailable,
    )
