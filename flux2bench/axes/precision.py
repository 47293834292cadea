"""Precision of the transformer and the text encoder: ``bf16``, ``nf4`` (bitsandbytes 4-bit NF4), ``fp8`` and
``fp8_row`` (torchao float8 dynamic activation + weight, e4m3, per tensor or per row). The VAE always stays bf16.

- ``nf4``: ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=bf16)``.
- ``fp8``: ``TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor()))``; ``fp8_row`` the
  same with ``PerRow()``.

The transformer is a diffusers model and gets the diffusers config class; the text encoder is a transformers
model and gets the transformers one. torchao components are loaded with ``device_map`` on the GPU they run on, so
each layer is quantized there, as diffusers' torchao guide loads them; bitsandbytes quantizes on the current GPU.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

import torch

from flux2bench.axes.base import Axis, LoadPlan, Option
from flux2bench.errors import MachineLacks, Unsupported

DTYPE = torch.bfloat16
PRECISIONS = ("bf16", "nf4", "fp8", "fp8_row")
FP8_GRANULARITY = {"fp8": "PerTensor", "fp8_row": "PerRow"}
FP8_MIN_CAPABILITY = (8, 9)
# The library each quantizable component belongs to (the VAE is never quantized).
COMPONENT_LIBRARY = {"transformer": "diffusers", "text_encoder": "transformers"}

# Offload modes that fail with a quantized component, the same with weights from from_pretrained and synthetic
# ones (seen on an H200: torch 2.11, diffusers 0.42.1, transformers 5.17, bitsandbytes 0.50.2, torchao 0.18;
# evidence in reports/probes-h200-20261126 and reports/h100-20261126-111007/NOTES.md).
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


def check_precision_supported(precision: str, device: torch.device) -> None:
    """Raise Unsupported when ``precision`` cannot be loaded or run on ``device``; the message says which and why."""
    if precision == "nf4":
        _check_nf4(device)
    elif precision in FP8_GRANULARITY:
        _check_fp8(precision, device)
    elif precision != "bf16":
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")


def _check_nf4(device: torch.device) -> None:
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise MachineLacks(f"nf4 needs the bitsandbytes package (pip install 'flux2bench[quant]'): {exc}") from None
    if device.type != "cuda":
        # bitsandbytes >= 0.48 has a CPU backend, and transformers loads 4-bit on the CPU, but diffusers'
        # BnB4BitDiffusersQuantizer.validate_environment raises "No GPU found. A GPU is needed for quantization."
        # unless CUDA, XPU or MPS is available, so the FLUX.2 transformer cannot be loaded in nf4 here.
        raise MachineLacks(f"nf4 on device {device}: diffusers loads bitsandbytes 4-bit models only on a GPU "
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
        raise MachineLacks(f"{what} needs a CUDA GPU of compute capability {needed} or newer; device {device} "
                          f"is not a CUDA GPU and has no compute capability")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise MachineLacks(f"{what} needs compute capability {needed} or newer; device {device} "
                          f"({torch.cuda.get_device_name(device)}) has {capability[0]}.{capability[1]}")
    try:
        import torchao  # noqa: F401
    except ImportError as exc:
        raise MachineLacks(f"{precision} needs the torchao package (pip install 'flux2bench[quant]'): {exc}") from None


def check_offload_supported(precision: str, offload: str) -> None:
    """Raise Unsupported for an offload mode known to fail with weights quantized in ``precision``, saying why."""
    if (reason := OFFLOAD_LIMITS.get((precision, offload))) is not None:
        raise Unsupported(f"offload: {offload} with {precision} weights: {reason}")


def quantizes_on_the_gpu(precision: str) -> bool:
    """Whether ``precision`` is loaded with ``device_map`` on the GPU (torchao) rather than the library's default."""
    return precision in FP8_GRANULARITY


def load_device_map(precision: str, device: torch.device | None) -> dict[str, torch.device] | None:
    """The ``device_map`` ``from_pretrained`` gets for a component of ``precision`` that ends up on ``device``:
    ``{"": device}`` for torchao precisions on a GPU, so each layer is quantized there; None elsewhere, which leaves
    the library's default (bitsandbytes: the current GPU; bf16 and torchao on the CPU: the CPU)."""
    if quantizes_on_the_gpu(precision) and device is not None and device.type == "cuda":
        return {"": device}
    return None


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


def pipeline_quantization_config(precisions: dict[str, str]) -> Any:
    """The ``quantization_config`` for ``from_pretrained`` of a pipeline, or None when every component is bf16.

    A ``quant_mapping`` (one config per component, each of its own library) covers mixed backends such as an nf4
    transformer with an fp8 text encoder; components it does not name are loaded unquantized.
    """
    from diffusers import PipelineQuantizationConfig

    mapping = {component: quantization_config(COMPONENT_LIBRARY[component], precision)
               for component, precision in precisions.items() if precision != "bf16" and component in COMPONENT_LIBRARY}
    return PipelineQuantizationConfig(quant_mapping=mapping) if mapping else None


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


class PrecisionAxis(Axis):
    name = "precision"
    setup_key = "quantization"
    options = (
        Option("precision", Literal[PRECISIONS], "bf16", description="the transformer's precision"),
        Option("text_encoder_precision", Literal[PRECISIONS] | None, None,
               description="the text encoder's precision (default: the transformer's)"),
    )
    baseline = {"precision": "bf16", "text_encoder_precision": "bf16"}

    def normalise(self, values: dict[str, Any]) -> None:
        values["text_encoder_precision"] = values["text_encoder_precision"] or values["precision"]

    def label(self, case):
        precision, text = case.settings["precision"], case.settings["text_encoder_precision"]
        return [precision], ([f"te={text}"] if text != precision else [])

    def plan_load(self, case, plan: LoadPlan) -> None:
        plan.precisions |= {"transformer": case.settings["precision"],
                            "text_encoder": case.settings["text_encoder_precision"]}
        if plan.device.type == "cuda":  # quantized on the GPU; the offload mode then moves it
            plan.quantized_on_device = {name for name, p in plan.precisions.items() if quantizes_on_the_gpu(p)}

    def check(self, case, plan: LoadPlan) -> None:
        for precision in sorted(plan.held_precisions()):
            check_precision_supported(precision, plan.device)
            check_offload_supported(precision, case.settings["offload"])

    def apply(self, pipe, case, plan: LoadPlan) -> dict[str, Any]:
        return {name: describe_quantization(getattr(pipe, name)) for name in plan.components
                if getattr(pipe, name, None) is not None}


AXIS = PrecisionAxis()
