"""Emulated smaller hosts: ``max_ram_gib`` runs the worker as if the host had only that much RAM (a cgroup v2
``memory.max`` around it, made by the runner; ``flux2bench.cgroup``). A case the cap kills is ``host_oom``; one
that survives by evicting and re-reading file-backed weights shows it in its s/step and its disk reads."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from flux2bench.axes.base import Axis, Option

GIB = 2**30


class RamCapAxis(Axis):
    name = "ram_cap"
    options = (Option("max_ram_gib", Annotated[float, Field(gt=0)] | None, None, keyed_when_default=False,
                      description="cap the worker's host RAM, page cache included, to emulate a smaller host"),)
    reference = {"max_ram_gib": None}

    def label(self, case):
        cap = case.settings["max_ram_gib"]
        return [], ([f"ram={cap:g}GiB"] if cap is not None else [])

    def ram_limit_bytes(self, case) -> int | None:
        cap = case.settings["max_ram_gib"]
        return None if cap is None else int(cap * GIB)

    def host_bound(self, case) -> bool:
        return case.settings["max_ram_gib"] is not None  # a capped worker may page weights in and out


AXIS = RamCapAxis()
