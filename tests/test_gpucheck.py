"""The GPU proof script (bench/gpu/check.sh -> bench/gpu/gpucheck.py) on this CPU machine.

``--dry-run`` runs every step the GPU run has (Triton's interpreter, tiny shapes, no
build, no sanitizer): this proves the script, its budget handling and its outputs, so
that the minutes a GPU is lent go to the GPU. The run itself is in bench/gpu/README.md.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fusedloss.bench import backends as bk
from fusedloss.bench.cli import main as bench_main
from fusedloss.bench.options import parse_args

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))  # gpucheck.py is a script there, not part of the package
import gpucheck_plan  # noqa: E402
import gpucheck_report  # noqa: E402
CHECK = ROOT / "bench" / "gpu" / "check.sh"


def _check(results: Path, *args: str, timeout: float = 280) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it itself
    t0 = time.time()
    proc = subprocess.run(["bash", str(CHECK), str(results), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    return proc, time.time() - t0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, float]:
    results = tmp_path_factory.mktemp("gpucheck") / "results"
    proc, seconds = _check(results, "--dry-run", "--budget", "300")
    return results, proc, seconds


@pytest.mark.slow
def test_dry_run_passes_every_step(dry_run) -> None:
    results, proc, seconds = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = json.loads((results / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status == {"env": "pass", "build": "skipped", "pytest-triton-1": "pass", "pytest-triton-2": "pass",
                      "pytest-ext": "pass", "parallel": "pass", "sanitize": "pass", "distill": "pass", "targets": "pass",
                      "sweep": "pass", "report": "pass"}, summary["steps"]
    assert summary["final"] and summary["outcome"] == "pass" and summary["dry_run"]
    # (the digest of this tree may have moved on since: other work shares it)
    assert summary["env"]["torch"] and len(summary["env"]["source_digest"]) == 12
    assert seconds < 300
    assert "# gpucheck: dry run on CPU" in proc.stdout  # the summary is the last thing printed


def test_dry_run_writes_junit_sweep_and_summary(dry_run) -> None:
    results, _, _ = dry_run
    for name in ("junit-pytest-triton-1.xml", "junit-pytest-triton-2.xml", "junit-pytest-ext.xml",
                 "gpucheck.junit.xml"):
        root = ET.parse(results / name).getroot()
        assert root.iter("testcase"), name
    shards = [gpucheck_report.parse_junit(results / f"junit-pytest-triton-{k}.xml") for k in (1, 2)]
    # every gpu test of test_triton_gpu.py in exactly one shard (all skipped here)
    assert shards[0]["tests"] == 90 and shards[1]["tests"] > 40
    assert all(c["failures"] == c["errors"] == 0 for c in shards)
    steps = ET.parse(results / "gpucheck.junit.xml").getroot()
    assert steps.get("name") == "gpucheck" and steps.get("failures") == "0"
    # the parallel step's smoke run: split and unsplit curves compared (the script exits 1 if they part)
    assert ": OK." in (results / "parallel_gloo_cpu.md").read_text()

    doc = json.loads((results / "sweep.json").read_text())
    assert doc["schema"] == 1 and len(doc["config"]["chunks"]) == 8  # fused+torch+liger, then reference
    seen = {(r["backend"], r["loss"], r["dtype"], r["c"]) for r in doc["results"]}
    for dtype in ("bfloat16", "float32"):
        for c in gpucheck_plan.DRY_CS:
            assert ("copy", "-", dtype, c) in seen and ("torch", "ce", dtype, c) in seen
            for loss in gpucheck_plan.LOSSES:
                assert {("triton", loss, dtype, c), ("cpu", loss, dtype, c), ("reference", loss, dtype, c)} <= seen
    assert not [r for r in doc["results"] if r.get("error")]
    assert "liger" in doc["unavailable"]  # no GPU here: listed, not fatal
    md = (results / "sweep.md").read_text()
    assert "## Time as a multiple of a copy" in md and "| ce | triton |" in md and "C=5000 (N=2)" in md
    assert "| loss | backend | N | C |" in (results / "sweep_full.md").read_text()
    drive = json.loads((results / "sanitize_drive.json").read_text())
    assert drive["failed"] == 0 and drive["cases"] > 100 and drive["complete"]
    # the distill step: the fused op (kl, reverse kl, jsd) and F.kl_div at the tiny shapes, liger listed
    distill = json.loads((results / "distill.json").read_text())
    assert distill["complete"] and not [r for r in distill["rows"] if r.get("error")]
    assert {(r["method"], r["divergence"], r["v"]) for r in distill["rows"]} >= {
        (m, d, v) for v in (64, 2100) for m, d in (("fused", "kl"), ("fused", "reverse_kl"), ("fused", "jsd"),
                                                   ("torch", "kl"))}
    assert "liger" in distill["unavailable"] and "| fused | jsd |" in (results / "distill.md").read_text()
    # the targets step: the per-call table (every loss on triton and cpu beside nn.CrossEntropyLoss, both
    # modes) and soft targets for every loss on both backends beside F.cross_entropy, at the tiny shapes
    targets = json.loads((results / "targets.json").read_text())
    assert targets["complete"] and not [r for r in targets["per_call"] + targets["soft"] if r.get("error")]
    losses = set(gpucheck_plan.LOSSES)
    for mode in ("fwd+bwd", "fwd no_grad"):
        assert {(r["loss"], r["backend"]) for r in targets["per_call"] if r["mode"] == mode} == {
            ("nn.CrossEntropyLoss", "torch")} | {(loss, b) for loss in losses for b in ("triton", "cpu")}
    assert {(r["loss"], r["backend"], r["c"]) for r in targets["soft"]} == {("ce", "torch", 64)} | {
        (loss, b, 64) for loss in losses for b in ("triton", "cpu")}
    assert all(r["x_copy"] > 0 and math.isfinite(r["ms"]) for r in targets["soft"])
    assert all(r["us"] > 0 and r["ratio"] > 0 for r in targets["per_call"])
    assert "| bf16 | 32 x 64 | triton | focal |" in (results / "targets.md").read_text()
    assert {r["backend"] for r in drive["results"]} == {"triton", "cpu"}
    summary_md = (results / "summary.md").read_text()
    assert "| sweep | pass |" in summary_md and "## Time as a multiple" in summary_md
    assert not list(results.rglob("*.tmp"))  # every file written through a temporary and a rename


def test_tiny_budget_ends_within_the_budget_and_still_writes_the_summary(tmp_path: Path) -> None:
    """Every step with a 25 s budget: what runs is cut (SIGINT...) or skipped, and the whole
    run, write-up included, ends within budget + MARGIN_S."""
    budget = 25
    proc, seconds = _check(tmp_path / "r", "--dry-run", "--budget", str(budget), timeout=120)
    assert seconds <= budget + gpucheck_plan.MARGIN_S, proc.stdout[-3000:]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["final"] and proc.returncode == (0 if summary["outcome"] == "pass" else 1)
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status["env"] == "pass" and set(status.values()) <= {"pass", "timeout", "skipped"}, status
    detail = {s["name"]: s["detail"] for s in summary["steps"]}
    assert status["sweep"] == "skipped" and "budget spent" in detail["sweep"]
    assert "sweep" in summary["partial"]  # not run for lack of budget: shown, not a failure
    assert (tmp_path / "r" / "gpucheck.junit.xml").exists()


def test_sigterm_stops_the_steps_and_writes_the_summary(tmp_path: Path) -> None:
    results = tmp_path / "r"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "gpu" / "gpucheck.py"), str(results),
                             "--dry-run", "--steps", "sweep"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    deadline = time.time() + 60
    while not (results / "logs" / "sweep.log").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    summary = json.loads((results / "summary.json").read_text())
    assert summary["final"] and summary["outcome"] == "fail"
    # env (the device probe) always runs, whatever --steps says
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [("env", "pass"), ("sweep", "stopped")]
    assert "stopped by SIGTERM" in out


def test_gpu_sweep_plan_orders_by_value_and_parses() -> None:
    """The budget cuts the tail: the fused backends beside torch and liger (bf16, then fp32)
    first, the reference next, torch.compile (ce, two C) last."""
    chunks = gpucheck_plan.sweep_plan(False, Path("/r"))
    dtypes, cs = ("bf16", "fp32"), gpucheck_plan.GPU_CS
    assert [c["name"] for c in chunks] == ([f"{d}-C{c}" for d in dtypes for c in cs]
                                           + [f"reference-{d}-C{c}" for d in dtypes for c in cs]
                                           + [f"compile-{d}-C{c}" for d in dtypes for c in gpucheck_plan.COMPILE_CS])
    assert gpucheck_plan.sweep_plan(False, Path("/r"), with_compile=False) == chunks[:16]
    for chunk in chunks:
        argv = chunk["argv"]
        c, n = int(argv[argv.index("--c") + 1]), int(argv[argv.index("--n") + 1])
        assert c in (1000, 32000, 128256, 262144) and 2**27 - c < n * c <= 2**27
        on_cpu = list(argv)
        on_cpu[argv.index("--device") + 1] = "cpu"  # parse_args refuses cuda without CUDA
        cfg = parse_args(on_cpu, bk.known_backends())
        assert cfg.skip_unavailable and cfg.quiet and cfg.repeat == 10 and cfg.warmup == 2
        assert cfg.dtypes[0].itemsize == (2 if "bf16" in chunk["name"] else 4)
        if chunk["name"].startswith("compile"):
            assert cfg.losses == ("ce",) and cfg.backends == ("compile",)
        elif chunk["name"].startswith("reference"):
            assert set(cfg.losses) == set(gpucheck_plan.LOSSES) and cfg.backends == ("reference",)
        else:
            assert set(cfg.losses) == set(gpucheck_plan.LOSSES)
            assert cfg.backends == ("triton", "cuda", "torch", "liger")


def test_step_timeouts_keep_time_for_later_steps() -> None:
    caps = dict(gpucheck_plan.CAPS)
    later = ["pytest-ext", "sanitize", "sweep", "report"]
    keep = sum(gpucheck_plan.RESERVE[s] for s in later)
    assert gpucheck_plan.step_timeout("build", 0, 1000, later, caps) == caps["build"]
    assert gpucheck_plan.step_timeout("build", 0, 300, later, caps) == 300 - keep - gpucheck_plan.GRACE_S
    assert gpucheck_plan.step_timeout("sweep", 0, 50, ["report"], caps) == 50 - 10 - gpucheck_plan.GRACE_S
    assert gpucheck_plan.step_timeout("sweep", 0, 10, ["report"], caps) == 0
    # a small budget: the early steps still run (at least MIN_STEP_S), never past the budget
    assert gpucheck_plan.step_timeout("env", 0, 120, ["build", *later], caps) == gpucheck_plan.MIN_STEP_S
    assert gpucheck_plan.step_timeout("env", 0, 30, ["build", *later], caps) == 30 - gpucheck_plan.GRACE_S


NVIDIA_SMI = """
==============NVSMI LOG==============

