"""The flux2bench worker with every denoising step made slower by a known fraction (``FLUX2BENCH_SLOWDOWN``,
default 0.10) before the step's clock stops, in one of two ways (``FLUX2BENCH_SLOWDOWN_KIND``):

* ``host``: the host sleeps that fraction of the step's own time (the GPU idles meanwhile);
* ``gpu``: a kernel that spins for that fraction of the step's time is queued on the step's CUDA stream
  (``torch.cuda._sleep``, its cycles per second calibrated once per process), as slower GPU work would be.

Used by scripts/measure_gate.py to measure the regression gate's detection rate on a known slowdown."""

import os
import sys
import time

import torch

from flux2bench import worker
from flux2bench.trackers.latency import LatencyTracker

SLOWDOWN = float(os.environ.get("FLUX2BENCH_SLOWDOWN", "0.10"))
KIND = os.environ.get("FLUX2BENCH_SLOWDOWN_KIND", "host")
CALIBRATION_CYCLES = 50_000_000
_step_callback = LatencyTracker.step_callback
_cycles_per_s: dict[torch.device, float] = {}


def gpu_cycles_per_s(device: torch.device) -> float:
    """How many ``torch.cuda._sleep`` cycles the GPU spins per second (median of three timed spins)."""
    if device not in _cycles_per_s:
        rates = []
        for _ in range(3):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            torch.cuda._sleep(CALIBRATION_CYCLES)
            torch.cuda.synchronize(device)
            rates.append(CALIBRATION_CYCLES / (time.perf_counter() - start))
        _cycles_per_s[device] = sorted(rates)[1]
    return _cycles_per_s[device]


def _slowed_step_callback(self, pipe, step, timestep, callback_kwargs):
    if self._step_start is not None:
        extra_s = SLOWDOWN * (self.now() - self._step_start)
        if KIND == "gpu" and self.device.type == "cuda":
            torch.cuda._sleep(int(extra_s * gpu_cycles_per_s(self.device)))  # the step's clock syncs on it
        else:
            time.sleep(extra_s)
    return _step_callback(self, pipe, step, timestep, callback_kwargs)


LatencyTracker.step_callback = _slowed_step_callback


def main(argv: list[str] | None = None) -> int:
    """The worker's entry, as ``python -m gate_slow_worker`` and the fork server (``module.main(argv)``) call it."""
    if KIND not in ("host", "gpu"):
        sys.exit(f"FLUX2BENCH_SLOWDOWN_KIND={KIND!r}: expected host or gpu")
    return worker.main(argv)


if __name__ == "__main__":
    sys.exit(main())
