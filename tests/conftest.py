"""Collection rules for tests that only make sense inside a subprocess that sets up their
environment; their parent tests run them there, so in the parent they are not collected
(rather than reported as skipped)."""
from __future__ import annotations

import os

import pytest

collect_ignore: list[str] = []


def _patch_triton_language_once_per_launch() -> None:
    """Under TRITON_INTERPRET=1, Triton's interpreter swaps triton.language's builtins for
    interpreted ones when a kernel launches (GridExecutor; undone when it returns), and again
    at every call of a @triton.jit function inside it (InterpretedFunction.__call__: once per
    program per call of a helper or of tl.sum, tl.max, tl.zeros, ...): an inspect.getmembers
    walk over tl, tl.tensor, tl.math (and tl.core) whose builtins are by then swapped already,
    so it changes nothing; it was a quarter of the interpreter cases' CPU time. Here a call
    inside a launch skips that walk when the modules it would swap are swapped already: by the
    launch, or left swapped by an earlier such call (which Triton never undoes); the launch's
    own swap and everything else run as before. Where Triton's internals differ (another
    version), nothing is changed: the runs are slower, not different.
    FUSEDLOSS_TEST_PLAIN_INTERPRETER=1 leaves Triton as it is (to compare)."""
    try:
        import inspect

        import triton.language as tl
        from triton.runtime import interpreter as interp
    except Exception:  # noqa: BLE001 - no triton (or a broken one): the tests that need it say so
        return
    grid_executor = getattr(interp, "GridExecutor", None)
    original = getattr(interp, "_patch_lang", None)
    if grid_executor is None or original is None or getattr(original, "_fusedloss_once", False):
        return
    langs_of: dict = {}

    def langs(fn) -> frozenset:
        """The language modules _patch_lang(fn) swaps (those fn's module sees), cached per function."""
        if fn not in langs_of:
            langs_of[fn] = frozenset(id(v) for v in fn.__globals__.values()
                                     if inspect.ismodule(v) and v in (tl, tl.core))
        return langs_of[fn]

    # The running launch's kernel, the modules its swap covers (None until it swapped them) and
    # the modules that calls inside launches swapped and Triton left so.
    state = {"fn": None, "langs": None, "kept": frozenset()}

    class _Unchanged:
        def restore(self) -> None:
            pass

    def patch_lang(fn):
        if state["fn"] is fn and state["langs"] is None:  # the launch's own swap, undone at its end
            state["langs"] = langs(fn)
            return original(fn)
        if state["langs"] is None:  # outside a launch: as Triton does it
            return original(fn)
        if langs(fn) <= state["langs"] | state["kept"]:
            return _Unchanged()
        scope = original(fn)  # a call inside the launch: its caller never undoes it
        state["kept"] = state["kept"] | (langs(fn) - state["langs"])
        return scope

    patch_lang._fusedloss_once = True
    run_launch = grid_executor.__call__

    def call(self, *args, **kwargs):
        outer = dict(state)
        state.update(fn=self.fn, langs=None)
        try:
            return run_launch(self, *args, **kwargs)
        finally:
            ended = state["langs"] or frozenset()
            # The launch's swap is undone: its modules are no longer swapped, whatever a call in it did.
            state.update(fn=outer["fn"], langs=outer["langs"], kept=state["kept"] - ended)

    interp._patch_lang = patch_lang
    grid_executor.__call__ = call


if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("FUSEDLOSS_TEST_PLAIN_INTERPRETER") != "1":
    _patch_triton_language_once_per_launch()
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


#: The files whose subprocess test takes longest, longest first (pytest --durations at load ~3
#: on the 2-core machine, with the interpreter shortcut above and the -O0 wheel: suite 151 s,
#: expected ~100 s, mix 73 s; before them, CI's quiet run gave 235, 179, 218 (packaging), 234 s).
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
