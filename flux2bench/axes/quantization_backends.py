"""The quantization backends, one table entry each: everything the harness knows about a quantized precision.

An entry holds its config builder (the same call for diffusers' and transformers' config classes), where it
quantizes (on its GPU through ``device_map``, or where the library puts it by default), whether its weights can be
saved pre-quantized and in how many bytes per weight, the offload modes it cannot follow with the upstream reason,
its support check, and the libraries whose versions identify it. The precision axis, the checkpoint axis, the
model sources and the environment tracker read this table; adding a backend is one entry here plus its tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

from flux2bench.axes.offload import OffloadMode
from flux2bench.errors import MachineLacks, Unsupported

if TYPE_CHECKING:
    import torch

UNQUANTIZED = "bf16"
ComputeFormat = Literal["bf16", "fp8"]
Library = Literal["diffusers", "transformers"]
# The library each quantizable component belongs to (the VAE is never quantized).
COMPONENT_LIBRARY: dict[str, Library] = {"transformer": "diffusers", "text_encoder": "transformers"}
FP8_MIN_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class PreQuantized:
    """How a backend's weights are saved quantized (``save_pretrained``) for ``weights: checkpoint``."""

    bytes_per_weight: float  # on disk, quantization state and unquantized layers included
    quantize_on: str  # the device the saving worker quantizes on


@dataclass(frozen=True)
class Backend:
    """One quantized precision, as the scenario names it."""

    precision: str
    description: str
    # The config for ``from_pretrained``, built from the diffusers or the transformers module (both have
    # ``BitsAndBytesConfig`` and ``TorchAoConfig`` with the same fields).
    config: Callable[[ModuleType], Any]
    check: Callable[[Backend, torch.device], None]  # raises Unsupported, saying why, where it cannot run
    libraries: tuple[str, ...]  # the packages whose versions identify it
    # Loaded with ``device_map={"": gpu}`` so each layer is quantized on the GPU it runs on (torchao, as diffusers'
    # torchao guide loads it); otherwise the library's default (bitsandbytes: the current GPU).
    quantizes_on_device: bool
    saved: PreQuantized | None  # None: saved in bf16 and quantized at load
    offload_limits: Mapping[OffloadMode, str] = field(default_factory=dict)
    # The tensor-core format its matrix products run in (the card's dense peak of it is what flux2bench.gpu_specs
    # compares against): NF4 and int8 weight-only dequantize to bf16 and multiply bf16 activations; torchao's float8
    # dynamic-activation configs multiply in fp8 (torch._scaled_mm).
    compute_format: ComputeFormat = "bf16"

    def library_config(self, library: Library) -> Any:
        """The quantization config of ``library`` (``"diffusers"`` or ``"transformers"``)."""
        if library == "diffusers":
            import diffusers

            return self.config(diffusers)
        import transformers

        return self.config(transformers)


# --- support checks ----------------------------------------------------------------------------------------

def _needs_package(backend: Backend, package: str) -> ModuleType:
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise MachineLacks(f"{backend.precision} needs the {package} package (pip install 'flux2bench[quant]'): "
                          f"{exc}") from None


def _check_bitsandbytes_4bit(backend: Backend, device: torch.device) -> None:
    bnb = _needs_package(backend, "bitsandbytes")
    if device.type != "cuda":
        # bitsandbytes >= 0.48 has a CPU backend, and transformers loads 4-bit on the CPU, but diffusers'
        # BnB4BitDiffusersQuantizer.validate_environment raises "No GPU found. A GPU is needed for quantization."
        # unless CUDA, XPU or MPS is available, so the FLUX.2 transformer cannot be loaded in nf4 here.
        raise MachineLacks(f"{backend.precision} on device {device}: diffusers loads bitsandbytes 4-bit models only on "
                          f"a GPU (bitsandbytes {bnb.__version__}; this harness runs nf4 on CUDA)")
    import torch

    try:
        bnb.functional.quantize_4bit(torch.ones(64, device=device, dtype=torch.bfloat16), quant_type="nf4")
    except Exception as exc:  # a bitsandbytes build without kernels for this GPU or CUDA version
        raise Unsupported(f"{backend.precision}: bitsandbytes {bnb.__version__} cannot quantize on {device} "
                          f"({torch.cuda.get_device_name(device)}): {type(exc).__name__}: {exc}") from None


def _check_torchao_float8(backend: Backend, device: torch.device) -> None:
    needed = ".".join(map(str, FP8_MIN_CAPABILITY))
    what = f"{backend.precision} ({backend.description})"
    if device.type != "cuda":
        raise MachineLacks(f"{what} needs a CUDA GPU of compute capability {needed} or newer; device {device} "
                          f"is not a CUDA GPU and has no compute capability")
    import torch

    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise MachineLacks(f"{what} needs compute capability {needed} or newer; device {device} "
                          f"({torch.cuda.get_device_name(device)}) has {capability[0]}.{capability[1]}")
    _needs_package(backend, "torchao")


