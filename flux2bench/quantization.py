"""Quantized precisions: ``nf4`` (bitsandbytes 4-bit NF4) and ``fp8`` (torchao float8), loaded as the libraries load them.

- ``nf4``: ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=bf16)``.
- ``fp8``: ``TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor()))``; ``fp8_row`` is the
  same with ``PerRow()`` granularity (dynamic activation + weight float8, e4m3, per tensor or per row).

The transformer is a diffusers model and gets the diffusers config class; the text encoder is a transformers model
and gets the transformers one. The VAE always stays bf16.

torchao components are loaded with ``device_map`` on the GPU they run on, so each layer is quantized there, as
diffusers' torchao guide loads them (``load_device_map``); bitsandbytes always quantizes on the current GPU.

Pretrained weights go through ``Flux2Pipeline.from_pretrained(..., quantization_config=pipeline_quantization_config(case))``;
a pre-quantized repo (such as ``diffusers/FLUX.2-dev-bnb-4bit``) carries its own ``quantization_config`` in each
component's config.json, which the libraries use in preference to the one passed (they warn and keep the stored one).

Synthetic weights go through the libraries' own loading code, so that the result is the one ``from_pretrained``
with the same config gives (module types, parameter classes, storage dtypes and shapes, quantization state, the
``hf_quantizer`` attribute and ``config.quantization_config``), never through modules built by hand:

- diffusers models: ``DiffusersAutoQuantizer`` + ``preprocess_model`` on the meta-built model, then the random bf16
  tensors, about ``CHUNK_BYTES`` at a time, through ``load_model_dict_into_meta(..., hf_quantizer=...)``, then
  ``dispatch_model`` / ``postprocess_model`` / ``hf_quantizer`` / ``_pre_quantization_dtype``, the steps and the order
  of ``ModelMixin.from_pretrained``;
- transformers models: ``from_pretrained(None, config=..., state_dict=...)`` itself, with a state dict whose values
  are generated only when the loader reads them (``tensor[...]``, as it reads safetensors slices). Quantizing on the
  fly, transformers reads them one at a time, just before it quantizes each (no thread pool), so at most one bf16
  tensor exists at a time.

Random values are those ``sources.materialize`` gives the bf16 model with the same seed (same pool, same offsets,
same scales), so a synthetic nf4 model is the nf4 quantization of the synthetic bf16 model.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from flux2bench.scenario import Case
from flux2bench.sources import DTYPE, Unsupported, _init_scale, _random_fill_

FP8_GRANULARITY = {"fp8": "PerTensor", "fp8_row": "PerRow"}
QUANTIZED_PRECISIONS = ("nf4", *FP8_GRANULARITY)
FP8_MIN_CAPABILITY = (8, 9)
# The library each quantizable component belongs to (the VAE is never quantized).
COMPONENT_LIBRARY = {"transformer": "diffusers", "text_encoder": "transformers"}
CHUNK_BYTES = 1 << 30  # bf16 bytes of random values handed to the diffusers loader at a time
POOL_SIZE = 1 << 22  # as sources.materialize
OFFSET_STRIDE = 7919  # as sources.materialize


def check_precision_supported(precision: str, device: torch.device) -> None:
    """Raise Unsupported when ``precision`` cannot be loaded or run on ``device``; the message says which and why."""
    if precision == "bf16":
        return
    if precision == "nf4":
        _check_nf4(device)
    elif precision in FP8_GRANULARITY:
        _check_fp8(precision, device)
    else:
        raise ValueError(f"unknown precision {precision!r}; known: bf16, {', '.join(QUANTIZED_PRECISIONS)}")


def _check_nf4(device: torch.device) -> None:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise Unsupported(f"nf4 needs the bitsandbytes package (pip install 'flux2bench[quant]'): {exc}") from None
    if device.type != "cuda":
        # bitsandbytes >= 0.48 has a CPU backend, and transformers loads 4-bit on the CPU, but diffusers'
        # BnB4BitDiffusersQuantizer.validate_environment raises "No GPU found. A GPU is needed for quantization."
        # unless CUDA, XPU or MPS is available, so the FLUX.2 transformer cannot be loaded in nf4 here.
        raise Unsupported(f"nf4 on device {device}: diffusers loads bitsandbytes 4-bit models only on a GPU "
                          f"(bitsandbytes {bnb.__version__}; this harness runs nf4 on CUDA)")
    try:
        bnb.functional.quantize_4bit(torch.ones(64, device=device, dtype=DTYPE), quant_type="nf4")
    except Exception as exc:  # a bitsandbytes build without kernels for this GPU or CUDA version
        raise Unsupported(f"nf4: bitsandbytes {bnb.__version__} cannot quantize on {device} "
                          f"({torch.cuda.get_device_name(device)}): {type(exc).__name__}: {exc}") from None


def _check_fp8(precision: str, device: torch.device) -> None:
    needed = ".".join(map(str, FP8_MIN_CAPABILITY))
    what = f"{precision} (torchao float8 dynamic activation + weight, {FP8_GRANULARITY[precision]})"
    if device.type != "cuda":
        raise Unsupported(f"{what} needs a CUDA GPU of compute capability {needed} or newer; device {device} "
                          f"is not a CUDA GPU and has no compute capability")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise Unsupported(f"{what} needs compute capability {needed} or newer; device {device} "
                          f"({torch.cuda.get_device_name(device)}) has {capability[0]}.{capability[1]}")
    try:
        import torchao  # noqa: F401
    except ImportError as exc:
        raise Unsupported(f"{precision} needs the torchao package (pip install 'flux2bench[quant]'): {exc}") from None


# Offload modes that fail with a quantized component, the same with weights from from_pretrained and from
# build_quantized (seen on an H200: torch 2.11, diffusers 0.42.1, transformers 5.17, bitsandbytes 0.50.2, torchao 0.18).
_GROUP_OFFLOAD_NF4 = (
    "diffusers' group offloading moves each parameter's .data to the GPU but not a bitsandbytes Params4bit's "
    "quant_state, so the 4-bit kernel gets the weight on cuda with absmax and code still on the CPU and fails with "
    "'CUDA illegal memory access'")
OFFLOAD_LIMITS = {
    ("nf4", "group_leaf"): _GROUP_OFFLOAD_NF4,
    ("nf4", "group_block"): _GROUP_OFFLOAD_NF4,
    ("nf4", "sequential"): "accelerate's cpu_offload (what enable_sequential_cpu_offload applies) leaves the "
                           "bitsandbytes 4-bit weights on the meta device: 'Cannot copy out of meta tensor; no data!'",
    **{(fp8, mode): "diffusers' group offloading of torchao float8 weights fails: 'Attempted to set the storage of a "
                    "tensor on device cuda:0 to a storage on different device cpu'"
       for fp8 in FP8_GRANULARITY for mode in ("group_leaf", "group_block")},
    **{(fp8, "model"): "moving torchao float8 weights between devices fails: accelerate's offload hook calls "
                       "module.to('cuda') before the forward, and torchao's Float8Tensor.to ends in torch's "
                       "return_and_correct_aliasing with 'Attempted to set the storage of a tensor on device cuda:0 to "
                       "a storage on different device cpu'"
       for fp8 in FP8_GRANULARITY},
}


def check_offload_supported(precision: str, offload: str) -> None:
    """Raise Unsupported for an offload mode known to fail with weights quantized in ``precision``, saying why."""
    if (reason := OFFLOAD_LIMITS.get((precision, offload))) is not None:
        raise Unsupported(f"offload: {offload} with {precision} weights: {reason}")


def quantizes_on_the_gpu(precision: str) -> bool:
    """Whether ``precision`` is loaded with ``device_map`` on the GPU (torchao) rather than the library's default."""
    return precision in FP8_GRANULARITY


