"""What a gpucheck run does and in how long: the steps, their caps and reserves, the sweep's chunks,
and the digest of the sources a run exercises. Standard library only (see gpucheck.py)."""
from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
STEPS = ("env", "nvidia-smi", "build", "pytest-triton", "pytest-ext", "parallel", "sanitize", "distill", "targets",
         "sweep", "report")
#: Longest a step may take (seconds); the budget may cut it shorter.
CAPS = {"env": 90, "nvidia-smi": 30, "build": 300, "pytest-triton": 270, "pytest-ext": 120, "parallel": 75,
        "sanitize": 90, "distill": 150, "targets": 120, "sweep": 600, "report": 60}
#: Time kept back for a step while earlier ones run, so every step gets a turn.
#: distill and targets keep none: they run after the tests and before the sweep, whose reserve protects the
#: sweep's first chunks, so the earlier steps' time is what it was before them (at least MIN_STEP_S, budget
#: permitting).
RESERVE = {"pytest-ext": 45, "parallel": 20, "sanitize": 40, "sweep": 90, "report": 10}
#: How a step is stopped (its timeout, or a signal to this script): SIGINT (pytest still
#: writes its JUnit XML, the sweep keeps its finished chunks), then SIGTERM, then SIGKILL,
#: each to the step's whole process group, every running step at once; (signal, seconds
#: to wait for the group to be gone before the next).
STOP_WAITS = ((signal.SIGINT, 9.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0))
#: Every step's timeout keeps this much of the budget back for its stop (>= the waits above).
GRACE_S = 15
#: The whole run ends within ``--budget`` + MARGIN_S seconds (the write-up after the last step).
MARGIN_S = 10
TOOL_PROBE_S = 20  # each version probe (nvcc, compute-sanitizer, gcc, the driver), within the env step
#: pytest-triton runs as parallel shards (``-k``): its time is mostly Triton and Inductor
#: compiling on the CPU, one core per process, while the machine has many.
TRITON_SHARDS = ("real_shapes", "not real_shapes")
#: The files of the pytest-triton step: the one-target kernels, the soft-target and the mixup kernels
#: (test_triton_gpu.py also holds the distillation op's gpu tests).
TRITON_GPU_TESTS = ["tests/test_triton_gpu.py", "tests/test_triton_soft.py", "tests/test_triton_mix.py",
                    "tests/test_triton_expected.py"]
MIN_STEP_S = 20  # a step squeezed by the reserves still gets this much, budget permitting
LOSSES = ("ce", "bce", "nllr", "crl", "lace", "focal")
GPU_CS = (1000, 32000, 128256, 262144)
GPU_ELEMENTS = 1 << 27     # N = 2^27 // C: 256 MiB of bf16 logits, 512 MiB of fp32, per shape
GPU_TIMING = ("--repeat", "10", "--warmup", "2")  # a GPU sample is ~1 ms: the repeats cost little
COMPILE_CS = (32000, 128256)  # torch.compile (ce): tens of seconds of Inductor per (dtype, C)
DRY_CS = (64, 5000)        # 5000 > 4096: the streamed kernels
DRY_ELEMENTS = 1 << 11     # the interpreter runs a program per row: few rows, the same plumbing
#: bench/parallel_smoke.py's problem: the step trains and times small (the check is correctness on
#: the device's backends and collectives; bench/results has the CPU timings at full size).
PARALLEL_ARGS = ("--steps", "20", "--time-rows", "256", "--time-classes", "32768", "--repeat", "5")
PARALLEL_DRY_ARGS = ("--steps", "4", "--classes", "37", "--time-rows", "16", "--time-classes", "64", "--repeat", "1")
#: The distill step (bench/gpu/distill_bench.py): bf16 distillation fwd+bwd at these vocabularies,
#: N = GPU_ELEMENTS // V; the dry run's tiny shapes are the script's --tiny.
DISTILL_VOCABS = (32000, 128256)
#: The targets step (bench/gpu/targets_bench.py): soft targets for every loss at these C, N = 2^27 // C,
#: bf16 then fp32 (issue 25's CPU shapes are 1024 x 32000 and 4096 x 1000: the same C); the per-call
#: table at bench/per_call.py's shapes. The dry run's tiny shapes are the script's --tiny.
TARGETS_CLASSES = (32000, 1000)
SOURCE_DIRS = ("csrc", "python/fusedloss", "triton_kernels", "tests", "bench/gpu")
SOURCE_FILES = ("setup.py", "pyproject.toml")
SOURCE_SUFFIXES = {".py", ".cpp", ".h", ".cu", ".cuh", ".sh", ".toml"}


