"""Plain-text stand-ins for the few ``rich`` classes the CLI uses.

``rich`` is a requirement of the benchmark (requirements-bench.txt), but a GPU
machine reached without network (``bench/gpu/check.sh``) may have torch and
triton and nothing else. There the benchmark still runs: no progress bar, and
the table printed as markdown (``report.print_table``).
"""

from __future__ import annotations

import re
import sys
from typing import Any

_MARKUP = re.compile(r"\[/?[a-z ]+\]")


class Console:
    """``print`` to stdout (or stderr), markup tags dropped."""

    def __init__(self, width: int | None = None, stderr: bool = False, **_: Any) -> None:
        self.width = width or 200
        self.stderr = stderr
        self.is_terminal = False

    def print(self, *objects: object, markup: bool = True, **_: Any) -> None:
        text = " ".join(str(o) for o in objects)
        if markup:
            text = _MARKUP.sub("", text)
        print(text, file=sys.stderr if self.stderr else sys.stdout, flush=True)


class Progress:
    """No progress bar: a context manager whose methods do nothing."""

    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def add_task(self, *_: Any, **__: Any) -> int:
        return 0

    def update(self, *_: Any, **__: Any) -> None:
        pass

    def advance(self, *_: Any, **__: Any) -> None:
        pass


def _column(*_: Any, **__: Any) -> None:
    return None


BarColumn = MofNCompleteColumn = TextColumn = TimeElapsedColumn = _column