def _check_torchao(backend: Backend, device: torch.device) -> None:
    """torchao's int8 weight-only tensors run wherever torch's int8 matmul does (CPU and CUDA alike)."""
    _needs_package(backend, "torchao")


# --- config builders ---------------------------------------------------------------------------------------

def _nf4(library: ModuleType) -> Any:
    import torch

    return library.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16)


def _float8(granularity: str) -> Callable[[ModuleType], Any]:
    def build(library: ModuleType) -> Any:
        import torchao.quantization as tq

        config = tq.Float8DynamicActivationFloat8WeightConfig(granularity=getattr(tq, granularity)())
        return library.TorchAoConfig(config)
    return build


def _int8_weight_only(library: ModuleType) -> Any:
    from torchao.quantization import Int8WeightOnlyConfig

    return library.TorchAoConfig(Int8WeightOnlyConfig())


# --- the table ---------------------------------------------------------------------------------------------

# Offload modes that fail with a quantized component, the same with weights from from_pretrained and synthetic
# ones (seen on an H200: torch 2.11, diffusers 0.42.1, transformers 5.17, bitsandbytes 0.50.2, torchao 0.18;
# evidence in reports/probes-h200-20261126 and reports/h100-20261126-111007/NOTES.md).
_GROUP_OFFLOAD_NF4 = (
    "diffusers' group offloading moves each parameter's .data to the GPU but not a bitsandbytes Params4bit's "
    "quant_state, so the 4-bit kernel gets the weight on cuda with absmax and code still on the CPU and fails with "
    "'CUDA illegal memory access'")
_NF4_LIMITS: dict[OffloadMode, str] = {
    "group_leaf": _GROUP_OFFLOAD_NF4,
    "group_block": _GROUP_OFFLOAD_NF4,
    "sequential": "accelerate's cpu_offload (what enable_sequential_cpu_offload applies) leaves the bitsandbytes "
                  "4-bit weights on the meta device: 'Cannot copy out of meta tensor; no data!'",
}
_GROUP_OFFLOAD_FP8 = ("diffusers' group offloading of torchao float8 weights fails: 'Attempted to set the storage of "
                      "a tensor on device cuda:0 to a storage on different device cpu'")
_FP8_LIMITS: dict[OffloadMode, str] = {
    "group_leaf": _GROUP_OFFLOAD_FP8,
    "group_block": _GROUP_OFFLOAD_FP8,
    "model": "moving torchao float8 weights between devices fails: accelerate's offload hook calls module.to('cuda') "
             "before the forward, and torchao's Float8Tensor.to ends in torch's return_and_correct_aliasing with "
             "'Attempted to set the storage of a tensor on device cuda:0 to a storage on different device cpu'",
}

_FLOAT8 = "torchao float8 dynamic activation + weight"
BACKENDS: dict[str, Backend] = {backend.precision: backend for backend in (
    Backend("nf4", "bitsandbytes 4-bit NF4, bf16 compute", _nf4, _check_bitsandbytes_4bit, ("bitsandbytes",),
            quantizes_on_device=False,
            # half a byte of 4-bit data plus the quantization state and unquantized layers; bitsandbytes quantizes
            # on a GPU
            saved=PreQuantized(bytes_per_weight=0.6, quantize_on="cuda"), offload_limits=_NF4_LIMITS),
    Backend("fp8", f"{_FLOAT8}, PerTensor", _float8("PerTensor"), _check_torchao_float8, ("torchao",),
            quantizes_on_device=True, saved=None, offload_limits=_FP8_LIMITS, compute_format="fp8"),
    Backend("fp8_row", f"{_FLOAT8}, PerRow", _float8("PerRow"), _check_torchao_float8, ("torchao",),
            quantizes_on_device=True, saved=None, offload_limits=_FP8_LIMITS, compute_format="fp8"),
    # No offload limits known: int8 has not been probed with offloading yet (scripts/probe_offload.py can).
    Backend("int8", "torchao int8 weight-only, per-row scales", _int8_weight_only, _check_torchao, ("torchao",),
            quantizes_on_device=True, saved=None),
)}
PRECISIONS = (UNQUANTIZED, *BACKENDS)


def backend(precision: str) -> Backend | None:
    """The backend of ``precision``, None for bf16; an unknown precision is an error."""
    if precision == UNQUANTIZED:
        return None
    if precision not in BACKENDS:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    return BACKENDS[precision]


def libraries() -> tuple[str, ...]:
    """The packages whose versions identify the backends, each once, in table order."""
    return tuple(dict.fromkeys(name for entry in BACKENDS.values() for name in entry.libraries))
