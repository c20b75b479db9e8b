"""Packaging: setup.py's CUDA toolkit finder, its build switches, the one-line messages of
missing extras, the sdist's contents and metadata.

Cheap checks, but for one `slow` test that builds a wheel from the sdist (CPU part, DEFAULT
kernels only) and imports fusedloss._C from it; the plain `pip install .` into a new venv is
checked by hand (docs/install.md)."""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module: its functions, without running setup() (guarded by __main__)."""
    spec = importlib.util.spec_from_file_location("fusedloss_setup_py", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_toolkit(root: Path, *, lib: bool = True, include: bool = True) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("\x7fELF not really\n")
    (root / "bin" / "nvcc").chmod(0o755)
    if include:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").write_text("/* fake */\n")
    if lib:
        (root / "lib64").mkdir()
        (root / "lib64" / "libcudart.so.13").write_text("")
    return root


def wrapper(bindir: Path, target: Path) -> None:
    """A PATH nvcc that is a shell script handing over to ``target`` (like /usr/local/bin/nvcc)."""
    bindir.mkdir(parents=True, exist_ok=True)
    (bindir / "nvcc").write_text(f'#!/bin/sh\n# a wrapper\nexec {target} "$@"\n')
    (bindir / "nvcc").chmod(0o755)


def test_wrapper_script_resolves_to_the_toolkit_root(setup_py, tmp_path):
    root = fake_toolkit(tmp_path / "opt" / "cuda-99.1")
    wrapper(tmp_path / "bin", root / "bin" / "nvcc")
    env = {"PATH": str(tmp_path / "bin")}
    assert setup_py.real_nvcc(str(tmp_path / "bin" / "nvcc")) == str(root / "bin" / "nvcc")
    # torch's own guess would be tmp_path (the folder above the wrapper's bin/), which lacks the headers.
    assert setup_py.cuda_root_problem(str(tmp_path)) == "lacks include/cuda_runtime.h, lib*/libcudart.so*"
    assert setup_py.find_cuda_toolkit(env, standard_roots=()) == (str(root), None)


def test_symlink_and_nested_wrappers(setup_py, tmp_path):
    root = fake_toolkit(tmp_path / "cuda-99.1")
    wrapper(tmp_path / "inner", root / "bin" / "nvcc")       # wrapper -> real nvcc
    wrapper(tmp_path / "outer", tmp_path / "inner" / "nvcc")  # wrapper -> wrapper
    (tmp_path / "bin").mkdir()
    os.symlink(tmp_path / "outer" / "nvcc", tmp_path / "bin" / "nvcc")  # symlink -> wrapper
    found, problem = setup_py.find_cuda_toolkit({"PATH": str(tmp_path / "bin")}, standard_roots=())
    assert (found, problem) == (str(root), None)


def test_unusable_roots_are_skipped_and_reported(setup_py, tmp_path):
    no_lib = fake_toolkit(tmp_path / "cuda-99.2", lib=False)   # newest, but no libcudart
    good = fake_toolkit(tmp_path / "cuda-99.1")
    pattern = (str(tmp_path / "cuda-*"),)
    assert setup_py.find_cuda_toolkit({"PATH": ""}, standard_roots=pattern) == (str(good), None)
    good_lib = good / "lib64" / "libcudart.so.13"
    good_lib.unlink()
    found, problem = setup_py.find_cuda_toolkit({"PATH": ""}, standard_roots=pattern)
    assert found is None
    assert str(no_lib) in problem and "lacks lib*/libcudart.so*" in problem and "set CUDA_HOME" in problem


def test_explicit_cuda_home_is_used_or_reported_never_replaced(setup_py, tmp_path):
    good = fake_toolkit(tmp_path / "cuda-99.1")
    bad = fake_toolkit(tmp_path / "cuda-99.2", include=False)
    env = {"PATH": "", "CUDA_HOME": str(good)}
    assert setup_py.find_cuda_toolkit(env, standard_roots=()) == (str(good), None)
    env["CUDA_HOME"] = str(bad)
    assert setup_py.find_cuda_toolkit(env, standard_roots=(str(tmp_path / "cuda-*"),)) == (
        None, f"CUDA_HOME={bad} lacks include/cuda_runtime.h")


def test_no_toolkit_at_all(setup_py, tmp_path):
    found, problem = setup_py.find_cuda_toolkit({"PATH": str(tmp_path)}, standard_roots=())
    assert found is None and problem.startswith("no CUDA toolkit found")


def test_declared_dependencies_cover_the_entry_points(setup_py):
    assert setup_py.torch_requirement([]) == "torch>=2.6"
    import torch

    major, minor = torch.__version__.split(".")[:2]
    assert setup_py.torch_requirement(["an extension"]) == f"torch=={major}.{minor}.*"
    from fusedloss import _extras

    declared = {extra: {re.split(r"[<>=!~ ]", r)[0] for r in reqs} for extra, reqs in setup_py.EXTRAS.items()}
    for extra, modules in _extras.EXTRAS.items():
        assert declared[extra] == {_extras.DISTRIBUTIONS.get(m, m).lower() for m in modules}
    # The requirements files a developer installs name the same packages.
    for extra, path in (("bench", "requirements-bench.txt"), ("train", "requirements-train.txt")):
        listed = {re.split(r"[<>=!~ #]", line)[0].lower() for line in (ROOT / path).read_text().splitlines()
                  if line.strip() and not line.startswith(("#", "-r"))}
        assert declared[extra] <= listed, (path, declared[extra] - listed)


def test_missing_extra_is_one_line_naming_it(monkeypatch):
    from fusedloss._extras import MissingExtraError, require_extra

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import of matplotlib now fails
    with pytest.raises(MissingExtraError) as info:
        require_extra("bench", "--plot")
    assert str(info.value) == "--plot needs matplotlib, not installed: pip install 'fusedloss[bench]'"
    require_extra("train", "x", ("numpy",))  # present: no error


def test_bench_plot_without_matplotlib_fails_before_measuring(monkeypatch, capsys, tmp_path):
    from fusedloss.bench import cli

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(cli, "_measure", lambda *a, **k: pytest.fail("measured despite the missing extra"))
    status = cli.main(["--loss", "ce", "--backend", "reference", "--n", "4", "--c", "8",
                       "--plot", str(tmp_path / "p.png")])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err == "fusedloss-bench: error: --plot needs matplotlib, not installed: pip install 'fusedloss[bench]'"


def test_train_without_the_extra(monkeypatch, capsys):
    from fusedloss import train

    monkeypatch.setitem(sys.modules, "torchvision", None)
    assert train.main(["--dummy", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: python -m fusedloss.train needs torchvision, not installed: pip install 'fusedloss[train]'"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert train.main(["--plot", "some-run"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --plot needs matplotlib, not installed: pip install 'fusedloss[train]'")


def test_old_train_recipe_path_is_the_moved_module():
    """README's ``from fusedloss.train_recipe import MixedTargetLoss`` (the module moved to
    fusedloss.train.recipe): the old name is the same module, not a copy."""
    import fusedloss.train.recipe as recipe
    import fusedloss.train_recipe as old
    from fusedloss.train_recipe import MixedTargetLoss

    assert old is recipe and MixedTargetLoss is recipe.MixedTargetLoss
    assert sys.modules["fusedloss.train_recipe"] is recipe


def _sdist(tmp_path: Path, **env: str) -> Path:
    """`python setup.py sdist` of this checkout into tmp_path (egg-info there too: the tree is left alone)."""
    import subprocess

    tmp_path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist",
                          "-d", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    (sdist,) = tmp_path.glob("fusedloss-*.tar.gz")
    return sdist


def test_sdist_holds_every_source_header_doc_and_helper(tmp_path):
    """The sdist builds: every file under csrc/ (headers, the capability source kernels.cpp), the
    docs, the requirement files, the license and the test helpers; no build output."""
    import tarfile

    with tarfile.open(_sdist(tmp_path, FUSEDLOSS_BUILD_EXT="0")) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n and not n.endswith("/")}
    expected = {str(p.relative_to(ROOT)) for pattern in ("csrc/**/*.*", "docs/*.md", "requirements-*.txt",
                                                           "tests/*.py", "triton_kernels/**/*.py")
                for p in ROOT.glob(pattern)}
    expected |= {"LICENSE", "README.md", "setup.py", "pyproject.toml", "MANIFEST.in", ".ci/run"}
    assert {"csrc/losses.h", "csrc/op_common.h", "csrc/cpu/kernels.cpp", "csrc/cpu/vec_row.h",
            "csrc/cuda/reduce.cuh", "tests/conftest.py", "tests/oracle.py"} <= expected
    assert not expected - names, f"missing from the sdist: {sorted(expected - names)}"
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]
    assert not [n for n in names if n.startswith("python/fusedloss/triton_kernels/")]


def test_metadata_names_the_license_and_the_readme(tmp_path):
    import tarfile

    with tarfile.open(_sdist(tmp_path, FUSEDLOSS_BUILD_EXT="0")) as tar:
        (pkg_info,) = [n for n in tar.getnames() if n.count("/") == 1 and n.endswith("/PKG-INFO")]
        meta = tar.extractfile(pkg_info).read().decode()
    assert "License-Expression: BSD-3-Clause" in meta and "License-File: LICENSE" in meta
    assert "Description-Content-Type: text/markdown" in meta and "Requires-Python: >=3.10" in meta
    assert "# fusedloss" in meta  # the README is the long description
    assert (ROOT / "LICENSE").read_text().startswith("BSD 3-Clause License")


def test_cpu_capabilities_subset(setup_py):
    caps = setup_py._cpu_capabilities
    assert list(caps({}, "x86_64")) == ["DEFAULT", "AVX2", "AVX512", "AVX512_BF16"]
    assert list(caps({}, "aarch64")) == ["DEFAULT"]
    assert list(caps({"FUSEDLOSS_CPU_CAPABILITIES": "default,avx2"}, "x86_64")) == ["DEFAULT", "AVX2"]
    with pytest.raises(RuntimeError, match="must include DEFAULT"):
        caps({"FUSEDLOSS_CPU_CAPABILITIES": "AVX2"}, "x86_64")
    with pytest.raises(RuntimeError, match="AVX2 not among this machine's DEFAULT"):
        caps({"FUSEDLOSS_CPU_CAPABILITIES": "DEFAULT,AVX2"}, "aarch64")
    # the AVX512_BF16 object calls the AVX512 one for every other dtype: alone it would not import
    with pytest.raises(RuntimeError, match="AVX512_BF16 needs AVX512"):
        caps({"FUSEDLOSS_CPU_CAPABILITIES": "DEFAULT,AVX512_BF16"}, "x86_64")
    assert list(caps({"FUSEDLOSS_CPU_CAPABILITIES": "DEFAULT,AVX512,AVX512_BF16"}, "x86_64")) == [
        "DEFAULT", "AVX512", "AVX512_BF16"]


def test_warning_flags_only_for_the_gcc12_avx512_bug(setup_py):
    flags = setup_py.capability_warning_flags
    assert flags("AVX512", 12) == flags("AVX512_BF16", 12) == ["-Wno-maybe-uninitialized", "-Wno-uninitialized"]
    assert flags("AVX512", 13) == flags("AVX2", 12) == flags("DEFAULT", 12) == flags("AVX512", None) == []


def test_opt_level_switch(setup_py):
    assert setup_py._opt_level({}) == setup_py._opt_level({"FUSEDLOSS_OPT_LEVEL": ""}) == "-O3"
    assert setup_py._opt_level({"FUSEDLOSS_OPT_LEVEL": "0"}) == "-O0"
    with pytest.raises(RuntimeError, match="FUSEDLOSS_OPT_LEVEL='fast': expected 0, 1, 2 or 3"):
        setup_py._opt_level({"FUSEDLOSS_OPT_LEVEL": "fast"})


def test_debug_build_switch(setup_py):
    assert not setup_py._debug_build({}) and not setup_py._debug_build({"FUSEDLOSS_DEBUG": "0"})
    assert setup_py._debug_build({"FUSEDLOSS_DEBUG": "1"})


@pytest.mark.slow
def test_wheel_built_from_the_sdist_imports_the_extension(tmp_path):
    """The sdist is enough to build: `pip wheel` of it (no network, the installed torch), then
    fusedloss._C imported from the wheel's files alone. Kept cheap: FUSEDLOSS_BUILD_CUDA=0,
    FUSEDLOSS_CPU_CAPABILITIES=DEFAULT and FUSEDLOSS_OPT_LEVEL=0, so the C++ sources and the
    capability sources once are compiled, unoptimized (~1 CPU-minute instead of ~5: it checks
    that the sdist builds, links and imports; the kernels' numerics are the optimized build's,
    which is .ci/run's install)."""
    import subprocess
    import zipfile

    sdist = _sdist(tmp_path / "sdist", FUSEDLOSS_BUILD_EXT="0")
    env = {**os.environ, "FUSEDLOSS_BUILD_CUDA": "0", "FUSEDLOSS_CPU_CAPABILITIES": "DEFAULT",
           "FUSEDLOSS_OPT_LEVEL": "0", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
                          "-w", str(tmp_path / "wheel"), str(sdist)], env=env, capture_output=True, text=True,
                         timeout=3600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("fusedloss-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    check = ("import torch, fusedloss, fusedloss._C as C; import fusedloss as fl; "
             "print(fusedloss.__file__); print(C.cpu_capability()); print(fl.available_backends())")
    run = subprocess.run([sys.executable, "-c", check], env={**env, "PYTHONPATH": str(site)}, capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    where, capability, backends = run.stdout.strip().splitlines()[-3:]
    assert where.startswith(str(site)) and capability == "DEFAULT" and "'cpu'" in backends
