"""Build fusedloss: the Python package, plus the C++/CUDA extension ``fusedloss._C``.

The extension is optional: without sources in ``csrc/`` (or with
``FUSEDLOSS_BUILD_EXT=0``) the package still installs and the pure-PyTorch
reference backend runs everything.

Environment:
  FUSEDLOSS_BUILD_EXT=0      skip the extension entirely
  FUSEDLOSS_BUILD_CUDA=0|1   force the CUDA kernels off / on (default: on when torch is a
                             CUDA build and nvcc is found under CUDA_HOME)
  TORCH_CUDA_ARCH_LIST       GPU architectures (default "8.0;9.0+PTX": A100, H100, and PTX
                             that newer GPUs compile at load time)
  CUDA_HOME                  the toolkit root, e.g. /usr/local/cuda-13.0
  MAX_JOBS                   parallel compile jobs (ninja)

CPU vector code: ``at::vec::Vectorized`` only uses real vector instructions when a file
is compiled with a capability's flags and macro (e.g. ``-mavx2 -mfma
-DCPU_CAPABILITY_AVX2``); ``-O3`` alone, even ``-march=native``, leaves the generic
scalar-array fallback. So ``csrc/cpu/kernels.cpp`` is compiled once per capability
(DEFAULT, plus AVX2 and AVX512 on x86-64) into separate objects, and the op picks
one at run time from ``at::get_cpu_capability()``, as ATen does for its own kernels.
"""
import glob
import os
import platform
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# Compiled once per CPU capability; every other csrc/ file once, with plain flags.
CPU_KERNEL_SOURCE = os.path.join("csrc", "cpu", "kernels.cpp")
X86_CAPABILITIES = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def _cpu_capabilities():
    caps = {"DEFAULT": []}
    if platform.machine().lower() in ("x86_64", "amd64"):
        caps.update(X86_CAPABILITIES)
    return caps


def _cuda_toolkit_problem():
    """Why the CUDA part cannot be built here, or None. A toolkit root is usable when it
    has nvcc, the runtime headers and libcudart: torch guesses CUDA_HOME from the nvcc on
    PATH, and a wrapper script there (/usr/local/bin/nvcc) makes it guess /usr/local,
    where compiling finds no headers and linking no -lcudart."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return "torch is not a CUDA build"
    if not glob.glob(os.path.join("csrc", "cuda", "*.cu")):
        return "no CUDA sources"
    if not CUDA_HOME:
        return "no CUDA toolkit found (set CUDA_HOME)"
    missing = [what for what, paths in (
        ("bin/nvcc", [os.path.join(CUDA_HOME, "bin", "nvcc")]),
        ("include/cuda_runtime.h", [os.path.join(CUDA_HOME, "include", "cuda_runtime.h")]),
        ("libcudart", glob.glob(os.path.join(CUDA_HOME, "lib*", "libcudart.so*"))),
    ) if not any(os.path.exists(p) for p in paths)]
    if missing:
        return f"CUDA_HOME={CUDA_HOME} lacks {', '.join(missing)} (set CUDA_HOME to the toolkit root, e.g. /usr/local/cuda-13.0)"
    return None


def _want_cuda():
    forced = os.environ.get("FUSEDLOSS_BUILD_CUDA", "")
    if forced == "0":
        return False
    problem = _cuda_toolkit_problem()
    if problem and forced == "1":
        raise RuntimeError(f"FUSEDLOSS_BUILD_CUDA=1 but the CUDA part cannot be built: {problem}")
    if problem:
        print(f"fusedloss: building the CPU kernels only: {problem}", file=sys.stderr)
    return problem is None


def extension_modules():
    if os.environ.get("FUSEDLOSS_BUILD_EXT", "1") == "0" or not os.path.exists(os.path.join("csrc", "fusedloss.cpp")):
        return [], {}
    # Imported lazily: a plain `pip install` of the Python part needs no torch at build time.
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    caps = _cpu_capabilities()
    sources = sorted(p for p in glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
                     if p != CPU_KERNEL_SOURCE and not p.startswith(os.path.join("csrc", "cuda", "")))
    # -fopenmp: at::parallel_for is a header template whose threads are OpenMP pragmas
    # (torch is built with AT_PARALLEL_OPENMP); without the flag it runs on one thread.
    # The libgomp.so.1 it links resolves at run time to the copy torch already loaded.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", *openmp]
    macros = [(f"FUSEDLOSS_CPU_{cap}", None) for cap in caps if cap != "DEFAULT"]
    with_cuda = _want_cuda()
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        ext = CUDAExtension("fusedloss._C", sources, define_macros=macros + [("FUSEDLOSS_WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]}, extra_link_args=openmp)
    else:
        ext = CppExtension("fusedloss._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx},
                           extra_link_args=openmp)

    class BuildWithCpuCapabilities(BuildExtension):
        """Compiles CPU_KERNEL_SOURCE once per capability and links the objects in.

        DEFAULT's object comes first among them and after the plain sources: where the
        objects share an inline function from a header (c10, the standard library), the
        linker keeps the first copy, so the one that runs on any x86-64 wins."""

        def build_extension(self, extension):
            objects = []
            for cap, flags in caps.items():
                objects += self.compiler.compile(
                    [CPU_KERNEL_SOURCE],
                    output_dir=os.path.join(self.build_temp, f"cpu_{cap.lower()}"),
                    macros=list(extension.define_macros) + [("CPU_CAPABILITY", cap), (f"CPU_CAPABILITY_{cap}", None)],
                    include_dirs=extension.include_dirs,
                    extra_postargs={"cxx": extension.extra_compile_args["cxx"] + flags,
                                    "nvcc": extension.extra_compile_args.get("nvcc", [])},
                    depends=extension.depends,
                )
            extension.extra_objects = objects + [o for o in extension.extra_objects if o not in objects]
            super().build_extension(extension)

    return [ext], {"build_ext": BuildWithCpuCapabilities.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="fusedloss",
    version="0.1.0",
    description="Fused, exact softmax classification losses (CE, BCE, NLLR, CRL, LACE, focal) for PyTorch",
    packages=["fusedloss", "fusedloss.triton_kernels"]
    + [f"fusedloss.{p}" for p in find_packages("python/fusedloss")]
    + [f"fusedloss.triton_kernels.{p}" for p in find_packages("triton_kernels")],
    package_dir={"fusedloss": "python/fusedloss", "fusedloss.triton_kernels": "triton_kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["fusedloss-bench=fusedloss.bench.cli:main"]},
)
