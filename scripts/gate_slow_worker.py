"""The flux2bench worker with every denoising step made slower by a known fraction (``FLUX2BENCH_SLOWDOWN``,
default 0.10): after each step, it sleeps that fraction of the step's own time before the step's clock stops.
Used by scripts/measure_gate.py to measure the regression gate's detection rate on a known slowdown."""

import os
import sys
import time

from flux2bench import worker
from flux2bench.trackers.latency import LatencyTracker

SLOWDOWN = float(os.environ.get("FLUX2BENCH_SLOWDOWN", "0.10"))
_step_callback = LatencyTracker.step_callback


def _slowed_step_callback(self, pipe, step, timestep, callback_kwargs):
    if self._step_start is not None:
        time.sleep(SLOWDOWN * (self.now() - self._step_start))
    return _step_callback(self, pipe, step, timestep, callback_kwargs)


LatencyTracker.step_callback = _slowed_step_callback

if __name__ == "__main__":
    sys.exit(worker.main())
