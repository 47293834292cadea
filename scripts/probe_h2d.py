"""Host-to-device copy bandwidth from pageable and pinned memory (explains transfer-bound offload stages)."""

import json
import time

import torch

GIB = 2**30


def bandwidth(src: torch.Tensor, repeats: int = 3) -> float:
    dst = torch.empty(src.shape, dtype=src.dtype, device="cuda")
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src, non_blocking=src.is_pinned())
    torch.cuda.synchronize()
    return repeats * src.numel() * src.element_size() / GIB / (time.perf_counter() - start)


if __name__ == "__main__":
    size = 2 * GIB // 2
    pageable = torch.randn(size, dtype=torch.bfloat16)
    print(json.dumps({
        "gpu": torch.cuda.get_device_name(),
        "h2d_pageable_gib_s": bandwidth(pageable),
        "h2d_pinned_gib_s": bandwidth(pageable.pin_memory()),
        "method": "median-free mean of 3 copies of 2 GiB after one untimed copy, torch.cuda.synchronize around",
    }))
