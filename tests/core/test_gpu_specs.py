"""The dense peaks of flux2bench.gpu_specs against the vendors' datasheets, copied here independently of the module:
every listed model's bf16 and fp8 peak, and the model each CUDA device name finds.

Data-centre datasheets print tensor-core peaks "with sparsity" (2:4 structured sparsity, the figures marked *):
the dense peak is half of it, and that is what is written below, as printed and halved. GeForce and workstation
figures are the dense "with FP32 accumulate" rows of NVIDIA's architecture whitepapers, copied as printed.
"""

from __future__ import annotations

import pytest

from flux2bench.gpu_specs import GPU_SPECS, dense_peak, find_gpu

SPARSE = 0.5  # a "with sparsity" figure's dense half

# model -> (bf16 dense TFLOP/s, fp8 dense TFLOP/s or None), each from the datasheet named beside it.
DATASHEET = {
    # NVIDIA H100 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h100/ (table "Technical
    # Specifications"): H100 SXM BF16 1,979 TFLOPS*, FP8 3,958 TFLOPS*; H100 NVL BF16 1,671*, FP8 3,341*; and the
    # earlier edition's H100 PCIe column: BF16 1,513*, FP8 3,026*.
    "H100 SXM": (1979 * SPARSE, 3958 * SPARSE),
    "H100 NVL": (1671 * SPARSE, 3341 * SPARSE),
    "H100 PCIe": (1513 * SPARSE, 3026 * SPARSE),
    # NVIDIA H200 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h200/: H200 SXM BF16 1,979
    # TFLOPS*, FP8 3,958*; H200 NVL BF16 1,671*, FP8 3,341*.
    "H200 SXM": (1979 * SPARSE, 3958 * SPARSE),
    "H200 NVL": (1671 * SPARSE, 3341 * SPARSE),
    # NVIDIA HGX B200 (8 GPUs), https://www.nvidia.com/en-us/data-center/hgx/: FP16/BF16 36 PFLOPS*, FP8 72 PFLOPS*.
    "B200": (36_000 / 8 * SPARSE, 72_000 / 8 * SPARSE),
    # NVIDIA L40S datasheet, https://www.nvidia.com/en-us/data-center/l40s/: BF16 362.05 | 733* TFLOPS, FP8 733 |
    # 1,466* TFLOPS (dense | sparse).
    "L40S": (362.05, 733.0),
    # NVIDIA A100 datasheet, https://www.nvidia.com/en-us/data-center/a100/: BF16 312 | 624* TFLOPS; no FP8.
    "A100 80GB": (312.0, None),
    # NVIDIA Ada GPU architecture whitepaper, appendix: GeForce RTX 4090 peak BF16 tensor TFLOPS with FP32
    # accumulate 165.2 (330.4 sparse), peak FP8 tensor TFLOPS with FP32 accumulate 330.3 (660.6 sparse); RTX 6000
    # Ada Generation 364.2 and 728.5.
    "RTX 4090": (165.2, 330.3),
    "RTX 6000 Ada": (364.2, 728.5),
    # NVIDIA RTX Blackwell GPU architecture whitepaper, appendix: GeForce RTX 5090 peak FP16/BF16 tensor TFLOPS with
    # FP32 accumulate 209.5 (419 sparse), peak FP8 tensor TFLOPS with FP32 accumulate 419 (838 sparse).
    "RTX 5090": (209.5, 419.0),
}

# The name torch.cuda.get_device_name() gives each card, and the model it must find.
CUDA_NAMES = {
    "NVIDIA H100 80GB HBM3": "H100 SXM",
    "NVIDIA H100 PCIe": "H100 PCIe",
    "NVIDIA H100 NVL": "H100 NVL",
    "NVIDIA H200": "H200 SXM",
    "NVIDIA H200 NVL": "H200 NVL",
    "NVIDIA B200": "B200",
    "NVIDIA L40S": "L40S",
    "NVIDIA A100-SXM4-80GB": "A100 80GB",
    "NVIDIA A100 80GB PCIe": "A100 80GB",
    "NVIDIA GeForce RTX 4090": "RTX 4090",
    "NVIDIA GeForce RTX 5090": "RTX 5090",
    "NVIDIA RTX 6000 Ada Generation": "RTX 6000 Ada",
}


def test_every_listed_model_has_a_datasheet_value_here():
    assert sorted(spec.name for spec in GPU_SPECS) == sorted(DATASHEET)


@pytest.mark.parametrize("spec", GPU_SPECS, ids=lambda spec: spec.name)
def test_each_models_dense_peaks_are_its_datasheets(spec):
    bf16, fp8 = DATASHEET[spec.name]
    assert spec.bf16_tflops == pytest.approx(bf16, abs=0.05)
    assert spec.fp8_tflops == (None if fp8 is None else pytest.approx(fp8, abs=0.05))


@pytest.mark.parametrize("device_name,model", CUDA_NAMES.items())
def test_each_cuda_name_gets_its_own_models_peak(device_name, model):
    assert find_gpu(device_name).name == model
    bf16, fp8 = DATASHEET[model]
    assert dense_peak(device_name, "bf16")[0] == pytest.approx(bf16, abs=0.05)
    assert dense_peak(device_name, "fp8_row")[0] == (None if fp8 is None else pytest.approx(fp8, abs=0.05))


def test_every_listed_model_is_found_by_a_cuda_name():
    assert set(CUDA_NAMES.values()) == set(DATASHEET)
