"""ImageNet training with any fusedloss loss: a thin wrapper around ``python -m fusedloss.train``.

Run it directly or under torchrun (see ``--help`` and docs/training.md).
The code lives in ``python/fusedloss/train/`` so that it ships with the package.
"""
import os
import sys

try:
    from fusedloss.train import main
except ImportError:  # a source checkout without `pip install -e .`: use the package beside this script
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
    from fusedloss.train import main

if __name__ == "__main__":
    sys.exit(main())
