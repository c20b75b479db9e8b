"""Collection rules for tests that only make sense inside a subprocess that sets up their
environment; their parent tests run them there, so in the parent they are not collected
(rather than reported as skipped)."""
from __future__ import annotations

import os

import pytest

collect_ignore: list[str] = []
if os.environ.get("TRITON_INTERPRET") != "1":
    # Triton fixes interpreted vs compiled mode when it is first imported; test_triton_suite.py
    # runs this file in a subprocess with TRITON_INTERPRET=1.
    collect_ignore.append("test_triton_interpreter.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Checks the kernel capability a subprocess of test_other_capability_builds forced.
    if os.environ.get("FUSEDLOSS_TEST_CAPABILITY") is None:
        dropped = [i for i in items if i.name == "test_capability_in_subprocess"]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = [i for i in items if i not in dropped]
    # CI runs the suite on two pytest-xdist workers, a file at a time, in collection order
    # (`-n 2 --dist loadfile --no-loadscope-reorder`; without the last, xdist hands out the files
    # with the most tests first). The files holding a `slow` test (a subprocess of minutes: an
    # interpreter run, a build) go first, the longest of them (LONGEST_FIRST) before the others,
    # so that no worker starts one while the other has nothing left. The order among the rest is
    # unchanged (a stable sort, the same on every worker, as xdist requires).
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> tuple[bool, int]:
        name = item.path.name
        longest = LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
        return item.path not in slow_files, longest

    items.sort(key=rank)


#: The files whose subprocess test takes longest (each 140-210 s on a quiet 2-core CI machine,
#: pytest --durations), longest first.
LONGEST_FIRST = ("test_triton_suite.py", "test_triton_expected.py", "test_packaging.py", "test_triton_mix.py")


# Hypothesis budgets: CI runs a fixed, derandomized set of examples (same every run);
# HYPOTHESIS_PROFILE=thorough draws many more, at random.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is in requirements-dev.txt; tests that need it import it themselves
    pass
else:
    _slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=40, derandomize=True, deadline=None,
                              suppress_health_check=_slow_ok, print_blob=True)
    settings.register_profile("thorough", max_examples=2000, deadline=None, suppress_health_check=_slow_ok,
                              print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