Timestamp                                 : Mon Dec  1 10:00:00 2026
Driver Version                            : 570.86.15
CUDA Version                              : 12.8

Attached GPUs                             : 1
GPU 00000000:19:00.0
    Product Name                          : NVIDIA H200
    Product Architecture                  : Hopper
    Persistence Mode                      : Enabled
    MIG Mode
        Current                           : Disabled
        Pending                           : Disabled
    FB Memory Usage
        Total                             : 143771 MiB
        Used                              : 0 MiB
    Performance State                     : P0
    Clocks Event Reasons
        SW Power Cap                      : Not Active
        HW Slowdown                       : Not Active
    Temperature
        GPU Current Temp                  : 30 C
    GPU Power Readings
        Current Power Limit               : 700.00 W
    Clocks
        SM                                : 345 MHz
        Memory                            : 3201 MHz
    Max Clocks
        SM                                : 1980 MHz
"""


def test_parse_nvidia_smi() -> None:
    got = gpucheck_report.parse_nvidia_smi(NVIDIA_SMI)
    assert got["Product Name"] == "NVIDIA H200" and got["Driver Version"] == "570.86.15"
    assert got["MIG Mode/Current"] == "Disabled" and got["FB Memory Usage/Total"] == "143771 MiB"
    assert got["Clocks/SM"] == "345 MHz" and got["Max Clocks/SM"] == "1980 MHz"
    assert got["Clocks Event Reasons/HW Slowdown"] == "Not Active"
    assert got["GPU Power Readings/Current Power Limit"] == "700.00 W"


def test_parse_sanitizer_log() -> None:
    log = ("========= COMPUTE-SANITIZER\n========= Invalid __global__ read of size 4 bytes\n"
           "=========     at scale_grad_kernel+0x1a0\n=========     Address 0x7f00 is out of bounds\n"
           "========= ERROR SUMMARY: 1 error\n")
    got = gpucheck_report.parse_sanitizer_log(log)
    assert got["errors"] == 1 and got["first_reports"][0].startswith("Invalid __global__ read")
    assert gpucheck_report.parse_sanitizer_log("========= ERROR SUMMARY: 0 errors\n")["errors"] == 0
    assert gpucheck_report.parse_sanitizer_log("killed")["errors"] is None


def test_source_digest_follows_the_sources(tmp_path: Path) -> None:
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "a.cu").write_text("x")
    (tmp_path / "setup.py").write_text("y")
    first = gpucheck_plan.source_digest(tmp_path)
    (tmp_path / "csrc" / "__pycache__").mkdir()
    (tmp_path / "csrc" / "__pycache__" / "a.pyc").write_text("z")
    (tmp_path / "csrc" / "notes.txt").write_text("z")
    assert gpucheck_plan.source_digest(tmp_path) == first
    (tmp_path / "csrc" / "a.cu").write_text("x2")
    assert gpucheck_plan.source_digest(tmp_path) != first


def test_bench_skip_unavailable_lists_instead_of_failing(capsys: pytest.CaptureFixture[str]) -> None:
    if bk.unavailable_reason("quack", __import__("torch").device("cpu")) is None:
        pytest.skip("quack runs here")
    rc = bench_main(["--device", "cpu", "--loss", "ce", "--backend", "reference", "quack", "--skip-unavailable",
                     "--n", "4", "--c", "7", "--repeat", "2", "--warmup", "1", "--quiet", "--cpu-allocator", "system"])
    assert rc == 0 and "skipped backend quack" in capsys.readouterr().err


def test_bench_runs_without_rich(tmp_path: Path) -> None:
    """An offline GPU machine may lack rich: the bench prints a plain markdown table."""
    code = ("import sys; sys.modules['rich'] = None\n"
            "from fusedloss.bench.cli import main\n"
            f"rc = main(['--device', 'cpu', '--loss', 'ce', '--backend', 'reference', '--n', '4', '--c', '7', "
            f"'--repeat', '2', '--warmup', '1', '--cpu-allocator', 'system', '--json', {str(tmp_path / 'r.json')!r}])\n"
            f"rc = rc or main(['--from-json', {str(tmp_path / 'r.json')!r}, '--markdown', {str(tmp_path / 'r.md')!r}])\n"
            "assert 'rich' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
            "raise SystemExit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| loss | backend | N | C |" in proc.stdout and "| ce | reference | 4 | 7 |" in proc.stdout
    assert (tmp_path / "r.md").exists()


FAKE_PY = r"""
import json, os, signal, subprocess, sys, time
from pathlib import Path
argv = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"argv": argv, "env": {k: os.environ.get(k) for k in (
        "TORCH_CUDA_ARCH_LIST", "FUSEDLOSS_BUILD_CUDA", "MAX_JOBS", "PYTORCH_NO_CUDA_MEMORY_CACHING",
        "TRITON_INTERPRET", "PYTHONPATH")}}) + "\n")
