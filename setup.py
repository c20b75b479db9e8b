"""Build fusedloss: the Python package, plus the C++/CUDA extension ``fusedloss._C``.

The extension is optional: without sources in ``csrc/``, with ``FUSEDLOSS_BUILD_EXT=0``
or without torch at build time, the package still installs and the pure-PyTorch
reference backend runs everything. ``pip install .`` builds in an isolated environment
that pyproject.toml gives torch; ``pip install --no-build-isolation .`` builds against the
torch already installed.

Environment:
  FUSEDLOSS_BUILD_EXT=0      skip the extension entirely
  FUSEDLOSS_BUILD_CUDA=0|1   force the CUDA kernels off / on (default: on when torch is a
                             CUDA build, a usable toolkit is found (see CUDA_HOME) and a GPU
                             is visible; else the CPU part alone, with the reason printed)
  FUSEDLOSS_CPU_CAPABILITIES the CPU kernel objects, e.g. "DEFAULT" or "DEFAULT,AVX2" (default:
                             all of DEFAULT, AVX2, AVX512, AVX512_BF16 on x86-64)
  FUSEDLOSS_DEBUG=1          keep debug information (-g); by default -g0 cancels Python's -g
  FUSEDLOSS_OPT_LEVEL        the compilers' optimization level, 0-3 (default 3). 0 builds in a
                             fraction of the time, with kernels many times slower: for checking
                             that the sources build (tests/test_packaging.py's wheel), not for use
  TORCH_CUDA_ARCH_LIST       GPU architectures (default "8.0;9.0+PTX": A100, H100, and PTX
                             that newer GPUs compile at load time)
  CUDA_HOME                  the toolkit root; unset, setup.py finds it: the nvcc on PATH
                             (symlinks and `exec .../nvcc` wrapper scripts followed), then
                             /usr/local/cuda, /usr/local/cuda-* (newest first); the first root
                             with bin/nvcc, include/cuda_runtime.h and lib*/libcudart.so* wins
  MAX_JOBS                   parallel compile jobs (ninja)

setup.py's messages go to stderr; pip shows them (and the compiler's) with `pip install -v .`.

CPU vector code: ``at::vec::Vectorized`` only uses real vector instructions when a file
is compiled with a capability's flags and macro (e.g. ``-mavx2 -mfma
-DCPU_CAPABILITY_AVX2``); ``-O3`` alone, even ``-march=native``, leaves the generic
scalar-array fallback. So ``csrc/cpu/kernels.cpp`` (and ``kernels_distill.cpp``) is compiled once per capability
(DEFAULT, plus AVX2 and AVX512 on x86-64) into separate objects, and the op picks
one at run time from ``at::get_cpu_capability()``, as ATen does for its own kernels.
"""
import glob
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# Compiled once per CPU capability; every other csrc/ file once, with plain flags.
CPU_KERNEL_SOURCE = os.path.join("csrc", "cpu", "kernels.cpp")
# Every source compiled once per capability: the losses' row kernels and distillation's.
CPU_KERNEL_SOURCES = [CPU_KERNEL_SOURCE, os.path.join("csrc", "cpu", "kernels_distill.cpp")]
X86_CAPABILITIES = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    # Not an ATen capability: AVX512 plus the bfloat16 conversion instructions
    # (Cooper Lake, Sapphire Rapids, Zen 4), for the bfloat16 kernels only; ATen's
    # vector code in it is its AVX512 code (CPU_CAPABILITY_AVX512).
    "AVX512_BF16": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mavx512bf16"],
}
# The row kernels' scalar math (a row's exp/log/log1p calls, ~8 in a dependent chain) may be
# treated as pure functions: the compiler then merges the ones a row computes twice (lse and
# the loss both take log1p(exp(-|lse_ex - x_c|))). errno is the only thing it changes.
KERNEL_FLAGS = ["-fno-math-errno"]
# nvcc compiles a file's GPU architectures (sm_80, sm_90) one after the other unless told to
# use threads; ops_cuda.cu is the build's longest object (~235 CPU-seconds, most of it per
# architecture), so with threads its two architectures no longer run back to back at the end.
NVCC_THREADS = ["--threads", "2"]
# Which ATen vector implementation a capability object compiles (its own name by default).
ATEN_CAPABILITY = {"AVX512_BF16": "AVX512"}


