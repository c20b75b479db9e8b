"""Ahead-of-time compilation of the shipped Triton kernels for sm_80 and sm_90, no GPU needed.

Each specialization of ``fusedloss.triton_kernels.one_target.aot_specs.ci_specs()`` (per variant the
register-heaviest configurations; ``python -m fusedloss.triton_kernels.report --all``
compiles every shipped one) goes through Triton's whole pipeline to a cubin; the
bundled ``cuobjdump -res-usage`` and ``ptxas -v`` must show no spills (LOCAL = 0,
no spill stores/loads, no stack), and the register count is printed.
"""
from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1 makes @triton.jit kernels interpreted: compile them in a process without it",
                allow_module_level=True)

from fusedloss.triton_kernels import aot  # noqa: E402
from fusedloss.triton_kernels.distill import aot_specs as distill_specs  # noqa: E402
from fusedloss.triton_kernels.one_target import aot_specs  # noqa: E402
from fusedloss.triton_kernels.probs import aot_specs as probs_specs  # noqa: E402
from fusedloss.triton_kernels.two_targets import aot_specs as two_targets_specs  # noqa: E402
from fusedloss.variants import Variant  # noqa: E402

SPECS = aot_specs.ci_specs()


@pytest.mark.parametrize("arch", aot.ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
def test_compiles_without_spills(spec, arch):
    u = aot.resource_usage(spec, arch)
    print(f"{spec.label()} sm_{arch}: {u.registers} registers, spill {u.spill_stores}/{u.spill_loads} B, "
          f"local {u.local_bytes} B, stack {u.stack_bytes} B")
    assert u.spill_stores == 0 and u.spill_loads == 0 and u.local_bytes == 0 and u.stack_bytes == 0, u
    assert 0 < u.registers <= 255


@pytest.mark.parametrize("arch", aot.ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("spec", probs_specs.ci_specs(), ids=lambda s: s.label())
def test_soft_kernels_compile_without_spills(spec, arch):
    """The soft-target kernels (triton_kernels/probs/kernels.py)."""
    test_compiles_without_spills(spec, arch)


@pytest.mark.parametrize("arch", aot.ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("spec", probs_specs.loss_ci_specs(),
                         ids=lambda s: f"{s.label()}{':two' if s.kernel == 'index_loss_fwd' and s.go_per_row else ''}")
def test_expected_loss_kernels_compile_without_spills(spec, arch):
    """The expected-loss kernels (triton_kernels/probs/loss_kernels.py): probabilities for every loss,
    class indices (one and two targets) with label smoothing for loss != ce."""
    test_compiles_without_spills(spec, arch)


@pytest.mark.parametrize("arch", aot.ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("spec", two_targets_specs.ci_specs(), ids=lambda s: s.label())
def test_mix_kernels_compile_without_spills(spec, arch):
    """Mixup's two-target kernels (triton_kernels/two_targets/kernels.py)."""
    test_compiles_without_spills(spec, arch)


@pytest.mark.parametrize("arch", aot.ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("spec", distill_specs.ci_specs(), ids=lambda s: s.label())
def test_distill_kernels_compile_without_spills(spec, arch):
    """The distillation kernel (triton_kernels/distill/kernels.py): kl, reverse kl and jsd."""
    test_compiles_without_spills(spec, arch)


def test_every_form_is_compiled_here():
    """Each form of aot.FORMS has its specializations compiled by a test (split_vocab's are in
    tests/test_triton_bce_parallel.py), and every kernel named by a spec resolves to its form."""
    compiled_here = {"one_target": SPECS, "probs": probs_specs.ci_specs() + probs_specs.loss_ci_specs(),
                     "two_targets": two_targets_specs.ci_specs(), "distill": distill_specs.ci_specs()}
    assert set(aot.FORMS) == set(compiled_here) | {"split_vocab"}
    for form, specs in compiled_here.items():
        assert specs and all(aot.form_of(s.kernel).__name__.endswith(f".{form}.aot_specs") for s in specs), form


def test_ci_specs_cover_every_variant_dtype_and_regime():
    fwd = [s for s in SPECS if s.kernel == "fwd"]
    assert {s.variant for s in fwd} == {int(v) for v in Variant}
    assert {s.dtype for s in fwd} == set(aot.DTYPES)
    assert {s.config.single for s in fwd} == {True, False}
    assert {s.kernel for s in SPECS} == {"fwd", "bwd", "scale", "prologue"}


def test_variant_ids_match_the_op_abi():
    from fusedloss.triton_kernels import rows
    for v in Variant:
        assert getattr(rows, v.name).value == int(v)
