"""Host-to-device copy bandwidth, from pageable and from pinned host memory: what transfer-bound setups (offload)
and loading depend on, and part of the host fingerprint the gate matches before it compares host-bound metrics.

Measured in a child process (``python -m flux2bench.trackers.bandwidth``), so that the runner never creates a CUDA
context; it prints one JSON object.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Any

from flux2bench.units import GIB

SIZE_BYTES = 512 * 2**20
REPEATS = 5
METHOD = (f"median of {REPEATS} copies of {SIZE_BYTES // 2**20} MiB to GPU 0 after one untimed copy, "
          "torch.cuda.synchronize around each")


def _copy_gib_s(src: Any) -> float:
    import torch

    dst = torch.empty(src.shape, dtype=src.dtype, device="cuda")
    dst.copy_(src)
    rates = []
    for _ in range(REPEATS):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src, non_blocking=src.is_pinned())
        torch.cuda.synchronize()
        rates.append(src.numel() * src.element_size() / GIB / (time.perf_counter() - start))
    return statistics.median(rates)


def measure() -> dict[str, Any]:
    import torch

    pageable = torch.ones(SIZE_BYTES // 2, dtype=torch.bfloat16)
    return {"pageable_gib_s": _copy_gib_s(pageable), "pinned_gib_s": _copy_gib_s(pageable.pin_memory()),
            "method": METHOD}


def host_to_device(timeout_s: float = 120) -> dict[str, Any]:
    """The bandwidths measured in a child process, or ``{"unavailable": reason}``."""
    try:
        done = subprocess.run([sys.executable, "-m", "flux2bench.trackers.bandwidth"], capture_output=True,
                              text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"unavailable": f"the bandwidth probe took more than {timeout_s:g} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"unavailable": f"the bandwidth probe failed: {last}"}
    return json.loads(done.stdout)


if __name__ == "__main__":
    print(json.dumps(measure()))
