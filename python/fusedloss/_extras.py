"""Optional dependencies of the command-line tools, named by their pip extra.

``pip install fusedloss`` gives the losses and ``fusedloss-bench``; the rest comes with
an extra (declared in setup.py):

- ``fusedloss[bench]``: matplotlib, for ``fusedloss-bench --plot``;
- ``fusedloss[train]``: torchvision, pillow, tqdm and matplotlib, for ``python -m fusedloss.train``.

A command that lacks one stops before doing any work, with one line that names the
extra (:class:`MissingExtraError`), instead of a ``ModuleNotFoundError`` traceback midway.
"""
from __future__ import annotations

import importlib.util
import sys

# extra -> the modules it provides (import names, not distribution names: pillow is PIL).
EXTRAS: dict[str, tuple[str, ...]] = {
    "bench": ("matplotlib",),
    "train": ("torchvision", "PIL", "tqdm", "matplotlib"),
}


# import name -> the package pip installs it from, where they differ.
DISTRIBUTIONS = {"PIL": "pillow"}


class MissingExtraError(ImportError):
    """A command needs modules of a pip extra that are not installed."""


def missing_modules(modules: tuple[str, ...] | list[str]) -> list[str]:
    """The modules among ``modules`` that cannot be imported (without importing them)."""
    missing = []
    for name in modules:
        if name in sys.modules:
            if sys.modules[name] is None:  # import blocked (how tests simulate an absent package)
                missing.append(name)
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def require_extra(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise :class:`MissingExtraError` naming ``extra`` when ``what`` (e.g. "--plot") lacks
    any of ``modules`` (default: all of the extra's)."""
    missing = missing_modules(EXTRAS[extra] if modules is None else modules)
    if missing:
        raise MissingExtraError(
            f"{what} needs {', '.join(DISTRIBUTIONS.get(m, m) for m in missing)}, not installed: "
            f"pip install 'fusedloss[{extra}]'")