hang = os.environ.get("FAKE_HANG")
if hang and (argv[0] == "setup.py" or argv[:2] == ["-m", "pytest"]):
    # a grandchild in the step's process group that ignores SIGINT and SIGTERM
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, "
                              "signal.SIG_IGN); signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)", hang])
    with open(os.environ["FAKE_LOG"] + ".pids", "a") as f:
        f.write(f"{child.pid}\n")
    if argv[0] == "setup.py":  # the build ignores them too: only SIGKILL ends it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(120)  # pytest: KeyboardInterrupt at SIGINT, its grandchild left running
elif argv[0] == "-c":
    print("GPUCHECK_ENV " + json.dumps({"python": "3.x", "torch": "9.9", "triton": "9.9", "cuda_available": True,
                                        "capability": "9.0", "gpu": "Fake H200", "torchvision": None}))
elif argv[:2] == ["-m", "pytest"]:
    junit = next(a.split("=", 1)[1] for a in argv if a.startswith("--junitxml="))
    Path(junit).write_text('<testsuites><testsuite tests="2" failures="0" errors="0" skipped="1" time="1">'
                           '<testcase classname="t" name="a"/><testcase classname="t" name="b"><skipped/></testcase>'
                           '</testsuite></testsuites>')
elif argv[0].endswith("distill_bench.py"):
    Path(argv[argv.index("--json") + 1]).write_text(json.dumps({"rows": [
        {"v": 32000, "n": 4194, "method": "fused", "divergence": "kl", "ms": 1.0, "x_copy": 0.9}],
        "unavailable": {}, "complete": True}))
