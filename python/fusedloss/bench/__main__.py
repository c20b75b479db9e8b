"""``python -m fusedloss.bench``: same as the ``fusedloss-bench`` console script."""

from .cli import main

raise SystemExit(main())