def _cpu_capabilities(environ=None, machine=None):
    """{capability: its compiler flags}: DEFAULT, plus the x86-64 ones on x86-64;
    FUSEDLOSS_CPU_CAPABILITIES (e.g. "DEFAULT" or "DEFAULT,AVX2") keeps a subset, which must
    hold DEFAULT (the kernels any CPU runs); the op then picks among the ones built."""
    environ = os.environ if environ is None else environ
    machine = platform.machine() if machine is None else machine
    caps = {"DEFAULT": []}
    if machine.lower() in ("x86_64", "amd64"):
        caps.update(X86_CAPABILITIES)
    wanted = environ.get("FUSEDLOSS_CPU_CAPABILITIES", "").replace(",", " ").upper().split()
    if wanted:
        unknown = [w for w in wanted if w not in caps]
        if unknown:
            raise RuntimeError(f"FUSEDLOSS_CPU_CAPABILITIES: {', '.join(unknown)} not among this machine's "
                               f"{', '.join(caps)}")
        if "DEFAULT" not in wanted:
            raise RuntimeError("FUSEDLOSS_CPU_CAPABILITIES must include DEFAULT (the kernels any CPU runs)")
        if "AVX512_BF16" in wanted and "AVX512" not in wanted:
            # its object hands every dtype but bfloat16 to the AVX512 one: without it the extension
            # links with undefined symbols and fails at import
            raise RuntimeError("FUSEDLOSS_CPU_CAPABILITIES: AVX512_BF16 needs AVX512 too (its object runs only "
                               "the bfloat16 kernels and calls the AVX512 one for the other dtypes)")
        caps = {cap: flags for cap, flags in caps.items() if cap in wanted}
    return caps


def _gcc_major(compiler):
    """GCC's major version for the compiler command ``compiler`` (None for clang or when unknown)."""
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
        if "clang" in out.lower():
            return None
        version = subprocess.run([compiler, "-dumpversion"], capture_output=True, text=True, timeout=60).stdout
        return int(version.strip().split(".")[0])
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def capability_warning_flags(cap, gcc_major):
    """Warnings turned off for one capability object, each for a known compiler bug only.

    GCC 12's avx512fintrin.h gives the AVX-512 intrinsics an undefined source operand
    (``__m512 __Y = __Y;`` in _mm512_undefined_ps, used by _mm512_max_ps, _mm512_cvtph_ps,
    ...); once inlined into a kernel, -Wmaybe-uninitialized reports it at every call
    (GCC bug 105593, fixed in GCC 13): ~1,800 of a build's warnings, ATen's own vector
    code included. The same kernels compiled for DEFAULT and AVX2 keep the warning."""
    if cap.startswith("AVX512") and gcc_major is not None and gcc_major < 13:
        return ["-Wno-maybe-uninitialized", "-Wno-uninitialized"]
    return []


def _log(message):
    """setup.py's messages go to stderr: pip shows them with `pip install -v .` (and on a failure)."""
    print(f"fusedloss: {message}", file=sys.stderr, flush=True)


def _opt_level(environ=None):
    """FUSEDLOSS_OPT_LEVEL: "-O3" by default; "-O0" to "-O3" when set to 0-3 (anything else stops
    the build, naming the variable)."""
    environ = os.environ if environ is None else environ
    level = environ.get("FUSEDLOSS_OPT_LEVEL", "").strip() or "3"
    if level not in ("0", "1", "2", "3"):
        raise RuntimeError(f"FUSEDLOSS_OPT_LEVEL={level!r}: expected 0, 1, 2 or 3")
    return f"-O{level}"


def _debug_build(environ=None):
    """FUSEDLOSS_DEBUG=1: keep debug information (-g). Otherwise -g0 cancels the -g that
    Python's own CFLAGS hand every extension (~70 MB of DWARF in _C.so, and slower compiles)."""
    environ = os.environ if environ is None else environ
    return environ.get("FUSEDLOSS_DEBUG", "0") not in ("", "0")


