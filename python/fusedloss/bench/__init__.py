"""``fusedloss-bench``: speed, memory and accuracy of every backend, as tables and plots.

Run ``fusedloss-bench --help`` (or ``python -m fusedloss.bench --help``).
The package is split by job: ``options`` parses the command line, ``backends``
builds the loss callables, ``timing``/``memory``/``accuracy`` measure one cell,
``sweep`` walks the grid, ``machine`` describes the host, ``allocator`` keeps
freed CPU memory in the process, ``report`` and ``plot`` write the results,
``cli`` glues them together.
"""

from .cli import main

__all__ = ["main"]
