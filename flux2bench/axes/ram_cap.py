"""Emulated smaller hosts: ``max_ram_gib`` runs the worker as if the host had only that much RAM (a cgroup v2
``memory.max`` around it, made by the runner; ``flux2bench.cgroup``). A case the cap kills is ``host_oom``; one
that survives by evicting and re-reading file-backed weights shows it in its s/step and its disk reads."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from flux2bench.axes.base import EMULATION, UNKEYED_AT_DEFAULT, Axis, ChoosesDriftBaseline, PlacesWorker, Settings
from flux2bench.units import GIB

if TYPE_CHECKING:
    from flux2bench.case import Case


class RamCapSettings(Settings):
    max_ram_gib: Annotated[Annotated[float, Field(gt=0)] | None, UNKEYED_AT_DEFAULT, EMULATION] = Field(
        None, description="cap the worker's host RAM, page cache included, to emulate a smaller host")


class RamCapAxis(Axis[RamCapSettings], PlacesWorker, ChoosesDriftBaseline):
    name = "ram_cap"
    settings_model = RamCapSettings
    plain_setup_values = {"max_ram_gib": None}

    def cap_gib(self, case: Case) -> float | None:
        """The emulated host's RAM: the cap on the worker's memory, or None."""
        return self.of(case).max_ram_gib

    def capped(self, case: Case) -> bool:
        """Whether the case's worker runs under a host RAM cap."""
        return self.of(case).max_ram_gib is not None

    def label(self, case: Case) -> tuple[list[str], list[str]]:
        cap = self.of(case).max_ram_gib
        return [], ([f"ram={cap:g}GiB"] if cap is not None else [])

    def ram_limit_bytes(self, case: Case) -> int | None:
        cap = self.of(case).max_ram_gib
        return None if cap is None else int(cap * GIB)

    def host_bound(self, case: Case) -> bool:
        return self.capped(case)  # a capped worker may page weights in and out


AXIS = RamCapAxis()