elif argv[0].endswith("targets_bench.py"):
    Path(argv[argv.index("--json") + 1]).write_text(json.dumps({
        "per_call": [{"shape": "32 x 10", "mode": "fwd+bwd", "loss": "ce", "backend": "triton", "us": 30.0,
                      "ratio": 1.1}],
        "soft": [{"dtype": "bf16", "c": 32000, "n": 4194, "backend": "triton", "loss": "ce", "ms": 1.0,
                  "x_copy": 1.0}], "unavailable": {}, "complete": True}))
elif argv[0].endswith("sanitize_drive.py"):
    Path(argv[argv.index("--json") + 1]).write_text(json.dumps({"cases": 3, "failed": 0, "skipped": {}}))
elif "--sweep-child" in argv:
    # FAKE_SWEEP: all (every chunk), first (one chunk, then hangs), none (hangs at once)
    plan = json.loads(Path(argv[argv.index("--sweep-child") + 1]).read_text())
    mode = os.environ.get("FAKE_SWEEP", "all")
    recs, status = [], []
    for i, ch in enumerate(plan["chunks"]):
        if mode == "none" or (mode == "first" and i == 1):
            time.sleep(120)
        a = ch["argv"]
        n, c, dt = int(a[a.index("--n") + 1]), int(a[a.index("--c") + 1]), a[a.index("--dtype") + 1]
        dt = {"bf16": "bfloat16", "fp32": "float32"}[dt]
        for loss, be in (("-", "copy"), ("ce", a[a.index("--backend") + 1])):
            recs.append({"loss": loss, "backend": be, "label": be, "n": n, "c": c, "dtype": dt, "x_copy": 1.5,
                         "x_logits": 1.0, "loss_err": 1e-6, "grad_err": 1e-7, "nan": 0, "inf": 0})
        Path(ch["json"]).parent.mkdir(parents=True, exist_ok=True)
        Path(ch["json"]).write_text("{}")
        status.append({"name": ch["name"], "rc": 0, "json": Path(ch["json"]).name})
        Path(plan["merged"]).write_text(json.dumps({"schema": 1, "machine": {"gpu": "Fake H200", "device": "cuda:0"},
                                                    "unavailable": {}, "results": recs}))
        Path(plan["status"]).write_text(json.dumps(status))
