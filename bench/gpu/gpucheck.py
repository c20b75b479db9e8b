"""GPU proof: build, test, sanitize and benchmark every GPU path in one command, on a budget.

    bash bench/gpu/check.sh RESULTS [--budget 480] [--dry-run] [--steps ...] [--cap STEP=SECONDS]
    python bench/gpu/gpucheck.py RESULTS ...               # the same (check.sh only picks python3)

Steps, in order (``build`` and ``pytest-triton`` run at the same time: the Triton tests
need no extension, and the GPU idles while nvcc compiles):

  env            versions of python, torch, triton, nvcc, compute-sanitizer, pytest, liger...;
                 the device probe: always runs, whatever ``--steps`` says
  nvidia-smi     ``nvidia-smi -q`` (again at the end of the run, after the load)
  build          ``setup.py build_ext --inplace`` for this GPU's arch (TORCH_CUDA_ARCH_LIST)
  pytest-triton  ``pytest -m gpu tests/test_triton_gpu.py tests/test_triton_soft.py tests/test_triton_mix.py
                 tests/test_triton_expected.py``
  pytest-ext     ``pytest -m gpu`` on the CUDA extension, the bench CLI, the training script, the LLM head
  sanitize       ``compute-sanitizer --tool memcheck`` on ``bench/gpu/sanitize_drive.py``
  distill        ``bench/gpu/distill_bench.py``: the fused distillation op's fwd+bwd (kl, reverse kl, jsd)
                 at V 32000 and 128256, bf16, as a multiple of a copy of both logits, beside F.kl_div
                 eager and compiled and Liger's KL/JSD (when carried); its gpu tests run in pytest-triton
  targets        ``bench/gpu/targets_bench.py``: the per-call cost at small shapes (every loss, triton
                 and cuda, against nn.CrossEntropyLoss) and soft targets for every loss (the expected
                 loss, fwd+bwd, x a copy of logits and targets, x the backend's soft ce, beside
                 F.cross_entropy); its kernels' gpu tests run in pytest-triton and pytest-ext
  sweep          ``fusedloss-bench`` over every loss, bf16/fp32, C in {1000, 32000, 128256, 262144},
                 in order of value; cut by the budget after one chunk or more it is ``partial``
  report         sweep.md/sweep.png, the summary

Every step runs in its own process group with a timeout cut from one wall-clock budget
(``--budget``, default 480 s): a step that overruns gets SIGINT (pytest then still writes
its JUnit XML), then SIGTERM, then SIGKILL, to its whole group, every running step at once,
within the GRACE_S its timeout kept back, so the run ends within the budget + MARGIN_S (10 s,
the write-up); a failed step never stops the later ones;
``summary.json``/``summary.md``/``gpucheck.junit.xml`` are rewritten after every step, so
a run killed from outside still leaves what it had. ``--dry-run`` runs the same steps on a
CPU machine (Triton's interpreter, tiny shapes, no build, no sanitizer) to prove the script.

This file, gpucheck_plan.py (what a run does and in how long) and gpucheck_report.py (the
tools' outputs parsed, the sweep's child and markdown) import only the standard library: they
must run before the extension is built and report even when the device's torch cannot be
imported. The package is put on the children's ``PYTHONPATH`` through a temporary folder of
symbolic links (``fusedloss`` with ``triton_kernels`` inside, as ``setup.py``'s ``package_dir``
maps it), so nothing needs ``pip install``; ``.carry/site-packages`` (``bench/gpu/vendor.sh``:
Liger-Kernel) is added when present.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from gpucheck_plan import (CAPS, DISTILL_VOCABS, MARGIN_S, PARALLEL_ARGS, PARALLEL_DRY_ARGS, REPO, STEPS, STOP_WAITS, TOOL_PROBE_S,
                           TARGETS_CLASSES, TRITON_GPU_TESTS, TRITON_SHARDS, source_digest, step_timeout, sweep_plan)
from gpucheck_report import (_write_atomic, parse_junit, parse_nvidia_smi, parse_sanitizer_log, render_sweep,
                             sweep_child)


# ---------------------------------------------------------------------------
# The parent: steps, budget, processes
# ---------------------------------------------------------------------------

def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs; zombies (exited, not yet reaped by
    whoever inherited them) do not count."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        pids = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return True  # no /proc: trust killpg
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # state, ppid, pgrp, ...
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


class Stop(Exception):
    """SIGTERM/SIGINT/SIGHUP reached the parent."""


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = bool(args.dry_run)
        self.results = Path(args.results).resolve()
        self.logs = self.results / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.py = args.python or sys.executable
        self.t0 = time.time()
        self.deadline = self.t0 + args.budget
        self.caps = dict(CAPS)
        for item in args.cap or []:
            name, _, sec = item.partition("=")
            if name not in CAPS:
                raise SystemExit(f"gpucheck: --cap: unknown step '{name}'")
            self.caps[name] = float(sec)
        # env always runs: it is the device probe (is CUDA visible; the capability the build
        # compiles for), which every GPU step depends on
        self.selected = [s for s in STEPS if s == "env" or s in (args.steps.split(",") if args.steps else STEPS)]
        self.steps: list[dict[str, object]] = []
        self.info: dict[str, object] = {}
        self.running: list[dict] = []  # jobs started and not finished
        self.stopping = False
        self.site = Path(tempfile.mkdtemp(prefix="gpucheck-site-"))
        self.cuda_home = self._cuda_home()

    # -- environment ---------------------------------------------------------
    def log(self, msg: str) -> None:
        print(f"[gpucheck +{time.time() - self.t0:5.1f}s] {msg}", flush=True)

    @staticmethod
    def _cuda_home() -> str | None:
        cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
        nvcc = shutil.which("nvcc")
        if nvcc:
            cands.append(str(Path(nvcc).resolve().parent.parent))
        cands += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
        for c in cands:
            if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
                return c
        return None

    def refresh_site(self) -> None:
        """``<site>/fusedloss``: a link per entry of python/fusedloss, plus triton_kernels
        (re-run after the build so the new ``_C.so`` is linked too)."""
        pkg = self.site / "fusedloss"
        pkg.mkdir(exist_ok=True)
        for entry in (REPO / "python" / "fusedloss").iterdir():
            link = pkg / entry.name
            if entry.name != "__pycache__" and not link.is_symlink():
                link.symlink_to(entry)
        if not (pkg / "triton_kernels").is_symlink():
            (pkg / "triton_kernels").symlink_to(REPO / "triton_kernels")

    def child_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        paths = [str(self.site)]
        carry = REPO / ".carry" / "site-packages"
        if carry.is_dir():
            paths.append(str(carry))
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", MPLBACKEND="Agg",
                   PYTHONDONTWRITEBYTECODE="1")
        if self.dry:
            env["TRITON_INTERPRET"] = "1"
        else:
            env.pop("TRITON_INTERPRET", None)
        if self.cuda_home:
            env["CUDA_HOME"] = self.cuda_home
        env.update(extra)
        return env

    # -- processes -----------------------------------------------------------
    def start(self, name: str, cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict:
        logf = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed in finish()
        logf.write(f"$ {' '.join(cmd)}\n# timeout {timeout:.0f} s\n")
        logf.flush()
        self.log(f"{name}: start (timeout {timeout:.0f} s)")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env or self.child_env(), stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        job = {"name": name, "proc": proc, "logf": logf, "t0": time.time(), "timeout": timeout,
               "timed_out": False, "cmd": cmd}
        self.running.append(job)
        return job

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # start_new_session: the group's id is the leader's pid
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, jobs: list[dict]) -> None:
        """Until every job and its whole process group are gone, stopping the jobs past
        their timeout (every job, once ``self.stopping``): all at once, never one after
        another, so a stop takes at most GRACE_S whatever the number of jobs."""
        pending = list(jobs)
        while pending:
            now = time.time()
            pending = [job for job in pending if not self._advance(job, now)]
            if pending:
                time.sleep(0.1)

    def _advance(self, job: dict, now: float) -> bool:
        """One look at a job; True once it is over (its group gone, or given up on)."""
        proc = job["proc"]
        leader_done = proc.poll() is not None
        stop = job.get("stop")  # [index into STOP_WAITS, when that signal was sent]
        if stop is None:
            if leader_done:
                self._signal(proc, signal.SIGKILL)  # anything the step left behind in its group
                return True
            if not (self.stopping or now - job["t0"] > job["timeout"]):
                return False
            job["timed_out"] = not self.stopping
            self.log(f"{job['name']}: {'stopping' if self.stopping else 'timeout'}, interrupting its process group")
            job["stop"] = [0, now]
            self._signal(proc, STOP_WAITS[0][0])
            return False
        if leader_done and not group_alive(proc.pid):
            return True
        k, since = stop
        if now - since < STOP_WAITS[k][1]:
            return False
        if k + 1 == len(STOP_WAITS):
            self.log(f"{job['name']}: process group {proc.pid} outlived SIGKILL; left behind")
            return True
        job["stop"] = [k + 1, now]
        self._signal(proc, STOP_WAITS[k + 1][0])
        return False

    def finish(self, job: dict, status: str | None = None, detail: str = "", **more: object) -> dict:
        proc = job["proc"]
        job["logf"].close()
        if job in self.running:
            self.running.remove(job)
        rc = proc.returncode
        if status is None:
            status = "timeout" if job["timed_out"] else ("stopped" if self.stopping else ("pass" if rc == 0 else "fail"))
        rec = {"name": job["name"], "status": status, "rc": rc, "seconds": round(time.time() - job["t0"], 1),
               "timeout_s": round(job["timeout"]), "log": f"logs/{job['name']}.log", "detail": detail, **more}
        self.record(rec)
        return rec

    def record(self, rec: dict) -> None:
        self.steps.append(rec)
        self.log(f"{rec['name']}: {rec['status']}" + (f" ({rec['detail']})" if rec.get("detail") else ""))
        if rec["status"] in ("fail", "timeout", "error") and rec.get("log"):
            tail = (self.results / rec["log"]).read_text(errors="replace").splitlines()[-25:]
            print("\n".join("    | " + ln[:220] for ln in tail), flush=True)
        self.write_summary()

    def skip(self, name: str, why: str) -> None:
        self.record({"name": name, "status": "skipped", "rc": None, "seconds": 0, "timeout_s": None,
                     "log": None, "detail": why})

    def run(self, name: str, cmd: list[str], later: list[str], env: dict[str, str] | None = None) -> dict:
        return self.finish(self.wait_one(self.start(name, cmd, self.timeout(name, later), env)))

    def wait_one(self, job: dict) -> dict:
        self.wait([job])
        return job

    def timeout(self, step: str, later: list[str]) -> float:
        return step_timeout(step, time.time(), self.deadline, [s for s in later if s in self.selected], self.caps)

    def later(self, step: str) -> list[str]:
        return list(STEPS[STEPS.index(step) + 1:])

    def enough_time(self, step: str, later: list[str] | None = None, name: str | None = None) -> bool:
        """Whether ``step`` (recorded as ``name``) still gets 5 s or more; else skip it."""
        if self.stopping:
            self.skip(name or step, "stopped by a signal")
            return False
        t = self.timeout(step, self.later(step) if later is None else later)
        if t < 5:
            self.skip(name or step, f"budget spent ({self.args.budget:.0f} s)")
            return False
        return True

    # -- the steps -----------------------------------------------------------
    def step_env(self) -> None:
        script = r"""
