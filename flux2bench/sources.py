"""Model sources: where a case's pipeline comes from.

- ``pretrained``: ``Flux2Pipeline.from_pretrained`` on a hub repo id or a local directory, the path
  real users take.
- ``synthetic``: the exact architecture from the configs shipped in ``flux2bench/configs/<model>/``
  (the public config.json values), with random weights. The modules are built on the meta device
  (no memory, no init cost) and each parameter is then allocated directly where it will live (GPU,
  or host RAM for offload cases) in its final dtype and filled with scaled random normal values. No
  fp32 copy is ever built. Memory and compute are those of the real model; images are not.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from flux2bench.scenario import Case

DTYPE = torch.bfloat16


@dataclass(frozen=True)
class ModelSpec:
    name: str
    pipeline: str
    hub_id: str | None
    tokenizer_file: str  # Tekken tokenizer file shipped inside mistral-common; prompts are padded to 512 tokens

    def config(self, component: str) -> dict[str, Any]:
        path = resources.files("flux2bench") / "configs" / self.name / f"{component}.json"
        return json.loads(path.read_text())


MODELS = {
    "flux2-dev": ModelSpec("flux2-dev", "Flux2Pipeline", "black-forest-labs/FLUX.2-dev", "tekken_240911.json"),
    "tiny": ModelSpec("tiny", "Flux2Pipeline", None, "tekken_240911.json"),
}


class Unsupported(Exception):
    """The case cannot run on this machine or with these packages; the message says which and why."""


def _pipeline_class(spec: ModelSpec) -> type:
    import diffusers

    return getattr(diffusers, spec.pipeline)


def _random_fill_(tensor: torch.Tensor, scale: float, pool: torch.Tensor, offset: int) -> None:
    """Fill ``tensor`` with ``scale`` times values from a pool of random normals, tiled from ``offset``."""
    flat = tensor.view(-1)
    pos = 0
    while pos < flat.numel():
        start = (offset + pos) % pool.numel()
        n = min(flat.numel() - pos, pool.numel() - start)
        torch.mul(pool[start:start + n], scale, out=flat[pos:pos + n])
        pos += n


def _init_scale(name: str, shape: torch.Size) -> tuple[float, float]:
    """(std, mean) in the spirit of the default init: 1/sqrt(fan_in) for matrices, ~1 for norm weights."""
    if len(shape) >= 2:
        return 1 / math.sqrt(math.prod(shape[1:])), 0.0
    if name.endswith("bias"):
        return 0.02, 0.0
    return 0.02, 1.0


def materialize(module: torch.nn.Module, device: torch.device, dtype: torch.dtype = DTYPE, seed: int = 0) -> None:
    """Allocate every meta parameter of ``module`` on ``device`` and fill it with random values."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    pool = torch.randn(1 << 22, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    for index, (name, param) in enumerate(module.named_parameters()):
        if not param.is_meta:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        value = torch.empty(param.shape, dtype=dtype if param.is_floating_point() else param.dtype, device=device)
        std, mean = _init_scale(name, param.shape)
        _random_fill_(value, std, pool, offset=index * 7919)
        if mean:
            value.add_(mean)
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    module.to(device)  # buffers (rotary frequencies, batch-norm statistics) were built for real on the CPU


def _build_on_meta(factory) -> torch.nn.Module:
    from accelerate import init_empty_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        with init_empty_weights(include_buffers=False):
            return factory()
    finally:
        torch.set_default_dtype(previous)


def synthetic_component(spec: ModelSpec, component: str, device: torch.device, seed: int = 0,
                        precision: str = "bf16") -> Any:
    """One pipeline component with random weights on ``device`` (the text encoder and tokenizer included)."""
    import diffusers
    import mistral_common
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration
    from transformers.integrations.mistral import convert_tekken_tokenizer

    if component == "scheduler":
        config = spec.config("scheduler")
        return getattr(diffusers, config.pop("_class_name")).from_config(config)
    if component == "tokenizer":
        # A fast tokenizer with Mistral's chat template: the pipeline's apply_chat_template works as with
        # the real PixtralProcessor, and save_pretrained/from_pretrained round-trip it.
        return convert_tekken_tokenizer(str(Path(mistral_common.__file__).parent / "data" / spec.tokenizer_file))
    if component == "text_encoder":
        config = Mistral3Config.from_dict(spec.config("text_encoder"))
        module = _build_on_meta(lambda: Mistral3ForConditionalGeneration(config))
    else:
        config = spec.config(component)
        cls = getattr(diffusers, config.pop("_class_name"))
        module = _build_on_meta(lambda: cls.from_config(config))
    if precision != "bf16":
        from flux2bench.quantization import build_quantized  # local import: quantization imports sources

        return build_quantized(module, component, precision, device, seed)
    materialize(module, device, seed=seed)
    return module.eval()


def synthetic_pipeline(spec: ModelSpec, placement: dict[str, torch.device], skip: tuple[str, ...] = (),
                       precisions: dict[str, str] | None = None) -> Any:
    """A pipeline of ``spec`` with synthetic weights; ``placement`` maps component to device."""
    components = {}
    for seed, name in enumerate(("scheduler", "tokenizer", "vae", "text_encoder", "transformer")):
        components[name] = None if name in skip else synthetic_component(
            spec, name, placement.get(name), seed=seed, precision=(precisions or {}).get(name, "bf16"))
    return _pipeline_class(spec)(**components)


def pretrained_pipeline(spec: ModelSpec, source: str, skip: tuple[str, ...] = (), **kwargs: Any) -> Any:
    overrides = {name: None for name in skip}
    return _pipeline_class(spec).from_pretrained(source, torch_dtype=DTYPE, **overrides, **kwargs)


def load_pipeline(case: Case, placement: dict[str, torch.device], skip: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """The case's pipeline with each component on its device; components named in ``skip`` are None."""
    from flux2bench.quantization import component_precisions, pipeline_quantization_config

    spec = MODELS[case.model]
    if case.weights == "synthetic":
        return synthetic_pipeline(spec, placement, skip, component_precisions(case))
    source = case.source or spec.hub_id
    pipe = pretrained_pipeline(spec, source, skip, quantization_config=pipeline_quantization_config(case),
                               device_map=_pipeline_device_map(case, placement, skip), **kwargs)
    for name, device in placement.items():
        component = getattr(pipe, name, None)
        if isinstance(component, torch.nn.Module) and device is not None:
            component.to(device)
    return pipe


def _pipeline_device_map(case: Case, placement: dict[str, torch.device], skip: tuple[str, ...]) -> str | None:
    """The pipeline's ``device_map``: the GPU's device type when a component is quantized on the GPU
    (``quantization.load_device_map``), else None (loaded on the CPU, then moved to its placement).

    ``Flux2Pipeline.from_pretrained`` takes one device name for every component ("cuda", the current GPU).
    """
    from flux2bench.quantization import component_precisions, load_device_map

    maps = [load_device_map(precision, placement.get(name))
            for name, precision in component_precisions(case).items() if name not in skip]
    devices = {device_map[""].type for device_map in maps if device_map}
    return devices.pop() if devices else None
