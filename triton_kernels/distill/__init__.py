"""The distillation form: the teacher's logits as the target (``fusedloss::triton_distill``).

``kernels.py`` (the Triton kernels), ``launch.py`` (their ``triton_op``) and ``aot_specs.py``
(the specializations ``aot.py`` compiles ahead of time)."""