def source_digest(root: Path = REPO) -> str:
    """sha256 (12 hex) of the sources a GPU run exercises, as laid out in the work tree.

    The device machine gets a copy of the work tree without ``.git``; the same digest
    computed here (``python bench/gpu/gpucheck.py --digest``) tells which tree a
    result came from."""
    h = hashlib.sha256()
    paths = [root / f for f in SOURCE_FILES if (root / f).is_file()]
    for d in SOURCE_DIRS:
        for dirpath, dirnames, filenames in os.walk(root / d):
            dirnames[:] = sorted(x for x in dirnames if x != "__pycache__")
            paths += [Path(dirpath) / f for f in filenames if Path(f).suffix in SOURCE_SUFFIXES]
    for p in sorted(paths, key=lambda q: q.relative_to(root).as_posix()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def step_timeout(step: str, now: float, deadline: float, later: list[str], caps: dict[str, float]) -> float:
    """The time ``step`` gets: its cap, but not eating what the ``later`` steps keep back,
    unless that leaves it under MIN_STEP_S (then up to MIN_STEP_S, within the budget)."""
    keep = sum(RESERVE.get(s, 0) for s in later)
    left = deadline - now - GRACE_S
    t = min(caps[step], left - keep)
    if t < min(caps[step], MIN_STEP_S):
        t = min(caps[step], MIN_STEP_S, left)
    return max(0.0, t)


def sweep_plan(dry_run: bool, results: Path, with_compile: bool = True) -> list[dict[str, object]]:
    """The benchmark, as ``fusedloss-bench`` invocations in order of value: the budget
    cuts the tail (a sweep cut after one chunk or more is ``partial``, not a failure).

    One invocation per (dtype, C) and tier, every loss; N = elements // C so each shape
    moves the same bytes. Tiers, each bf16 then fp32, C ascending:

    1. the fused backends beside PyTorch and Liger (CE), every C: the comparison itself;
    2. the reference backend (pure PyTorch, the correctness oracle's twin), every C;
    3. ``torch.compile``, CE only, at COMPILE_CS: it compiles per shape, dtype and loss
       (tens of seconds each), so it comes last."""
    cs, elements = (DRY_CS, DRY_ELEMENTS) if dry_run else (GPU_CS, GPU_ELEMENTS)
    device = "cpu" if dry_run else "cuda"
    fused = ["triton", "cpu"] if dry_run else ["triton", "cuda"]
    timing = ["--repeat", "2", "--warmup", "1"] if dry_run else list(GPU_TIMING)
    chunks = []

    def add(name: str, dtype: str, c: int, losses: list[str], backends: list[str]) -> None:
        n = max(2, elements // c)
        argv = ["--device", device, "--loss", *losses, "--backend", *backends, "--n", str(n), "--c", str(c),
                "--dtype", dtype, *timing, "--skip-unavailable", "--quiet"]
        if dry_run:
            argv += ["--threads", "1", "--cpu-allocator", "system"]
        chunks.append({"name": name, "argv": argv,
                       "json": str(results / "sweep" / f"chunk-{len(chunks):02d}-{name}.json")})

    for dtype in ("bf16", "fp32"):
        for c in cs:
            add(f"{dtype}-C{c}", dtype, c, list(LOSSES), [*fused, "torch", "liger"])
    for dtype in ("bf16", "fp32"):
        for c in cs:
            add(f"reference-{dtype}-C{c}", dtype, c, list(LOSSES), ["reference"])
    if with_compile and not dry_run:
        for dtype in ("bf16", "fp32"):
            for c in COMPILE_CS:
                add(f"compile-{dtype}-C{c}", dtype, c, ["ce"], ["compile"])
    return chunks
