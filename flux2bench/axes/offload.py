"""Offload: where the weights live between uses, applied the way diffusers documents it.

- ``none``: ``pipe.to(device)``;
- ``model``: ``pipe.enable_model_cpu_offload``, each component moved to the GPU while it runs;
- ``sequential``: ``pipe.enable_sequential_cpu_offload``, each layer moved while it runs;
- ``group_leaf`` / ``group_block``: ``pipe.enable_group_offload`` at leaf or block level, with the options
  ``use_stream``, ``record_stream``, ``low_cpu_mem_usage`` and ``num_blocks_per_group``.

Offloaded weights are created in host RAM, except where the precision axis loads them on the GPU to quantize.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

import torch
from pydantic import Field

from flux2bench.axes.base import Axis, LoadPlan, Option
from flux2bench.errors import Unsupported

OffloadMode = Literal["none", "model", "sequential", "group_leaf", "group_block"]
OFFLOADS: tuple[OffloadMode, ...] = get_args(OffloadMode)
# Lightest first: a drift baseline that offloads less is closer to the plain setup.
BASELINE_ORDER = ("none", "model", "group_block", "group_leaf", "sequential")
PIPELINE_METHODS = {"none": "pipe.to", "model": "pipe.enable_model_cpu_offload",
                    "sequential": "pipe.enable_sequential_cpu_offload"}


class OffloadAxis(Axis):
    name = "offload"
    options = (
        Option("offload", OffloadMode, "none"),
        Option("use_stream", bool, True, expands=False, description="group offload: prefetch on a CUDA stream"),
        Option("record_stream", bool, False, expands=False, description="group offload: record_stream"),
        Option("low_cpu_mem_usage", bool, False, description="group offload: no pinned copy of the weights"),
        Option("num_blocks_per_group", Annotated[int, Field(ge=1)], 1, expands=False,
               description="group offload at block level: blocks moved together"),
    )
    reference = {"offload": "none", "low_cpu_mem_usage": False}
    baseline_fallbacks = ({"offload": "model"},)

    def mode(self, case) -> OffloadMode:
        """Where the case's weights live between uses."""
        mode: OffloadMode = case.settings["offload"]
        return mode

    def moves_weights(self, case) -> bool:
        """Whether the case's weights move between host RAM and the GPU while it runs."""
        return self.mode(case) != "none"

    def label(self, case):
        return [f"offload={case.settings['offload']}"], (["low_cpu_mem"] if case.settings["low_cpu_mem_usage"] else [])

    def plan_load(self, case, plan: LoadPlan) -> None:
        if case.settings["offload"] != "none":
            plan.home = torch.device("cpu")

    def check(self, case, plan: LoadPlan) -> None:
        if plan.device.type != "cuda" and case.settings["offload"] != "none":
            raise Unsupported(f"offload: {case.settings['offload']} moves weights between host and an accelerator; "
                              "no CUDA GPU here")

    def apply(self, pipe: Any, case, plan: LoadPlan) -> dict[str, Any]:
        offload, device = case.settings["offload"], plan.device
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

    @staticmethod
    def group_options(case) -> dict[str, Any]:
        settings = case.settings
        options = dict(offload_type="leaf_level" if settings["offload"] == "group_leaf" else "block_level",
                       use_stream=settings["use_stream"], record_stream=settings["record_stream"],
                       low_cpu_mem_usage=settings["low_cpu_mem_usage"])
        if settings["offload"] == "group_block":
            options["num_blocks_per_group"] = settings["num_blocks_per_group"]
        return options

    def host_bound(self, case) -> bool:
        return case.settings["offload"] != "none"  # weights cross PCIe from host RAM at every use

    def baseline_rank(self, case) -> int:
        return BASELINE_ORDER.index(case.settings["offload"])


AXIS = OffloadAxis()
