"""Pretrained weights: ``<Pipeline>.from_pretrained(source, torch_dtype=bfloat16, quantization_config=...)``.

``source`` is a hub repo id or a local directory (also pre-quantized repos such as
``diffusers/FLUX.2-dev-bnb-4bit``, whose stored ``quantization_config`` the libraries use in preference).
"""

from __future__ import annotations

from typing import Any

import torch

from flux2bench.axes.base import LoadPlan
from flux2bench.axes.precision import load_device_map, pipeline_quantization_config
from flux2bench.models import ModelSpec
from flux2bench.sources.random_weights import DTYPE


def pipeline_device_map(plan: LoadPlan) -> str | None:
    """The pipeline's ``device_map``: the GPU's device type when a component is quantized on the GPU, else None
    (loaded on the CPU, then moved to its placement). ``from_pretrained`` of a pipeline takes one device name for
    every component ("cuda", the current GPU)."""
    placement = plan.placement
    maps = [load_device_map(plan.precisions[name], placement[name]) for name in plan.components
            if name in plan.precisions]
    devices = {device_map[""].type for device_map in maps if device_map}
    return devices.pop() if devices else None


def pretrained_pipeline(spec: ModelSpec, source: str, plan: LoadPlan, **kwargs: Any) -> Any:
    held = {name: plan.precisions[name] for name in plan.components if name in plan.precisions}
    pipe = spec.pipeline_class().from_pretrained(
        source, torch_dtype=DTYPE, quantization_config=pipeline_quantization_config(held),
        device_map=pipeline_device_map(plan), **{name: None for name in plan.skip}, **plan.options, **kwargs)
    for name, device in plan.placement.items():
        component = getattr(pipe, name, None)
        if isinstance(component, torch.nn.Module):
            component.to(device)
    return pipe
