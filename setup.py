"""Build fusedloss: the Python package, plus the C++/CUDA extension ``fusedloss._C``.

The extension is optional: without sources in ``csrc/`` (or without a compiler)
the package still installs and the pure-PyTorch reference backend runs everything.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extension_modules():
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not sources or os.environ.get("FUSEDLOSS_BUILD_EXT", "1") == "0":
        return [], {}
    # Imported lazily: a plain `pip install` of the Python part needs no torch at build time.
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension("fusedloss._C", sources, extra_compile_args={"cxx": ["-O3"]})
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


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
