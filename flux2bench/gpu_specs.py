"""Dense tensor-core peaks of the cards a buyer compares, in TFLOP/s, from the vendor's datasheets.

Vendors print data-centre peaks "with sparsity" (2:4 structured sparsity, which no FLUX.2 kernel uses): the dense
figure is half of it. GeForce cards run bf16 and fp8 matrix products at half rate when they accumulate in fp32,
which is what PyTorch's bf16 matmul and ``torch._scaled_mm`` do, so their figures here are the "with FP32
accumulate" rows of NVIDIA's architecture whitepapers. Precisions with no tensor-core format of their own on a card
(fp8 on an A100) have no peak: no fraction of it is given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flux2bench.axes.quantization_backends import ComputeFormat, backend


@dataclass(frozen=True)
class GpuSpec:
    name: str
    pattern: str  # matched against torch.cuda.get_device_name(), case-insensitive
    bf16_tflops: float
    fp8_tflops: float | None
    source: str

    def peak(self, format_: ComputeFormat) -> float | None:
        return {"bf16": self.bf16_tflops, "fp8": self.fp8_tflops}[format_]


_H100 = "https://www.nvidia.com/en-us/data-center/h100/"
_H200 = "https://www.nvidia.com/en-us/data-center/h200/"
_ADA = "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf"

# Ordered: the first pattern that matches names the card (H100 PCIe before the plain H100 of the SXM boards).
GPU_SPECS: tuple[GpuSpec, ...] = (
    GpuSpec("H100 PCIe", r"H100.*PCIe", 756.5, 1513.0, _H100 + " (H100 PCIe: BF16 1,513*, FP8 3,026* with sparsity)"),
    GpuSpec("H100 NVL", r"H100 NVL", 835.5, 1670.5, _H100 + " (H100 NVL: BF16 1,671*, FP8 3,341* with sparsity)"),
    GpuSpec("H100 SXM", r"H100", 989.5, 1979.0, _H100 + " (H100 SXM: BF16 1,979*, FP8 3,958* with sparsity)"),
    GpuSpec("H200 NVL", r"H200 NVL", 835.5, 1670.5, _H200 + " (H200 NVL: BF16 1,671*, FP8 3,341* with sparsity)"),
    GpuSpec("H200 SXM", r"H200", 989.5, 1979.0, _H200 + " (H200 SXM: BF16 1,979*, FP8 3,958* with sparsity)"),
    GpuSpec("B200", r"B200", 2250.0, 4500.0, "https://www.nvidia.com/en-us/data-center/hgx/ (HGX B200, 8 GPUs: "
            "FP16/BF16 36 PFLOPS*, FP8 72 PFLOPS* with sparsity)"),
    GpuSpec("L40S", r"L40S", 362.05, 733.0, "https://www.nvidia.com/en-us/data-center/l40s/ (BF16 362.05 | 733*, "
            "FP8 733 | 1,466* TFLOPS)"),
    GpuSpec("A100 80GB", r"A100", 312.0, None, "https://www.nvidia.com/en-us/data-center/a100/ (BF16 312 | 624* "
            "TFLOPS; no FP8 tensor cores)"),
    GpuSpec("RTX 4090", r"RTX 4090", 165.2, 330.3, _ADA + " (appendix: GeForce RTX 4090, peak BF16 and FP8 tensor "
            "TFLOPS with FP32 accumulate, dense)"),
    GpuSpec("RTX 5090", r"RTX 5090", 209.5, 419.0,
            "https://images.nvidia.com/aem-dam/Solutions/geforce/blackwell/nvidia-rtx-blackwell-gpu-architecture.pdf"
            " (appendix: GeForce RTX 5090, peak FP16/BF16 and FP8 tensor TFLOPS with FP32 accumulate, dense)"),
    GpuSpec("RTX 6000 Ada", r"RTX 6000 Ada", 364.2, 728.5, _ADA + " (appendix: RTX 6000 Ada Generation, peak BF16 "
            "and FP8 tensor TFLOPS with FP32 accumulate, dense)"),
)


def find_gpu(device_name: str | None) -> GpuSpec | None:
    """The spec of a card from its CUDA device name (e.g. "NVIDIA H100 80GB HBM3"); None for a card not listed."""
    if not device_name:
        return None
    return next((spec for spec in GPU_SPECS if re.search(spec.pattern, device_name, re.IGNORECASE)), None)


def dense_peak(device_name: str | None, precision: str) -> tuple[float | None, str]:
    """The card's dense peak TFLOP/s for the format ``precision`` multiplies in, and its source, or None and why."""
    spec = find_gpu(device_name)
    if spec is None:
        return None, f"no dense peak listed for {device_name or 'this device'} (flux2bench.gpu_specs)"
    quantized = backend(precision)  # the format it multiplies in is the backend table's
    format_ = quantized.compute_format if quantized is not None else "bf16"
    peak = spec.peak(format_)
    if peak is None:
        return None, f"the {spec.name} has no {format_} tensor cores"
    return peak, spec.source