# --- Finding the CUDA toolkit -------------------------------------------------------------
# torch.utils.cpp_extension guesses CUDA_HOME at import time from the nvcc on PATH (the
# folder above its bin/). Where that nvcc is a wrapper script (/usr/local/bin/nvcc doing
# `exec /usr/local/cuda-13.0/bin/nvcc "$@"`) the guess is /usr/local, which has neither the
# runtime headers nor libcudart, and the build dies at the link (-lcudart). So setup.py
# looks for the root itself, follows such wrappers, and hands torch the first usable one.

STANDARD_CUDA_ROOTS = ("/usr/local/cuda", "/usr/local/cuda-*")
_EXEC_NVCC = re.compile(r"""^\s*exec\s+["']?([^\s"']*/nvcc)["']?(\s|$)""", re.MULTILINE)


def cuda_root_problem(root):
    """What a toolkit root lacks for building the extension ("lacks bin/nvcc, ..."), or None."""
    checks = (
        ("bin/nvcc", [os.path.join(root, "bin", "nvcc")]),
        ("include/cuda_runtime.h", [os.path.join(root, "include", "cuda_runtime.h")]),
        ("lib*/libcudart.so*", glob.glob(os.path.join(root, "lib*", "libcudart.so*"))),
    )
    missing = [what for what, paths in checks if not any(os.path.isfile(p) for p in paths)]
    return f"lacks {', '.join(missing)}" if missing else None


def real_nvcc(path, _depth=0):
    """The nvcc binary that ``path`` runs: symlinks resolved, and a shell wrapper whose
    line ``exec <dir>/nvcc ...`` hands over to another nvcc followed (recursively)."""
    path = os.path.realpath(path)
    if _depth < 8:
        try:
            with open(path, "rb") as f:
                head = f.read(65536)
        except OSError:
            return path
        if head.startswith(b"#!"):
            match = _EXEC_NVCC.search(head.decode("utf-8", "replace"))
            if match and os.path.realpath(match.group(1)) != path:
                return real_nvcc(match.group(1), _depth + 1)
    return path


def _version_key(root):
    """Sort key of /usr/local/cuda-X.Y: newest first."""
    nums = re.findall(r"\d+", os.path.basename(root))
    return [-int(n) for n in nums]


def cuda_toolkit_candidates(environ=None, standard_roots=STANDARD_CUDA_ROOTS):
    """(root, where it came from) in the order they are tried: the nvcc on PATH (through
    symlinks and wrappers), then the standard install folders, newest version first."""
    environ = os.environ if environ is None else environ
    found = []
    nvcc = shutil.which("nvcc", path=environ.get("PATH", os.defpath))
    if nvcc:
        real = real_nvcc(nvcc)
        found.append((os.path.dirname(os.path.dirname(real)), f"nvcc on PATH ({nvcc} -> {real})"))
    for pattern in standard_roots:
        found += [(root, "standard location") for root in sorted(glob.glob(pattern), key=_version_key)]
    seen = set()
    for root, how in found:
        if os.path.realpath(root) not in seen:
            seen.add(os.path.realpath(root))
            yield root, how


def find_cuda_toolkit(environ=None, standard_roots=STANDARD_CUDA_ROOTS):
    """``(root, None)`` for the toolkit to build with, or ``(None, why none is usable)``.

    An explicit ``CUDA_HOME`` (or ``CUDA_PATH``) is the user's choice: it is used or
    reported, never silently replaced. Otherwise the first candidate with bin/nvcc,
    include/cuda_runtime.h and lib*/libcudart.so* wins."""
    environ = os.environ if environ is None else environ
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            problem = cuda_root_problem(environ[var])
            return (environ[var], None) if problem is None else (None, f"{var}={environ[var]} {problem}")
    rejected = []
    for root, how in cuda_toolkit_candidates(environ, standard_roots):
        problem = cuda_root_problem(root)
        if problem is None:
            return root, None
        rejected.append(f"{root} ({how}) {problem}")
    if not rejected:
        return None, "no CUDA toolkit found (no nvcc on PATH, nothing in /usr/local/cuda*; set CUDA_HOME)"
    return None, "no usable CUDA toolkit: " + "; ".join(rejected) + " (set CUDA_HOME to the toolkit root)"


