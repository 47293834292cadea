"""Synthetic weights in a quantized precision, loaded through the libraries' own loading code.

The result is what ``from_pretrained`` with the same config gives (module types, parameter classes, storage dtypes
and shapes, quantization state, the ``hf_quantizer`` attribute and ``config.quantization_config``), never modules
built by hand:

- diffusers models: ``DiffusersAutoQuantizer`` + ``preprocess_model`` on the meta-built model, then the random bf16
  tensors through ``load_model_dict_into_meta(..., hf_quantizer=...)``, each generated only when the loader reads it
  (so one exists at a time, as when it reads a checkpoint) and where the loader quantizes it (the GPU, for torchao's
  ``device_map``; generating 32B values on the CPU and copying them over took 15 s of FLUX.2-dev's FP8 load), then
  ``dispatch_model`` / ``postprocess_model`` / ``hf_quantizer`` / ``_pre_quantization_dtype``, the steps and the order
  of ``ModelMixin.from_pretrained`` (diffusers 0.42);
- transformers models: ``from_pretrained(None, config=..., state_dict=...)`` itself, with a state dict whose values
  are generated only when the loader reads them (``tensor[...]``, as it reads safetensors slices), so at most one
  bf16 tensor exists at a time.

Random values are those ``random_weights.materialize`` gives the bf16 model with the same seed, so a synthetic nf4
model is the nf4 quantization of the synthetic bf16 model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from flux2bench.axes.precision import load_device_map, quantization_config
from flux2bench.axes.quantization_backends import COMPONENT_LIBRARY
from flux2bench.sources.random_weights import DTYPE, random_pool, random_value

def build_quantized(meta_module: torch.nn.Module, component: str, precision: str, device: torch.device | None,
                    seed: int = 0) -> torch.nn.Module:
    """``meta_module`` (built on the meta device) loaded with random weights in ``precision``, then moved to ``device``.

    The model is loaded where ``from_pretrained`` with the same config and ``device_map=load_device_map(precision,
    device)`` loads it, and then moved to ``device``, as pretrained components are.
    """
    library = COMPONENT_LIBRARY[component]
    config = quantization_config(library, precision)
    device_map = load_device_map(precision, device)
    pool = random_pool(seed, device_map[""] if device_map and "" in device_map else "cpu")
    loader = _load_diffusers if library == "diffusers" else _load_transformers
    module = loader(meta_module, config, pool, device_map)
    if device is not None:
        module.to(device)
    return module.eval()


def _load_diffusers(model: torch.nn.Module, config: Any, pool: torch.Tensor,
                    device_map: dict[str, torch.device] | None) -> torch.nn.Module:
    from accelerate import dispatch_model
    from diffusers.models.model_loading_utils import load_model_dict_into_meta
    from diffusers.quantizers import DiffusersAutoQuantizer

    shapes = [(name, param.shape) for name, param in model.named_parameters()]  # indices as in materialize
    hf_quantizer = DiffusersAutoQuantizer.from_config(config, pre_quantized=False)
    hf_quantizer.validate_environment(torch_dtype=DTYPE, device_map=device_map)
    dtype = hf_quantizer.update_torch_dtype(DTYPE)
    device_map = hf_quantizer.update_device_map(device_map)
    keep_in_fp32 = list(model._keep_in_fp32_modules or []) if hf_quantizer.use_keep_in_fp32_modules else []
    model.register_to_config(quantization_config=config)  # from_config keeps it from the config from_pretrained builds
    hf_quantizer.preprocess_model(model=model, device_map=device_map, keep_in_fp32_modules=keep_in_fp32)
    hf_quantizer.validate_environment(device_map=device_map)

    load_model_dict_into_meta(model, _RandomStateDict(shapes, pool), dtype=dtype, hf_quantizer=hf_quantizer,
                              keep_in_fp32_modules=keep_in_fp32, device_map=device_map, unexpected_keys=[])

    if device_map is not None:
        dispatch_model(model, device_map=device_map)
    hf_quantizer.postprocess_model(model)
    model.hf_quantizer = hf_quantizer
    model.register_to_config(_pre_quantization_dtype=dtype)
    return model


class _RandomStateDict(Mapping[str, torch.Tensor]):
    """A model's random values by parameter name, each generated (on the pool's device) when it is read."""

    def __init__(self, shapes: list[tuple[str, torch.Size]], pool: torch.Tensor):
        self._index = {name: (index, shape) for index, (name, shape) in enumerate(shapes)}
        self._pool = pool

    def __getitem__(self, name: str) -> torch.Tensor:
        index, shape = self._index[name]
        return random_value(name, shape, index, self._pool)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


class _RandomTensor:
    """A parameter's random values, generated when the loader reads them (``tensor[...]``, like a safetensors slice)."""

    def __init__(self, name: str, shape: torch.Size, index: int, pool: torch.Tensor):
        self.name, self.shape, self.index, self.pool = name, shape, index, pool

    def __getitem__(self, key: Any) -> torch.Tensor:
        return random_value(self.name, self.shape, self.index, self.pool)[key]


def _load_transformers(meta_module: torch.nn.Module, config: Any, pool: torch.Tensor,
                       device_map: dict[str, torch.device] | None) -> torch.nn.Module:
    """``from_pretrained`` itself, as the pipeline calls it (dtype bf16), on a lazy random state dict."""
    state_dict = {name: _RandomTensor(name, param.shape, index, pool)
                  for index, (name, param) in enumerate(meta_module.named_parameters())}
    return type(meta_module).from_pretrained(None, config=meta_module.config, state_dict=state_dict,
                                             quantization_config=config, dtype=DTYPE, device_map=device_map)