elif argv[:2] == ["-m", "torch.distributed.run"]:
    out = argv[argv.index("--out") + 1]
    Path(out).write_text("Largest difference over 20 steps: 0.00e+00 (tolerance 0.0001): OK.\n")
elif "--render" in argv:
    os.execv(sys.executable, [sys.executable, *argv])  # the real renderer, this interpreter
elif argv[0] == "setup.py":
    pass
else:
    sys.exit(f"fake python: unexpected {argv}")
"""


def _fake_gpu(tmp_path: Path, *args: str, timeout: float = 150, **env_extra: str):
    """gpucheck's GPU path (no --dry-run) with fake tools standing in for the GPU
    machine's: nvidia-smi, compute-sanitizer, and an interpreter that logs its calls."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (tmp_path / "fake.py").write_text(FAKE_PY)
    (bin_ / "fakepy").write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'fake.py'} \"$@\"\n")
    (bin_ / "nvidia-smi").write_text("#!/bin/sh\ncat <<'X'\n" + NVIDIA_SMI + "X\n")
    (bin_ / "compute-sanitizer").write_text(
        "#!/bin/sh\ncase \"$*\" in *--report-api-errors*) echo 'unrecognized option' >&2; exit 1;; esac\n"
        "while [ \"$1\" != \"${1#-}\" ]; do if [ \"$1\" = --log-file ]; then LOG=$2; fi;"
        " case $1 in --tool|--leak-check|--error-exitcode|--log-file|--report-api-errors) shift;; esac; shift; done\n"
        "echo '========= ERROR SUMMARY: 0 errors' > \"$LOG\"\nexec \"$@\"\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PATH=f"{bin_}:{env['PATH']}", FAKE_LOG=str(log), **env_extra)
    results = tmp_path / "r"
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "gpucheck.py"), str(results),
                           "--python", str(bin_ / "fakepy"), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    seconds = time.time() - t0
    summary = json.loads((results / "summary.json").read_text())
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return proc, seconds, results, summary, calls