def load_device_map(precision: str, device: torch.device | None) -> dict[str, torch.device] | None:
    """The ``device_map`` ``from_pretrained`` gets for a component of ``precision`` that ends up on ``device``.

    torchao: the CUDA device itself, so that each layer is quantized there; None elsewhere, which leaves the
    library's default (bitsandbytes: the current GPU; bf16 and torchao on the CPU: the CPU).
    """
    if quantizes_on_the_gpu(precision) and device is not None and device.type == "cuda":
        return {"": device}
    return None


def component_precisions(case: Case) -> dict[str, str]:
    """The precision of each quantizable component of ``case``."""
    return {"transformer": case.precision, "text_encoder": case.text_encoder_precision}


def quantization_config(library: str, precision: str) -> Any:
    """The ``library``'s (``"diffusers"`` or ``"transformers"``) quantization config for ``precision``."""
    if library == "diffusers":
        from diffusers import BitsAndBytesConfig, TorchAoConfig
    else:
        from transformers import BitsAndBytesConfig, TorchAoConfig
    if precision == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPE)
    import torchao.quantization as tq

    granularity = getattr(tq, FP8_GRANULARITY[precision])()
    return TorchAoConfig(tq.Float8DynamicActivationFloat8WeightConfig(granularity=granularity))


def pipeline_quantization_config(case: Case) -> Any:
    """The ``quantization_config`` for ``Flux2Pipeline.from_pretrained``, or None when every component is bf16.

    A ``quant_mapping`` (one config per component, each of its own library) covers mixed backends such as an nf4
    transformer with an fp8 text encoder; components it does not name are loaded unquantized.
    """
    from diffusers import PipelineQuantizationConfig

    mapping = {component: quantization_config(COMPONENT_LIBRARY[component], precision)
               for component, precision in component_precisions(case).items() if precision != "bf16"}
    return PipelineQuantizationConfig(quant_mapping=mapping) if mapping else None


