"""The one-target form: an integer class target per row (``F.cross_entropy(x, t)``).

``kernels.py`` (the Triton kernels), ``launch.py`` (their ``triton_op``s) and ``aot_specs.py``
(the specializations ``aot.py`` compiles ahead of time)."""
