"""Precision of the transformer and the text encoder: ``bf16`` or one of the quantization backends of
``flux2bench.axes.quantization_backends`` (``nf4``, ``fp8``, ``fp8_row``, ``int8``). The VAE always stays bf16.

The transformer is a diffusers model and gets the diffusers config class; the text encoder is a transformers
model and gets the transformers one. Backends that quantize on the device (torchao) are loaded with ``device_map``
on the GPU they run on, so each layer is quantized there, as diffusers' torchao guide loads them; bitsandbytes
quantizes on the current GPU.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from flux2bench.axes import offload
from flux2bench.axes.base import Axis, ChoosesDriftBaseline, LoadPlan, LoadsPipeline, Settings
from flux2bench.axes.quantization_backends import COMPONENT_LIBRARY, PRECISIONS, UNQUANTIZED, Library, backend
from flux2bench.errors import Unsupported

if TYPE_CHECKING:
    import torch

    from flux2bench.case import Case


def check_precision_supported(precision: str, device: torch.device) -> None:
    """Raise Unsupported when ``precision`` cannot be loaded or run on ``device``; the message says which and why."""
    if (entry := backend(precision)) is not None:
        entry.check(entry, device)


def check_offload_supported(precision: str, mode: offload.OffloadMode) -> None:
    """Raise Unsupported for an offload mode known to fail with weights quantized in ``precision``, saying why."""
    entry = backend(precision)
    if entry is not None and (reason := entry.offload_limits.get(mode)) is not None:
        raise Unsupported(f"offload: {mode} with {precision} weights: {reason}")


def quantizes_on_the_gpu(precision: str) -> bool:
    """Whether ``precision`` is loaded with ``device_map`` on the GPU rather than the library's default."""
    entry = backend(precision)
    return entry is not None and entry.quantizes_on_device


def load_device_map(precision: str, device: torch.device | None) -> dict[str, torch.device] | None:
    """The ``device_map`` ``from_pretrained`` gets for a component of ``precision`` that ends up on ``device``:
    ``{"": device}`` for torchao precisions on a GPU, so each layer is quantized there; None elsewhere, which leaves
    the library's default (bitsandbytes: the current GPU; bf16 and torchao on the CPU: the CPU)."""
    if quantizes_on_the_gpu(precision) and device is not None and device.type == "cuda":
        return {"": device}
    return None


def quantization_config(library: Library, precision: str) -> Any:
    """The ``library``'s (``"diffusers"`` or ``"transformers"``) quantization config for ``precision``."""
    entry = backend(precision)
    if entry is None:
        raise ValueError(f"{precision} is not quantized and has no quantization config")
    return entry.library_config(library)


def pipeline_quantization_config(precisions: dict[str, str]) -> Any:
    """The ``quantization_config`` for ``from_pretrained`` of a pipeline, or None when every component is bf16.

    A ``quant_mapping`` (one config per component, each of its own library) covers mixed backends such as an nf4
    transformer with an fp8 text encoder; components it does not name are loaded unquantized.
    """
    from diffusers import PipelineQuantizationConfig

    mapping = {component: quantization_config(COMPONENT_LIBRARY[component], precision)
               for component, precision in precisions.items()
               if precision != UNQUANTIZED and component in COMPONENT_LIBRARY}
    return PipelineQuantizationConfig(quant_mapping=mapping) if mapping else None


def tensor_storage(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain tensors that store one parameter: the data, plus a bitsandbytes quant state or torchao's inner tensors."""
    import torch

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
    import torch

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


Precision = Literal[PRECISIONS]  # type: ignore[valid-type]  # the backend table's names


class PrecisionSettings(Settings):
    precision: Precision = Field("bf16", description="the transformer's precision")
    text_encoder_precision: Precision | None = Field(
        None, description="the text encoder's precision (default: the transformer's)")


class PrecisionAxis(Axis[PrecisionSettings], LoadsPipeline, ChoosesDriftBaseline):
    name = "precision"
    setup_key = "quantization"
    settings_model = PrecisionSettings
    drift_baseline_values = {"precision": "bf16", "text_encoder_precision": "bf16"}

    def normalise(self, values: dict[str, Any]) -> None:
        values["text_encoder_precision"] = values["text_encoder_precision"] or values["precision"]

    def held(self, case: Case) -> dict[str, str]:
        """The precision of each quantizable component (the text encoder's defaults to the transformer's)."""
        settings = self.of(case)
        precision: str = settings.precision
        text_encoder: str = settings.text_encoder_precision or precision
        return {"transformer": precision, "text_encoder": text_encoder}

    def label(self, case: Case) -> tuple[list[str], list[str]]:
        settings = self.of(case)
        precision, text = settings.precision, settings.text_encoder_precision
        return [precision], ([f"te={text}"] if text != precision else [])

    def plan_load(self, case: Case, plan: LoadPlan) -> None:
        plan.precisions |= self.held(case)
        if plan.device.type == "cuda":  # quantized on the GPU; the offload mode then moves it
            plan.quantized_on_device = {name for name, p in plan.precisions.items() if quantizes_on_the_gpu(p)}

    def check(self, case: Case, plan: LoadPlan) -> None:
        for precision in sorted(plan.held_precisions()):
            check_precision_supported(precision, plan.device)
            check_offload_supported(precision, offload.AXIS.mode(case))

    def apply(self, pipe: Any, case: Case, plan: LoadPlan) -> dict[str, Any]:
        return {name: describe_quantization(getattr(pipe, name)) for name in plan.components
                if getattr(pipe, name, None) is not None}


AXIS = PrecisionAxis()
