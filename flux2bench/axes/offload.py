"""Offload: where the weights live between uses, applied the way diffusers documents it.

- ``none``: ``pipe.to(device)``;
- ``model``: ``pipe.enable_model_cpu_offload``, each component moved to the GPU while it runs;
- ``sequential``: ``pipe.enable_sequential_cpu_offload``, each layer moved while it runs;
- ``group_leaf`` / ``group_block``: ``pipe.enable_group_offload`` at leaf or block level, with the options
  ``use_stream``, ``record_stream``, ``low_cpu_mem_usage`` and ``num_blocks_per_group``.

Offloaded weights are created in host RAM, except where the precision axis loads them on the GPU to quantize.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from flux2bench.axes.base import (ONE_PER_BLOCK, Axis, ChoosesDriftBaseline, LoadPlan, LoadsPipeline, PlacesWorker,
                                  Settings)
from flux2bench.errors import MachineLacks

if TYPE_CHECKING:

    from flux2bench.case import Case

OffloadMode = Literal["none", "model", "sequential", "group_leaf", "group_block"]
# Lightest first: a drift baseline that offloads less is closer to the plain setup.
BASELINE_ORDER: tuple[OffloadMode, ...] = ("none", "model", "group_block", "group_leaf", "sequential")
PIPELINE_METHODS = {"none": "pipe.to", "model": "pipe.enable_model_cpu_offload",
                    "sequential": "pipe.enable_sequential_cpu_offload"}


class OffloadSettings(Settings):
    offload: OffloadMode = "none"
    use_stream: Annotated[bool, ONE_PER_BLOCK] = Field(True, description="group offload: prefetch on a CUDA stream")
    record_stream: Annotated[bool, ONE_PER_BLOCK] = Field(False, description="group offload: record_stream")
    low_cpu_mem_usage: bool = Field(False, description="group offload: no pinned copy of the weights")
    num_blocks_per_group: Annotated[int, Field(ge=1), ONE_PER_BLOCK] = Field(
        1, description="group offload at block level: blocks moved together")


class OffloadAxis(Axis[OffloadSettings], LoadsPipeline, PlacesWorker, ChoosesDriftBaseline):
    name = "offload"
    settings_model = OffloadSettings
    plain_setup_values = {"offload": "none", "low_cpu_mem_usage": False}
    drift_baseline_fallbacks = ({"offload": "model"},)

    def mode(self, case: Case) -> OffloadMode:
        """Where the case's weights live between uses."""
        return self.of(case).offload

    def moves_weights(self, case: Case) -> bool:
        """Whether the case's weights move between host RAM and the GPU while it runs."""
        return self.mode(case) != "none"

    def label(self, case: Case) -> tuple[list[str], list[str]]:
        settings = self.of(case)
        return [f"offload={settings.offload}"], (["low_cpu_mem"] if settings.low_cpu_mem_usage else [])

    def plan_load(self, case: Case, plan: LoadPlan) -> None:
        import torch

        if self.moves_weights(case):
            plan.home = torch.device("cpu")

    def check(self, case: Case, plan: LoadPlan) -> None:
        if plan.device.type != "cuda" and self.moves_weights(case):
            raise MachineLacks(f"offload: {self.mode(case)} moves weights between host and an accelerator; "
                              "no CUDA GPU here")

    def apply(self, pipe: Any, case: Case, plan: LoadPlan) -> dict[str, Any]:
        import torch

        offload, device = self.mode(case), plan.device
        if offload == "none":
            pipe.to(device)
        elif offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        elif offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=device)
        else:
            options = self.group_options(case)
            pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), **options)
            return {"offload": offload, "method": "pipe.enable_group_offload", **options}
        return {"offload": offload, "method": PIPELINE_METHODS[offload]}

    def group_options(self, case: Case) -> dict[str, Any]:
        settings = self.of(case)
        options: dict[str, Any] = dict(
            offload_type="leaf_level" if settings.offload == "group_leaf" else "block_level",
            use_stream=settings.use_stream, record_stream=settings.record_stream,
            low_cpu_mem_usage=settings.low_cpu_mem_usage)
        if settings.offload == "group_block":
            options["num_blocks_per_group"] = settings.num_blocks_per_group
        return options

    def host_bound(self, case: Case) -> bool:
        return self.moves_weights(case)  # weights cross PCIe from host RAM at every use

    def drift_baseline_rank(self, case: Case) -> int:
        return BASELINE_ORDER.index(self.mode(case))


AXIS = OffloadAxis()