def build_quantized(meta_module: torch.nn.Module, component: str, precision: str, device: torch.device | None,
                    seed: int = 0) -> torch.nn.Module:
    """``meta_module`` (built on the meta device) loaded with random weights in ``precision``, then moved to ``device``.

    Replaces ``sources.materialize`` for quantized precisions. The model is loaded where ``from_pretrained`` with
    the same config and ``device_map=load_device_map(precision, device)`` loads it, and then moved to ``device``,
    as ``sources.load_pipeline`` moves pretrained components.
    """
    library = COMPONENT_LIBRARY[component]
    config = quantization_config(library, precision)
    pool = _random_pool(seed)
    device_map = load_device_map(precision, device)
    if library == "diffusers":
        module = _load_diffusers(meta_module, config, pool, device_map)
    else:
        module = _load_transformers(meta_module, config, pool, device_map)
    if device is not None:
        module.to(device)
    return module.eval()


def _random_pool(seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(POOL_SIZE, generator=generator, dtype=torch.float32).to(DTYPE)


def _random_value(name: str, shape: torch.Size, index: int, pool: torch.Tensor) -> torch.Tensor:
    """The bf16 values ``sources.materialize`` gives parameter number ``index``, on the CPU (where checkpoints load)."""
    value = torch.empty(shape, dtype=DTYPE)
    std, mean = _init_scale(name, shape)
    _random_fill_(value, std, pool, offset=index * OFFSET_STRIDE)
    if mean:
        value.add_(mean)
    return value


def _load_diffusers(model: torch.nn.Module, config: Any, pool: torch.Tensor,
                    device_map: dict[str, torch.device] | None) -> torch.nn.Module:
    """The quantization steps of ``ModelMixin.from_pretrained`` (diffusers 0.42), with random values for the file."""
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

    chunk, chunk_bytes = {}, 0
    for index, (name, shape) in enumerate(shapes):
        chunk[name] = _random_value(name, shape, index, pool)
        chunk_bytes += chunk[name].nbytes
        if chunk_bytes >= CHUNK_BYTES or index == len(shapes) - 1:
            load_model_dict_into_meta(model, chunk, dtype=dtype, hf_quantizer=hf_quantizer,
                                      keep_in_fp32_modules=keep_in_fp32, device_map=device_map, unexpected_keys=[])
            chunk, chunk_bytes = {}, 0

    if device_map is not None:
        dispatch_model(model, device_map=device_map)
    hf_quantizer.postprocess_model(model)
    model.hf_quantizer = hf_quantizer
    model.register_to_config(_pre_quantization_dtype=dtype)
    return model


class _RandomTensor:
    """A parameter's random values, generated when the loader reads them (``tensor[...]``, like a safetensors slice)."""

    def __init__(self, name: str, shape: torch.Size, index: int, pool: torch.Tensor):
        self.name, self.shape, self.index, self.pool = name, shape, index, pool

    def __getitem__(self, key: Any) -> torch.Tensor:
        return _random_value(self.name, self.shape, self.index, self.pool)[key]


def _load_transformers(meta_module: torch.nn.Module, config: Any, pool: torch.Tensor,
                       device_map: dict[str, torch.device] | None) -> torch.nn.Module:
    """``from_pretrained`` itself, as the pipeline calls it (dtype bf16), on a lazy random state dict."""
    state_dict = {name: _RandomTensor(name, param.shape, index, pool)
                  for index, (name, param) in enumerate(meta_module.named_parameters())}
    return type(meta_module).from_pretrained(None, config=meta_module.config, state_dict=state_dict,
                                             quantization_config=config, dtype=DTYPE, device_map=device_map)


def tensor_storage(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain tensors that store one parameter: the data, plus a bitsandbytes quant state or torchao's inner tensors."""
    quant_state = getattr(tensor, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit: packed uint8 data + absmax, code (and nested state)
        parts = {"data": tensor.data}
        parts.update({f"quant_state.{k}": v for k, v in quant_state.as_dict().items() if isinstance(v, torch.Tensor)})
        return parts
    names = list(getattr(type(tensor), "tensor_data_names", []))  # torchao tensor subclasses (Float8Tensor: qdata, scale)
    names += [n for n in getattr(type(tensor), "optional_tensor_data_names", []) if getattr(tensor, n, None) is not None]
    if names:
        return {name: getattr(tensor, name) for name in names}
    return {"data": tensor.data}


def describe_quantization(module: torch.nn.Module) -> dict[str, Any]:
    """What a component really holds: its quantization config, quantized layer and tensor types, and storage bytes."""
    layers: Counter[str] = Counter()
    tensors: Counter[str] = Counter()
    bytes_by_dtype: Counter[str] = Counter()
    for name, param in module.named_parameters():
        kind = "Tensor" if type(param) is torch.nn.Parameter else type(param).__name__
        tensors[kind] += 1
        if kind != "Tensor":
            layers[type(module.get_submodule(name.rpartition(".")[0])).__name__] += 1
        for part in tensor_storage(param).values():
            bytes_by_dtype[str(part.dtype).removeprefix("torch.")] += part.numel() * part.element_size()
    config = getattr(getattr(module, "config", None), "quantization_config", None)
    return {
        "quantization_config": None if config is None else (config if isinstance(config, dict) else config.to_dict()),
        "quantized_layers": dict(layers),
        "parameter_types": dict(tensors),
        "parameter_bytes": sum(bytes_by_dtype.values()),
        "parameter_bytes_by_dtype": dict(bytes_by_dtype),
    }
