"""The two-target form: mixup / cutmix's ``lam L(x, a) + (1 - lam) L(x, b)``.

``kernels.py`` (the Triton kernels), ``launch.py`` (their ``triton_op``s) and ``aot_specs.py``
(the specializations ``aot.py`` compiles ahead of time)."""