import importlib, importlib.metadata as md, importlib.util, json, platform, sys
out = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
for mod, dist in [("torch", "torch"), ("triton", "triton"), ("numpy", "numpy"), ("pytest", "pytest"),
                  ("liger_kernel", "liger-kernel"), ("quack", "quack-kernels"), ("rich", "rich"),
                  ("matplotlib", "matplotlib"), ("torchvision", "torchvision"), ("setuptools", "setuptools"),
                  ("ninja", "ninja"), ("hypothesis", "hypothesis")]:
    if importlib.util.find_spec(mod) is None:
        out[mod] = None
        continue
    try:
        out[mod] = md.version(dist)
    except md.PackageNotFoundError:
        out[mod] = "present"
import torch
out["torch_cuda"] = torch.version.cuda
out["cuda_available"] = torch.cuda.is_available()
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
               sm_count=p.multi_processor_count, device_count=torch.cuda.device_count(),
               cudnn=torch.backends.cudnn.version())
print("GPUCHECK_ENV " + json.dumps(out))
"""
        timeout = self.timeout("env", self.later("env"))
        job = self.start("env", [self.py, "-c", script], timeout)
        tools = {"nvcc": [str(Path(self.cuda_home) / "bin" / "nvcc") if self.cuda_home else "nvcc", "--version"],
                 "compute-sanitizer": [self.sanitizer() or "compute-sanitizer", "--version"],
                 "gcc": ["gcc", "--version"], "nvidia-smi-driver": ["nvidia-smi", "--query-gpu=driver_version",
                                                                    "--format=csv,noheader"]}
        # the version probes run beside the torch import, within the env step's timeout
        probes = self._start_probes(tools)
        self.info.update(dict.fromkeys(tools))
        try:
            self.wait_one(job)
            for name, out in self._collect_probes(probes, min(job["t0"] + timeout, time.time() + TOOL_PROBE_S)).items():
                lines = [ln.strip() for ln in (out or "").splitlines() if ln.strip()]
                # nvcc and compute-sanitizer end with their version; gcc and the query start with it
                self.info[name] = (lines[-1] if name in ("nvcc", "compute-sanitizer") else lines[0]) if lines else None
        finally:
            for proc, _ in probes.values():
                self._signal(proc, signal.SIGKILL)
        text = (self.logs / "env.log").read_text(errors="replace")
        found = [ln for ln in text.splitlines() if ln.startswith("GPUCHECK_ENV ")]
        if found:
            self.info.update(json.loads(found[-1][len("GPUCHECK_ENV "):]))
        self.info.update(cuda_home=self.cuda_home)
        (self.results / "env.json").write_text(json.dumps(self.info, indent=1) + "\n")
        keys = ("python", "torch", "torch_cuda", "triton", "gpu", "capability", "nvcc", "compute-sanitizer",
                "nvidia-smi-driver", "pytest", "liger_kernel", "rich", "matplotlib", "ninja", "cuda_home")
        self.log("versions: " + ", ".join(f"{k}={self.info.get(k)}" for k in keys))
        self.finish(job, detail=f"torch {self.info.get('torch')}, triton {self.info.get('triton')}, "
                                f"gpu {self.info.get('gpu')}" if found else "no version report (torch import?)",
                    status=None if found else "fail")

    @staticmethod
    def _start_probes(cmds: dict[str, list[str]]) -> dict[str, tuple[subprocess.Popen, object]]:
        started = {}
        for name, cmd in cmds.items():
            out = tempfile.TemporaryFile()  # noqa: SIM115 - closed in _collect_probes
            try:
                started[name] = (subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                                  start_new_session=True), out)
            except OSError:
                out.close()
        return started

    def _collect_probes(self, probes: dict[str, tuple[subprocess.Popen, object]],
                        until: float) -> dict[str, str | None]:
        """Each probe's output, or None (not found, failed, or still running at ``until``:
        then its process group is killed)."""
        got: dict[str, str | None] = {}
        for name, (proc, out) in probes.items():
            try:
                proc.wait(max(0.0, until - time.time()))
                out.seek(0)
                got[name] = out.read().decode(errors="replace") if proc.returncode == 0 else None
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                self.log(f"env: {name} probe still running after {TOOL_PROBE_S} s or the env step's time, killed")
                got[name] = None
            finally:
                out.close()
        return got

    def provenance(self) -> dict[str, object]:
        out: dict[str, object] = {"commit_arg": self.args.commit}
        src = REPO / ".carry" / "source.txt"
        if src.is_file():
            for ln in src.read_text().splitlines():
                k, _, v = ln.partition(" ")
                out[f"vendored_{k}"] = v.strip()
        if (REPO / ".git").exists():
            try:
                out["git_head"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                                 text=True, timeout=5).stdout.strip() or None
            except (OSError, subprocess.SubprocessError):
                pass
        return out

    def step_nvidia_smi(self, name: str = "nvidia-smi", fname: str = "nvidia-smi.txt") -> None:
        if shutil.which("nvidia-smi") is None:
            self.skip(name, "nvidia-smi not found")
            return
        later = self.later("nvidia-smi") if name == "nvidia-smi" else []
        if not self.enough_time("nvidia-smi", later, name=name):
            return
        job = self.wait_one(self.start(name, ["nvidia-smi", "-q"], self.timeout("nvidia-smi", later)))
        text = (self.logs / f"{name}.log").read_text(errors="replace")
        (self.results / fname).write_text(text)
        self.info[fname.replace(".txt", "").replace("-", "_")] = parse_nvidia_smi(text)
        self.finish(job, detail=parse_nvidia_smi(text).get("Product Name", ""))

    def sanitizer(self) -> str | None:
        cands = [shutil.which("compute-sanitizer")]
        for home in filter(None, [self.cuda_home, "/usr/local/cuda", *glob.glob("/usr/local/cuda-*")]):
            cands += [str(Path(home) / "bin" / "compute-sanitizer"),
                      str(Path(home) / "compute-sanitizer" / "compute-sanitizer")]
        return next((c for c in cands if c and os.access(c, os.X_OK)), None)

    def build_job(self, later: list[str]) -> dict:
        cap = self.info.get("capability")
        env = self.child_env(FUSEDLOSS_BUILD_CUDA="1", MAX_JOBS=str(max(1, (os.cpu_count() or 2) - 2)),
                             **({"TORCH_CUDA_ARCH_LIST": str(cap)} if cap else {}))
        return self.start("build", [self.py, "setup.py", "build_ext", "--inplace"], self.timeout("build", later), env)

    def pytest_cmd(self, name: str, files: list[str], select: str | None = None) -> list[str]:
        return [self.py, "-m", "pytest", "-m", "gpu", *files, *(["-k", select] if select else []),
                f"--junitxml={self.results / f'junit-{name}.xml'}",
                "-q", "-rfEs", "--tb=short", "--durations=15", "-p", "no:cacheprovider",
                "--continue-on-collection-errors"]

    def finish_pytest(self, job: dict, note: str = "") -> None:
        junit = self.results / f"junit-{job['name']}.xml"
        detail, counts = "no JUnit XML", {}
        if junit.exists():
            try:
                counts = parse_junit(junit)
                detail = (f"{counts['passed']} passed, {counts['failures']} failed, {counts['errors']} errors, "
                          f"{counts['skipped']} skipped")
            except ET.ParseError as exc:
                detail = f"unreadable JUnit XML: {exc}"
        status = None
        if not job["timed_out"] and job["proc"].returncode == 0 and counts and counts.get("passed", 0) == 0 \
                and not self.dry:
            status, detail = "fail", detail + " (nothing ran on the GPU)"
        self.finish(job, status=status, detail=detail + note, junit=junit.name if junit.exists() else None,
                    counts=counts)

    def step_build_and_triton_tests(self) -> None:
        """build || pytest-triton: the Triton tests need no extension, and the GPU idles
        while nvcc compiles."""
        later = self.later("pytest-triton")
        jobs = []
        if "build" in self.selected:
            if self.dry:
                self.skip("build", "dry run: no build (the installed extension is used)")
            elif self.enough_time("build", later):
                jobs.append(self.build_job(later))
        if "pytest-triton" in self.selected and self.enough_time("pytest-triton", later):
            for k, select in enumerate(TRITON_SHARDS, 1):
                name = f"pytest-triton-{k}"
                jobs.append(self.start(name, self.pytest_cmd(name, TRITON_GPU_TESTS, select),
                                       self.timeout("pytest-triton", later)))
        self.wait(jobs)
        for job in jobs:
            if job["name"] == "build":
                self.refresh_site()
                so = list((REPO / "python" / "fusedloss").glob("_C*.so"))
                self.finish(job, detail=f"TORCH_CUDA_ARCH_LIST={self.info.get('capability')}, "
                                        f"{'_C built' if so else 'no _C'}")
            else:
                self.finish_pytest(job)

    def step_pytest_ext(self) -> None:
        # test_train.py skips itself without torchvision (importorskip); test_head.py: the LLM
        # head (its gpu-marked tests; a file with none just collects nothing under -m gpu)
        files = ["tests/test_cuda_ext.py", "tests/test_bench_cli.py", "tests/test_train.py", "tests/test_head.py",
                 "tests/test_loss_options.py"]
        # FUSEDLOSS_BUILD_CUDA=1: a missing CUDA part fails the build tests instead of skipping them
        env = self.child_env() if self.dry else self.child_env(FUSEDLOSS_BUILD_CUDA="1")
        job = self.start("pytest-ext", self.pytest_cmd("pytest-ext", files),
                         self.timeout("pytest-ext", self.later("pytest-ext")), env)
        self.finish_pytest(self.wait_one(job))

    def step_parallel(self) -> None:
        """fusedloss.parallel on the device (bench/parallel_smoke.py: split vs unsplit loss curves,
        exit 1 if they part). Two processes over gloo sharing GPU 0 (the GPU backends' kernels
        under the split losses, CUDA tensors through gloo), then NCCL with one process per GPU:
        NCCL refuses two ranks on one GPU, so on a one-GPU machine that is a group of one (every
        collective still goes through NCCL, no split). Dry run: two gloo processes on the CPU."""
        run = [self.py, "-m", "torch.distributed.run", "--standalone"]
        if self.dry:
            cmds = [[*run, "--nproc-per-node", "2", "bench/parallel_smoke.py", *PARALLEL_DRY_ARGS, "--device", "cpu",
                     "--backend", "gloo", "--out", str(self.results / "parallel_gloo_cpu.md")]]
        else:
            gpus = max(1, int(self.info.get("device_count") or 1))
            cmds = [[*run, "--nproc-per-node", str(n), "bench/parallel_smoke.py", *PARALLEL_ARGS, "--device", "cuda",
                     "--backend", backend, "--out", str(self.results / f"parallel_{backend}_cuda.md")]
                    for backend, n in (("gloo", 2), ("nccl", min(gpus, 8)))]
        # one job: both runs in one process group, the second only if the first passed
        job = self.start("parallel", ["bash", "-c", " && ".join(shlex.join(c) for c in cmds)],
                         self.timeout("parallel", self.later("parallel")))
        self.wait_one(job)
        written = sorted(p.name for p in self.results.glob("parallel_*.md"))
        self.finish(job, detail="wrote " + (", ".join(written) if written else "nothing"))

    def step_sanitize(self) -> None:
        drive_json = self.results / "sanitize_drive.json"
        drive = [self.py, "bench/gpu/sanitize_drive.py", "--json", str(drive_json)]
        later = self.later("sanitize")
        if self.dry:
            job = self.start("sanitize", [*drive, "--device", "cpu", "--tiny"], self.timeout("sanitize", later))
            self.finish(self.wait_one(job), detail=self._drive_detail(drive_json) + "; dry run: no sanitizer")
            return
        drive += ["--device", "cuda", "--require", "triton,cuda"]
        san = self.sanitizer()
        if san is None:
            job = self.start("sanitize", drive, self.timeout("sanitize", later))
            self.finish(self.wait_one(job), detail=self._drive_detail(drive_json)
                        + "; compute-sanitizer NOT FOUND: the driver ran without memcheck")
            return
        log = self.results / "sanitizer.log"
        env = self.child_env(PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # one allocation per tensor: exact bounds
        base = [san, "--tool", "memcheck", "--leak-check", "no", "--error-exitcode", "99", "--log-file", str(log)]
        job = self.wait_one(self.start("sanitize", [*base, "--report-api-errors", "no", *drive],
                                       self.timeout("sanitize", later), env))
        if not drive_json.exists() and not job["timed_out"] and not self.stopping and time.time() - job["t0"] < 20:
            self.log("sanitize: retrying without --report-api-errors (older compute-sanitizer?)")
            job["logf"].close()
            self.running.remove(job)
            (self.logs / "sanitize.log").rename(self.logs / "sanitize-first-try.log")
            job = self.wait_one(self.start("sanitize", [*base, *drive], self.timeout("sanitize", later), env))
        parsed = parse_sanitizer_log(log.read_text(errors="replace")) if log.exists() else {"errors": None}
        rc = job["proc"].returncode
        status = None
        if not job["timed_out"] and not self.stopping:
            status = "pass" if rc == 0 and parsed["errors"] == 0 else "fail"
        self.finish(job, status=status, sanitizer=parsed,
                    detail=f"memcheck errors: {parsed['errors']}; " + self._drive_detail(drive_json))

    def step_distill(self) -> None:
        """bench/gpu/distill_bench.py: fused distillation fwd+bwd vs a copy, F.kl_div (eager, compiled)
        and Liger (when carried). It rewrites its JSON after every row: cut by the budget after one
        row or more, the step is ``partial``."""
        out = self.results / "distill.json"
        cmd = [self.py, "bench/gpu/distill_bench.py", "--json", str(out), "--md", str(self.results / "distill.md")]
        if self.dry:
            cmd += ["--device", "cpu", "--tiny"]
        else:
            cmd += ["--device", "cuda", "--vocab", *map(str, DISTILL_VOCABS)]
            cmd += ["--no-compile"] if self.args.no_compile else []
        job = self.wait_one(self.start("distill", cmd, self.timeout("distill", self.later("distill"))))
        try:
            doc = json.loads(out.read_text()) if out.exists() else {}
        except ValueError:
            doc = {}
        rows = doc.get("rows", [])
        measured = [r for r in rows if "ms" in r]
        errors = [f"{r['method']}/{r['divergence']}/V{r['v']}" for r in rows if r.get("error")]
        fused = [f"{r['divergence']} V{r['v']} {r['x_copy']:.2f}x" for r in measured if r["method"] == "fused"]
        detail = f"{len(measured)} rows measured" + (f"; fused x copy: {', '.join(fused)}" if fused else "")
        if errors:
            detail += f"; errors: {', '.join(errors)}"
        if doc.get("unavailable"):
            detail += f"; not measured: {', '.join(sorted(doc['unavailable']))}"
        status = None
        if job["timed_out"] and measured and not errors:
            status, detail = "partial", detail + f" (the step's {job['timeout']:.0f} s ran out)"
        self.finish(job, status=status, detail=detail)

    def step_targets(self) -> None:
        """bench/gpu/targets_bench.py: the per-call table (issue 24) and soft targets for every loss
        (issue 25). It rewrites its JSON after every row: cut by the budget after one row or more,
        the step is ``partial``."""
        out = self.results / "targets.json"
        cmd = [self.py, "bench/gpu/targets_bench.py", "--json", str(out), "--md", str(self.results / "targets.md")]
        cmd += ["--tiny"] if self.dry else ["--device", "cuda", "--classes", *map(str, TARGETS_CLASSES)]
        job = self.wait_one(self.start("targets", cmd, self.timeout("targets", self.later("targets"))))
        try:
            doc = json.loads(out.read_text()) if out.exists() else {}
        except ValueError:
            doc = {}
        calls = [r for r in doc.get("per_call", []) if "us" in r]
        soft = [r for r in doc.get("soft", []) if "ms" in r]
        errors = [f"{r['loss']}/{r['backend']}" for r in doc.get("per_call", []) + doc.get("soft", [])
                  if r.get("error")]
        worst = max((r["ratio"] for r in calls if r["backend"] != "torch"), default=None)
        detail = f"{len(calls)} per-call rows, {len(soft)} soft-target rows measured"
        if worst is not None:
            detail += f"; per call, worst x nn.CrossEntropyLoss {worst:.2f}"
        if errors:
            detail += f"; errors: {', '.join(sorted(set(errors)))}"
        if doc.get("unavailable"):
            detail += f"; not measured: {', '.join(sorted(doc['unavailable']))}"
        status = None
        if job["timed_out"] and (calls or soft) and not errors:
            status, detail = "partial", detail + f" (the step's {job['timeout']:.0f} s ran out)"
        self.finish(job, status=status, detail=detail)

    @staticmethod
    def _drive_detail(path: Path) -> str:
        if not path.exists():
            return "driver wrote no JSON"
        try:
            d = json.loads(path.read_text())
        except ValueError as exc:
            return f"driver JSON unreadable: {exc}"
        skipped = f", skipped {sorted(d['skipped'])}" if d.get("skipped") else ""
        cut = "" if d.get("complete", True) else " (incomplete: the driver did not finish)"
        return f"driver: {d['cases']} cases, {d['failed']} failed{skipped}{cut}"

    def step_sweep(self) -> None:
        status_path = self.results / "sweep" / "status.json"
        plan = {"chunks": sweep_plan(self.dry, self.results, with_compile=not self.args.no_compile),
                "merged": str(self.results / "sweep.json"), "markdown": str(self.results / "sweep_full.md"),
                "status": str(status_path)}
        (self.results / "sweep").mkdir(exist_ok=True)
        plan_path = self.results / "sweep" / "plan.json"
        _write_atomic(plan_path, json.dumps(plan, indent=1) + "\n")
        job = self.wait_one(self.start("sweep", [self.py, str(Path(__file__).resolve()), "--sweep-child",
                                                 str(plan_path)], self.timeout("sweep", self.later("sweep"))))
        try:
            done = json.loads(status_path.read_text()) if status_path.exists() else []
        except ValueError:
            done = []
        measured = sum(1 for d in done if d.get("json"))
        bad = [str(d["name"]) for d in done if d.get("rc")]
        detail = f"{measured}/{len(plan['chunks'])} chunks measured"
        if bad:
            detail += f"; chunks that failed: {', '.join(bad)}"
        status = None
        cut = [str(c["name"]) for c in plan["chunks"][len(done):]]
        if job["timed_out"] and measured and not bad:
            # the budget cut the tail of a plan ordered by value: what finished stands
            status = "partial" if cut else "pass"
            if cut:
                detail += f" (the step's {job['timeout']:.0f} s ran out; not measured: {', '.join(cut)})"
        self.finish(job, status=status, detail=detail, chunks_done=measured, chunks=len(plan["chunks"]))

    def step_report(self) -> None:
        if not (self.results / "sweep.json").exists():
            self.skip("report", "no sweep.json to render")
        elif self.enough_time("report", []):
            job = self.wait_one(self.start("report", [self.py, str(Path(__file__).resolve()), "--render",
                                                      str(self.results)], self.timeout("report", [])))
            self.finish(job, detail="sweep.md" + (", sweep.png" if (self.results / "sweep.png").exists() else ""))
        if not self.dry and shutil.which("nvidia-smi"):
            self.step_nvidia_smi("nvidia-smi-end", "nvidia-smi-end.txt")

    # -- driver ----------------------------------------------------------------
    def main(self) -> int:
        def on_signal(signum: int, _frame: object) -> None:
            if self.stopping:
                return
            self.stopping = True
            raise Stop(signal.Signals(signum).name)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)
        self.log(f"results in {self.results}; budget {self.args.budget:.0f} s; "
                 f"{'DRY RUN (CPU, interpreter)' if self.dry else 'GPU run'}; steps {','.join(self.selected)}")
        self.refresh_site()
        self.info.update(source_digest=source_digest(), cpu_count=os.cpu_count(), **self.provenance())
        self.write_summary()
        try:
            self.step_env()
            gpu_ok = self.dry or bool(self.info.get("cuda_available"))
            if not gpu_ok:
                self.log("torch sees no CUDA device: the GPU steps cannot run (use --dry-run on a CPU machine)")
            if "nvidia-smi" in self.selected and not self.dry:
                self.step_nvidia_smi()
            for name, fn in (("build+triton", self.step_build_and_triton_tests), ("pytest-ext", self.step_pytest_ext),
                             ("parallel", self.step_parallel), ("sanitize", self.step_sanitize),
                             ("distill", self.step_distill), ("targets", self.step_targets),
                             ("sweep", self.step_sweep)):
                names = ["build", "pytest-triton"] if name == "build+triton" else [name]
                wanted = [n for n in names if n in self.selected]
                if not wanted:
                    continue
                if not gpu_ok:
                    for n in wanted:
                        self.skip(n, "no CUDA device visible to torch")
                    continue
                if name == "build+triton" or self.enough_time(name):
                    fn()
            if "report" in self.selected:
                self.step_report()
        except Stop as exc:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the write-up short
            self.log(f"stopped by {exc}: interrupting the running steps, writing what there is")
            jobs = list(self.running)
            self.wait(jobs)  # self.stopping: every job at once
            for job in jobs:
                self.finish(job, status="stopped", detail=f"stopped by {exc}")
            done = {re.sub(r"^pytest-triton-\d+$", "pytest-triton", str(s["name"])) for s in self.steps}
            for name in self.selected:
                if name not in done:
                    self.skip(name, f"not started: stopped by {exc}")
        finally:
            self.write_summary(final=True)
            shutil.rmtree(self.site, ignore_errors=True)
        return 0 if self.outcome() == "pass" else 1

    def outcome(self) -> str:
        """``pass`` or ``fail``; a ``partial`` step (a sweep the budget cut after one chunk
        or more) is not a failure."""
        bad = [s for s in self.steps if s["status"] in ("fail", "timeout", "error", "stopped")]
        if self.stopping:
            return "fail"
        if not self.dry and not self.info.get("cuda_available"):
            return "fail"
        return "fail" if bad else "pass"

    # -- summary -----------------------------------------------------------------
    def write_summary(self, final: bool = False) -> None:
        elapsed = round(time.time() - self.t0, 1)
        # Cut by the budget, or never started for lack of it: not failures, but not the whole run.
        partial = [str(s["name"]) for s in self.steps if s["status"] == "partial"
                   or (s["status"] == "skipped" and str(s.get("detail", "")).startswith("budget spent"))]
        doc = {"tool": "fusedloss gpucheck", "dry_run": self.dry, "final": final, "outcome": self.outcome(),
               "partial": partial, "budget_s": self.args.budget, "margin_s": MARGIN_S, "elapsed_s": elapsed,
               "argv": sys.argv[1:],
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.t0)),
               "env": self.info, "steps": self.steps}
        _write_atomic(self.results / "summary.json", json.dumps(doc, indent=1, default=str) + "\n")
        self._write_junit()
        i = self.info
        title = "dry run on CPU (Triton interpreter)" if self.dry else f"{i.get('gpu')} (sm {i.get('capability')})"
        md = [f"# gpucheck: {title}: {doc['outcome'].upper()}"
              f"{' (partial: ' + ', '.join(partial) + ')' if partial else ''}{'' if final else ' (in progress)'}", "",
              f"Started {doc['started']}, {elapsed} s of a {self.args.budget:.0f} s budget. Source digest "
              f"{i.get('source_digest')} (`python bench/gpu/gpucheck.py --digest` in a checkout); "
              f"commit {i.get('commit_arg') or i.get('vendored_commit') or i.get('git_head') or 'unknown'}"
              + (f" (vendor.sh saw {i.get('vendored_dirty')} uncommitted source files)"
                 if i.get("vendored_dirty") not in (None, "0") else "") + ".", "",
              f"python {i.get('python')}, torch {i.get('torch')} (CUDA {i.get('torch_cuda')}), triton "
              f"{i.get('triton')}, nvcc: {i.get('nvcc')}, compute-sanitizer: {i.get('compute-sanitizer')}, "
              f"driver {i.get('nvidia-smi-driver')}, pytest {i.get('pytest')}, liger-kernel {i.get('liger_kernel')}, "
              f"rich {i.get('rich')}, matplotlib {i.get('matplotlib')}, ninja {i.get('ninja')}, "
              f"{i.get('cpu_count')} CPUs.", "",
              "| step | status | seconds | timeout | detail |", "|---|---|---|---|---|"]
        md += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s.get('timeout_s') or ''} | {s.get('detail', '')} |"
               for s in self.steps]
        for s in self.steps:
            failed = (s.get("counts") or {}).get("failed_ids")
            if failed:
                md += ["", f"{s['name']} failures:", "", *[f"- `{f}`" for f in failed]]
            reports = (s.get("sanitizer") or {}).get("first_reports")
            if reports:
                md += ["", "memcheck reports (first):", "", *[f"- {r}" for r in reports[:10]]]
        smi = i.get("nvidia_smi") or {}
        if smi:
            md += ["", "nvidia-smi: " + "; ".join(f"{k} {v}" for k, v in smi.items())]
        sweep_md = self.results / "sweep.md"
        if final and sweep_md.exists():
            text = sweep_md.read_text()
            start = text.find("## Time as a multiple")
            end = text.find("## Peak memory")
            if start >= 0:
                md += ["", text[start:end if end > start else None].rstrip(), "",
                       "Memory, accuracy and every column: sweep.md, sweep_full.md, sweep.json."]
        _write_atomic(self.results / "summary.md", "\n".join(md) + "\n")
        if final:
            print("\n".join(md), flush=True)

    def _write_junit(self) -> None:
        suite = ET.Element("testsuite", name="gpucheck", tests=str(len(self.steps)),
                           failures=str(sum(s["status"] in ("fail", "timeout", "stopped") for s in self.steps)),
                           errors=str(sum(s["status"] == "error" for s in self.steps)),
                           skipped=str(sum(s["status"] == "skipped" for s in self.steps)))
        for s in self.steps:
            case = ET.SubElement(suite, "testcase", classname="gpucheck", name=str(s["name"]), time=str(s["seconds"]))
            if s["status"] in ("fail", "timeout", "stopped", "error"):
                ET.SubElement(case, "failure", message=f"{s['status']}: {s.get('detail', '')}")
            elif s["status"] == "skipped":
                ET.SubElement(case, "skipped", message=str(s.get("detail", "")))
            elif s["status"] == "partial":
                ET.SubElement(case, "system-out").text = f"partial: {s.get('detail', '')}"
        path = self.results / "gpucheck.junit.xml"
        tmp = path.with_name(path.name + ".tmp")
        ET.ElementTree(suite).write(tmp, encoding="utf-8", xml_declaration=True)
        os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpucheck", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="?", help="folder for the results (created)")
    p.add_argument("--budget", type=float, default=480.0,
                   help=f"wall-clock seconds for everything (default 480; the run ends within it + {MARGIN_S} s)")
    p.add_argument("--dry-run", action="store_true", help="CPU: Triton interpreter, tiny shapes, no build/sanitizer")
    p.add_argument("--steps", default=None,
                   help=f"comma-separated subset of {','.join(STEPS)} (env, the device probe, always runs)")
    p.add_argument("--cap", action="append", metavar="STEP=SECONDS", help="change a step's longest time")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the sweep")
    p.add_argument("--commit", default=None, help="the commit being measured (recorded in the summary)")
    p.add_argument("--python", default=None, help="interpreter for the steps (default: this one)")
    p.add_argument("--digest", action="store_true", help="print the source digest of this tree and exit")
    p.add_argument("--sweep-child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--render", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if not (a.results or a.digest or a.sweep_child or a.render):
        p.error("the results folder is required")
    if a.steps and (bad := set(a.steps.split(",")) - set(STEPS)):
        p.error(f"--steps: unknown {sorted(bad)}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.digest:
        print(source_digest())
        return 0
    if a.sweep_child:
        return sweep_child(a.sweep_child)
    if a.render:
        for line in render_sweep(a.render):
            print(line)
        return 0
    return Check(a).main()


if __name__ == "__main__":
    # Run as a script, Python puts bench/gpu/ first on sys.path (the imports of gpucheck_plan and
    # gpucheck_report above need it); the children's modules, the package included, come from
    # PYTHONPATH instead.
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)
    sys.exit(main())
