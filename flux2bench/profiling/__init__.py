"""The profile of a case: what holds its memory peak and where a denoising step goes (docs/why.md).

``record`` is the typed record (imported by ``flux2bench.results``); ``memory`` and ``steps`` analyse an allocator
history and a profiler trace; ``take`` makes the extra calls in the worker. Only a profiled case's worker imports
``take`` (and with it the profiler): the timed path of every other case runs without this package's code.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flux2bench.case import Case


def profiled(cases: list[Case]) -> list[Case]:
    """The cases with their profile turned on (``flux2bench run --profile``); their keys do not change (a profile is
    no part of a case's identity)."""
    return [replace(case, profile=True) for case in cases]
