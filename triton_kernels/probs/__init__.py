"""The class-probability form: soft targets (``F.cross_entropy(x, probs)``).

``kernels.py`` (the Triton kernels), ``launch.py`` (their ``triton_op``s) and ``aot_specs.py``
(the specializations ``aot.py`` compiles ahead of time)."""
