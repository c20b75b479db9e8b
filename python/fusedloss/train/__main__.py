"""``python -m fusedloss.train`` (and ``torchrun ... -m fusedloss.train``): see :mod:`fusedloss.train.cli`."""
import sys

from fusedloss.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