def _cuda_toolkit_problem():
    """Why the CUDA part cannot be built here, or None; when it can, CUDA_HOME (the
    environment variable and torch's copy of it, computed when torch was imported) is
    set to the toolkit found."""
    import torch
    import torch.utils.cpp_extension as cpp_extension

    if torch.version.cuda is None:
        return "torch is not a CUDA build"
    if not glob.glob(os.path.join("csrc", "cuda", "*.cu")):
        return "no CUDA sources"
    root, problem = find_cuda_toolkit()
    if problem:
        return problem
    # torch refuses (RuntimeError, mid-build) a toolkit whose major version differs from its own.
    release = _nvcc_release(os.path.join(root, "bin", "nvcc"))
    if release and release.split(".")[0] != torch.version.cuda.split(".")[0]:
        return f"the CUDA toolkit at {root} is {release}, torch was built with CUDA {torch.version.cuda}"
    if cpp_extension.CUDA_HOME != root:
        print(f"fusedloss: using the CUDA toolkit at {root} (torch guessed {cpp_extension.CUDA_HOME})",
              file=sys.stderr)
    os.environ["CUDA_HOME"] = root
    cpp_extension.CUDA_HOME = root
    return None


def _nvcc_release(nvcc):
    """"13.0" from ``nvcc --version``, or None when it does not say."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def _visible_gpus():
    """How many CUDA devices torch sees here (0 without a driver or a device)."""
    import torch

    try:
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - a broken driver counts as no device
        return 0


def _want_cuda():
    """Build the CUDA kernels? FUSEDLOSS_BUILD_CUDA=1: yes (or stop, naming what is missing);
    =0: no; unset: when torch is a CUDA build, a usable toolkit is found and a GPU is visible,
    since without a GPU they could not run here and cost minutes of nvcc (build on a GPU-less
    machine for GPUs elsewhere with FUSEDLOSS_BUILD_CUDA=1)."""
    forced = os.environ.get("FUSEDLOSS_BUILD_CUDA", "")
    if forced == "0":
        _log("building the CPU kernels only: FUSEDLOSS_BUILD_CUDA=0")
        return False
    problem = _cuda_toolkit_problem()
    if problem and forced == "1":
        raise RuntimeError(f"FUSEDLOSS_BUILD_CUDA=1 but the CUDA part cannot be built: {problem}")
    if not problem and forced != "1" and _visible_gpus() == 0:
        problem = ("no CUDA device visible (torch.cuda.device_count() == 0); "
                   "FUSEDLOSS_BUILD_CUDA=1 builds the CUDA kernels anyway")
    if problem:
        _log(f"building the CPU kernels only: {problem}")
    return problem is None


def extension_modules():
    if os.environ.get("FUSEDLOSS_BUILD_EXT", "1") == "0" or not os.path.exists(os.path.join("csrc", "fusedloss.cpp")):
        return [], {}
    # Imported here, not at the top: without torch (a build front end that ignores
    # pyproject's build requirements) the Python part still builds, and says so.
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as err:
        print(f"fusedloss: building without the C++/CUDA extension (the reference backend runs everything): "
              f"torch is not importable at build time ({err})", file=sys.stderr)
        return [], {}

    caps = _cpu_capabilities()
    sources = sorted(p for p in glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
                     if p not in CPU_KERNEL_SOURCES and not p.startswith(os.path.join("csrc", "cuda", "")))
    # -fopenmp: at::parallel_for is a header template whose threads are OpenMP pragmas
    # (torch is built with AT_PARALLEL_OPENMP); without the flag it runs on one thread.
    # The libgomp.so.1 it links resolves at run time to the copy torch already loaded.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # -g0 after Python's CFLAGS (which carry -g): no debug information unless FUSEDLOSS_DEBUG=1.
    # torch's headers as system headers (-isystem outranks the -I torch adds): their warnings
    # (#pragma unroll and #pragma clang, which GCC does not know) are theirs, not ours.
    from torch.utils.cpp_extension import include_paths

    system_headers = [flag for path in include_paths() for flag in ("-isystem", path)]
    opt = _opt_level()
    cxx = [opt, *openmp, "-g" if _debug_build() else "-g0", *system_headers]
    macros = [(f"FUSEDLOSS_CPU_{cap}", None) for cap in caps if cap != "DEFAULT"]
    # What a rebuild must notice besides `sources`: the capability file and every header
    # (setuptools relinks only when one of sources + depends is newer than _C.so).
    depends = list(CPU_KERNEL_SOURCES) + sorted(p for ext in ("h", "cuh")
                                           for p in glob.glob(os.path.join("csrc", "**", f"*.{ext}"), recursive=True))
    with_cuda = _want_cuda()
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        ext = CUDAExtension("fusedloss._C", sources, define_macros=macros + [("FUSEDLOSS_WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": [opt, "-lineinfo", *NVCC_THREADS]},
                            extra_link_args=openmp,
                            depends=depends)
    else:
        ext = CppExtension("fusedloss._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx},
                           extra_link_args=openmp, depends=depends)

    class BuildWithCpuCapabilities(BuildExtension):
        """Compiles CPU_KERNEL_SOURCES once per capability and links the objects in.

        The capability objects compile in threads (each its own one-file ninja run: the
        flags differ per object, which one ninja file of torch's cannot express) while
        the main ninja run compiles the other sources, so the slowest file no longer
        waits for the rest. At most max(1, MAX_JOBS or the CPU count) capability
        compiles run at once.

        DEFAULT's object comes first among them and after the plain sources: where the
        objects share an inline function from a header (c10, the standard library), the
        linker keeps the first copy, so the one that runs on any x86-64 wins.

        The CUDA sources (nvcc, the longest objects: ops_cuda.cu ~235 CPU-seconds) compile in
        a thread of their own too, started first: in the main ninja run they started last
        (ninja takes its files in path order) and ran alone at the end. They are linked where
        they were before, among the plain sources in path order."""

        def build_extension(self, extension):
            import time
            from concurrent.futures import ThreadPoolExecutor

            jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
            plain = [s for s in extension.sources]
            cuda_sources = [s for s in plain if s.endswith(".cu")]
            _log(f"compiling {len(plain)} sources ({', '.join(os.path.basename(p) for p in plain)}) and "
                 f"{' and '.join(os.path.basename(p) for p in CPU_KERNEL_SOURCES)} once per CPU capability ({', '.join(caps)}), "
                 f"{jobs} jobs; measured: 3.5 CPU-minutes without the CUDA kernels, more with them, "
                 f"a line per object below (docs/install.md)")
            start = time.monotonic()

            gcc_major = _gcc_major(self.compiler.compiler_so[0])

            def compile_capability(cap, flags):
                objects = self.compiler.compile(
                    CPU_KERNEL_SOURCES,
                    output_dir=os.path.join(self.build_temp, f"cpu_{cap.lower()}"),
                    macros=list(extension.define_macros)
                    + [("CPU_CAPABILITY", cap), (f"CPU_CAPABILITY_{ATEN_CAPABILITY.get(cap, cap)}", None)],
                    include_dirs=extension.include_dirs,
                    extra_postargs={"cxx": extension.extra_compile_args["cxx"] + KERNEL_FLAGS + flags
                                    + capability_warning_flags(cap, gcc_major),
                                    "nvcc": extension.extra_compile_args.get("nvcc", [])},
                    depends=extension.depends,
                )
                _log(f"{', '.join(CPU_KERNEL_SOURCES)} for {cap}: done at {time.monotonic() - start:.0f} s")
                return objects

            cuda_dir = os.path.join(self.build_temp, "cuda")

            def compile_cuda():
                objects = self.compiler.compile(
                    cuda_sources, output_dir=cuda_dir, macros=list(extension.define_macros),
                    include_dirs=extension.include_dirs, extra_postargs=dict(extension.extra_compile_args),
                    depends=extension.depends)
                _log(f"{', '.join(cuda_sources)}: done at {time.monotonic() - start:.0f} s")
                return objects

            cuda_pool = ThreadPoolExecutor(max_workers=1)
            cuda_future = cuda_pool.submit(compile_cuda) if cuda_sources else None
            pool = ThreadPoolExecutor(max_workers=max(1, min(len(caps), jobs)))
            futures = [pool.submit(compile_capability, cap, flags) for cap, flags in caps.items()]
            link = self.compiler.link_shared_object
            n_extra = len(extension.extra_objects)

            def in_path_order(obj):  # an object's path under its build folder: csrc/cuda/ops_cuda.o
                obj, under_cuda = os.path.abspath(obj), os.path.abspath(cuda_dir)
                return os.path.relpath(obj, under_cuda if obj.startswith(under_cuda + os.sep)
                                       else os.path.abspath(self.build_temp))

            def link_with_capabilities(objects, *args, **kwargs):
                _log(f"the other sources: done at {time.monotonic() - start:.0f} s")
                cuda_objects = cuda_future.result() if cuda_future else []
                cap_objects = [o for f in futures for o in f.result()]
                objects = list(objects)
                cut = len(objects) - n_extra  # the plain sources' objects, then the capability ones
                main = sorted(objects[:cut] + cuda_objects, key=in_path_order)
                return link(main + cap_objects + objects[cut:], *args, **kwargs)

            # The main ninja run compiles the C++ sources alone; the CUDA ones still count for
            # setuptools' is-_C.so-out-of-date check (sources + depends).
            sources, depends = extension.sources, extension.depends
            extension.sources = [s for s in plain if s not in cuda_sources]
            extension.depends = list(depends) + cuda_sources
            self.compiler.link_shared_object = link_with_capabilities
            try:
                super().build_extension(extension)
            finally:
                self.compiler.link_shared_object = link
                extension.sources, extension.depends = sources, depends
                cuda_pool.shutdown(wait=True)  # a failed main compile still waits for (and reports) these
                pool.shutdown(wait=True)
            for f in ([cuda_future] if cuda_future else []) + futures:
                f.result()
            _log(f"built {self.get_ext_fullpath(extension.name)} in {time.monotonic() - start:.0f} s")

    return [ext], {"build_ext": BuildWithCpuCapabilities.with_options(no_python_abi_suffix=True)}


def torch_requirement(ext_modules):
    """The extension is compiled against one torch's C++ ABI, which changes between minor
    releases: with it, require the torch minor it was built with (under pip's build
    isolation that is the torch the build environment got); without it, any torch >= 2.6."""
    if not ext_modules:
        return "torch>=2.6"
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"torch=={major}.{minor}.*"


# What each entry point needs beyond the core (``import fusedloss``, ``fusedloss-bench``):
# a missing one makes the command stop with one line naming the extra (fusedloss/_extras.py).
EXTRAS = {
    "bench": ["matplotlib>=3.7"],                                             # fusedloss-bench --plot
    "train": ["torchvision>=0.21", "pillow>=9", "tqdm>=4.60", "matplotlib>=3.7"],  # python -m fusedloss.train
}

if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it for its functions
    ext_modules, cmdclass = extension_modules()
    setup(
        name="fusedloss",
        version="0.1.0",
        description="Fused, exact softmax classification losses (CE, BCE, NLLR, CRL, LACE, focal) for PyTorch",
        long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
        long_description_content_type="text/markdown",
        author="the fusedloss authors",
        license_expression="BSD-3-Clause",
        license_files=["LICENSE"],
        keywords=["pytorch", "loss", "cross-entropy", "softmax", "cuda", "triton"],
        classifiers=[
            "Development Status :: 3 - Alpha",
            "Intended Audience :: Developers",
            "Intended Audience :: Science/Research",
            "Operating System :: POSIX :: Linux",
            "Programming Language :: C++",
            "Programming Language :: Python :: 3",
            "Programming Language :: Python :: 3 :: Only",
            "Programming Language :: Python :: 3.10",
            "Programming Language :: Python :: 3.11",
            "Programming Language :: Python :: 3.12",
            "Programming Language :: Python :: 3.13",
            "Environment :: GPU :: NVIDIA CUDA",
            "Topic :: Scientific/Engineering :: Artificial Intelligence",
        ],
        packages=["fusedloss", "fusedloss.triton_kernels"]
        + [f"fusedloss.{p}" for p in find_packages("python/fusedloss")]
        + [f"fusedloss.triton_kernels.{p}" for p in find_packages("triton_kernels")],
        package_dir={"fusedloss": "python/fusedloss", "fusedloss.triton_kernels": "triton_kernels"},
        python_requires=">=3.10",
        # rich: fusedloss-bench's table and progress bar (the CLI ships with the package).
        install_requires=[torch_requirement(ext_modules), "numpy", "rich>=13"],
        extras_require={**EXTRAS, "all": sorted({r for reqs in EXTRAS.values() for r in reqs})},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        entry_points={"console_scripts": ["fusedloss-bench=fusedloss.bench.cli:main"]},
    )