def test_gpu_path_with_a_fake_device(tmp_path: Path) -> None:
    """The non-dry path (build, shards, sanitizer, cuda sweep plan, nvidia-smi) with fake
    tools: proves the commands and environments the steps get, which otherwise only a GPU
    session would. A sweep the budget cuts after its first chunk is ``partial``, which fails
    nothing (exit 0). ``--steps`` without env: env runs anyway (the device probe: CUDA
    visible, the capability the build compiles for)."""
    steps = ",".join(s for s in gpucheck_plan.STEPS if s != "env")
    proc, _, results, summary, calls = _fake_gpu(tmp_path, "--budget", "120", "--commit", "abc123", "--steps", steps,
                                                 "--cap", "sweep=5", FAKE_SWEEP="first")
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status == {"env": "pass", "nvidia-smi": "pass", "build": "pass", "pytest-triton-1": "pass",
                      "pytest-triton-2": "pass", "pytest-ext": "pass", "parallel": "pass", "sanitize": "pass",
                      "distill": "pass", "targets": "pass", "sweep": "partial", "report": "pass",
                      "nvidia-smi-end": "pass"}, \
        proc.stdout[-3000:]
    assert proc.returncode == 0 and summary["outcome"] == "pass" and summary["partial"] == ["sweep"]
    sweep = next(s for s in summary["steps"] if s["name"] == "sweep")
    assert sweep["chunks_done"] == 1 and sweep["detail"].startswith("1/20 chunks measured")
    assert "not measured: bf16-C32000" in sweep["detail"]
    junit = ET.parse(results / "gpucheck.junit.xml").getroot()
    assert junit.get("failures") == "0" and junit.get("errors") == "0"
    build = next(c for c in calls if c["argv"][0] == "setup.py")
    assert build["argv"] == ["setup.py", "build_ext", "--inplace"]
    assert build["env"]["TORCH_CUDA_ARCH_LIST"] == "9.0" and build["env"]["FUSEDLOSS_BUILD_CUDA"] == "1"
    assert int(build["env"]["MAX_JOBS"]) >= 1 and build["env"]["TRITON_INTERPRET"] is None
    shards = [c["argv"] for c in calls if c["argv"][:2] == ["-m", "pytest"] and "tests/test_triton_gpu.py" in c["argv"]]
    assert sorted(a[a.index("-k") + 1] for a in shards) == sorted(gpucheck_plan.TRITON_SHARDS)
    ext = next(c for c in calls if "tests/test_cuda_ext.py" in c["argv"])
    assert ext["env"]["FUSEDLOSS_BUILD_CUDA"] == "1" and "gpu" in ext["argv"]
    assert {"tests/test_train.py", "tests/test_head.py", "tests/test_bench_cli.py"} <= set(ext["argv"])
    # parallel: 2 gloo processes sharing the GPU, then NCCL with one process per GPU (the fake has 1)
    runs = [c["argv"] for c in calls if c["argv"][:2] == ["-m", "torch.distributed.run"]]
    assert [(a[a.index("--nproc-per-node") + 1], a[a.index("--backend") + 1], a[a.index("--device") + 1])
            for a in runs] == [("2", "gloo", "cuda"), ("1", "nccl", "cuda")]
    drive = next(c for c in calls if c["argv"][0].endswith("sanitize_drive.py"))
    assert drive["env"]["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"
    # the fake sanitizer is an "old" one that refuses --report-api-errors: one retry without it
    assert "unrecognized option" in (results / "logs" / "sanitize-first-try.log").read_text()
    assert drive["argv"][drive["argv"].index("--device") + 1] == "cuda" and "triton,cuda" in drive["argv"]
    distill = next(c["argv"] for c in calls if c["argv"][0].endswith("distill_bench.py"))
    assert distill[distill.index("--device") + 1] == "cuda" and "--no-compile" not in distill
    assert distill[distill.index("--vocab") + 1:distill.index("--vocab") + 3] == ["32000", "128256"]
    assert "fused x copy: kl V32000 0.90x" in next(s for s in summary["steps"] if s["name"] == "distill")["detail"]
    targets = next(c["argv"] for c in calls if c["argv"][0].endswith("targets_bench.py"))
    assert targets[targets.index("--device") + 1] == "cuda" and "--tiny" not in targets
    assert targets[targets.index("--classes") + 1:targets.index("--classes") + 3] == ["32000", "1000"]
    assert "worst x nn.CrossEntropyLoss 1.10" in next(s for s in summary["steps"] if s["name"] == "targets")["detail"]
    plan = json.loads((results / "sweep" / "plan.json").read_text())
    assert len(plan["chunks"]) == 20 and all(ch["argv"][1] == "cuda" for ch in plan["chunks"])
    assert summary["env"]["gpu"] == "Fake H200" and summary["env"]["commit_arg"] == "abc123"
    assert summary["env"]["nvidia_smi"]["Product Name"] == "NVIDIA H200"
    assert (results / "nvidia-smi.txt").exists() and (results / "nvidia-smi-end.txt").exists()
    assert "# gpucheck: Fake H200 (sm 9.0): PASS (partial: sweep)" in (results / "summary.md").read_text()
    assert "| ce | triton |" in (results / "sweep.md").read_text()  # the finished chunk, rendered


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_hung_steps_are_stopped_together_within_the_budget(tmp_path: Path) -> None:
    """build and both Triton shards hang, each with a grandchild that ignores SIGINT and
    SIGTERM (the build too): all three are stopped at once, their whole process groups
    killed, and the run ends within budget + MARGIN_S (one after another would take
    3 x ~14 s of stopping)."""
    budget = 22
    marker = f"gpucheck-hang-{os.getpid()}"
    try:
        proc, seconds, _, summary, _ = _fake_gpu(tmp_path, "--budget", str(budget), FAKE_HANG=marker, timeout=120)
        steps = {s["name"]: s for s in summary["steps"]}
        assert {n: steps[n]["status"] for n in ("build", "pytest-triton-1", "pytest-triton-2")} == {
            "build": "timeout", "pytest-triton-1": "timeout", "pytest-triton-2": "timeout"}, proc.stdout[-3000:]
        assert seconds <= budget + gpucheck_plan.MARGIN_S, proc.stdout[-3000:]
        for n in ("build", "pytest-triton-1", "pytest-triton-2"):
            assert steps[n]["seconds"] <= steps[n]["timeout_s"] + gpucheck_plan.GRACE_S + 1
        assert steps["sweep"]["status"] == "skipped" and "budget spent" in steps["sweep"]["detail"]
        assert summary["final"] and summary["outcome"] == "fail" and proc.returncode == 1
    finally:
        pids = [int(x) for x in Path(str(tmp_path / "calls.jsonl") + ".pids").read_text().split()]
        alive = [pid for pid in pids if _running(pid)]
        for pid in alive:  # the test's own grandchildren, should gpucheck have left any
            os.kill(pid, signal.SIGKILL)
    assert len(pids) == 3 and not alive


def test_sanitize_drive_writes_its_json_after_every_case(tmp_path: Path) -> None:
    """A driver cut by the budget leaves the cases it ran (atomically rewritten JSON)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sanitize_drive", ROOT / "bench" / "gpu" / "sanitize_drive.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "d.json"
    drv = mod.Driver(__import__("torch").device("cpu"), True, out)
    drv.record("a", "triton", True, 0.0)
    drv.record("b", "triton", False, 1.0, "bad")
    doc = json.loads(out.read_text())
    assert (doc["cases"], doc["failed"], doc["complete"]) == (2, 1, False)
    assert [r["case"] for r in doc["results"]] == ["a", "b"] and not list(tmp_path.glob("*.tmp"))
    drv.save(complete=True)
    assert json.loads(out.read_text())["complete"] is True


@pytest.mark.gpu
@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA device")
def test_sanitize_drive_on_cuda(tmp_path: Path) -> None:
    """The sanitizer's driver without the sanitizer: every kernel family of both GPU
    backends against the reference (``pytest -m gpu``; gpucheck runs it under memcheck)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "sanitize_drive.py"), "--device", "cuda",
                           "--require", "triton,cuda", "--json", str(tmp_path / "d.json")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert json.loads((tmp_path / "d.json").read_text())["failed"] == 0
