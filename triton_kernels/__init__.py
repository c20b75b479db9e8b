"""Triton kernels for fusedloss (packaged as ``fusedloss.triton_kernels``).

One folder per target form, each holding that form's kernels, their launchers and their
ahead-of-time specializations::

    one_target/    an integer class per row: F.cross_entropy(x, t) and the other five losses
    two_targets/   mixup / cutmix: lam L(x, a) + (1 - lam) L(x, b) in one pass
    probs/         class probabilities (soft targets): F.cross_entropy(x, probs)
    split_vocab/   bce of a vocabulary-parallel row given its global numbers (fusedloss.parallel)
    distill/       knowledge distillation: kl / reverse kl / jsd of the teacher's and the student's
                   softmax at temperature T, D per row and the student's gradient in one launch

        kernels.py     the @triton.jit kernels of the form
        launch.py      their torch.library.triton_ops (fusedloss::triton_*), the shapes and checks
        aot_specs.py   KERNELS, config, signature and ci_specs: what aot.py compiles for sm_80/sm_90

Shared by the forms:

    rows.py          the @triton.jit row machinery: constants and variant ids, scalar helpers, the
                     per-variant math, row bookkeeping and reductions, the tile load (soft cap),
                     the online statistics pass, the gradient tiles, bce's passes (TWO_TARGETS),
                     and the prologue and backward-scale kernels every form launches
    launch_common.py host-side launch helpers: checks, workspace and prologue, grids, the options'
                     flags and scalars, and the fused gradient's backward (triton_scale_grad_)
    heuristics.py    launch configurations (tile shapes, warps, persistent-grid size)
    aot.py           the AOT compile driver: Spec, compile_spec, resource_usage (registers, spills)
    traffic.py       bytes moved per launch: the model and the interpreter's count
    report.py        ``python -m fusedloss.triton_kernels.report``: registers, spills and traffic
    backend.py       registers the "triton" backend: one op family per form (dispatch.Backend)

A new form is a new folder of the same three files (as ``distill/`` was), one entry in
``aot.FORMS`` and one op family in ``backend.py``.
"""
