"""The vocabulary-parallel form: bce's second round over a rank's slice of the classes.

``kernels.py`` (the Triton kernels), ``launch.py`` (their ``triton_op``s) and ``aot_specs.py``
(the specializations ``aot.py`` compiles ahead of time)."""
