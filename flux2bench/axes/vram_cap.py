"""Emulated smaller cards: ``max_vram_gib`` caps this worker's CUDA allocator."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from flux2bench.axes.base import EMULATION, Axis, ChoosesDriftBaseline, LoadPlan, LoadsPipeline, Settings
from flux2bench.errors import MachineLacks, Unsupported
from flux2bench.units import GIB

if TYPE_CHECKING:

    from flux2bench.case import Case


class VramCapSettings(Settings):
    max_vram_gib: Annotated[Annotated[float, Field(gt=0)] | None, EMULATION] = Field(
        None, description="cap the worker's CUDA allocator to emulate a smaller card")


class VramCapAxis(Axis[VramCapSettings], LoadsPipeline, ChoosesDriftBaseline):
    name = "vram_cap"
    settings_model = VramCapSettings
    drift_baseline_values = {"max_vram_gib": None}

    def cap_gib(self, case: Case) -> float | None:
        """The emulated card's size: the cap on the worker's CUDA allocator, or None."""
        return self.of(case).max_vram_gib

    def label(self, case: Case) -> tuple[list[str], list[str]]:
        cap = self.of(case).max_vram_gib
        return [], ([f"cap={cap:g}GiB"] if cap is not None else [])

    def check(self, case: Case, plan: LoadPlan) -> None:
        if plan.device.type != "cuda" and self.of(case).max_vram_gib is not None:
            raise MachineLacks("max_vram_gib caps the CUDA allocator; no CUDA GPU here")

    def before_load(self, case: Case, plan: LoadPlan) -> dict[str, Any] | None:
        import torch

        cap = self.of(case).max_vram_gib
        if cap is None:
            return None
        total = torch.cuda.get_device_properties(plan.device).total_memory
        fraction = cap * GIB / total
        if fraction > 1:
            raise Unsupported(f"max_vram_gib {cap} is more than this GPU's {total / GIB:.1f} GiB")
        torch.cuda.set_per_process_memory_fraction(fraction, plan.device)
        return {
            "max_vram_gib": cap,
            "fraction": fraction,
            "method": "torch.cuda.set_per_process_memory_fraction",
            "limits": "caps the PyTorch caching allocator only; the CUDA context (~0.5 GiB), cuBLAS workspaces and "
                      "memory taken outside PyTorch's allocator are not counted against the cap",
        }


AXIS = VramCapAxis()
