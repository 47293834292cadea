"""GPU energy per image from NVML's total-energy counter (millijoules since the driver loaded, Volta and newer),
read right after the device is synchronised at the start and end of each timed image."""

from __future__ import annotations

from flux2bench.results import Energy
from flux2bench.trackers.memory import nvml_device

METHOD = ("nvmlDeviceGetTotalEnergyConsumption difference over each timed image, read after "
          "torch.cuda.synchronize; the whole board's energy, idle draw included")


class EnergyMeter:
    """Reads one GPU's energy counter in joules; ``unavailable`` says why when it cannot (no GPU, old GPU)."""

    def __init__(self, device_index: int | None):
        self.handle = None
        self.unavailable: str | None = "no CUDA device in this case"
        if device_index is None:
            return
        try:
            pynvml, handle = nvml_device(device_index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            self.handle, self._pynvml, self.unavailable = handle, pynvml, None
        except Exception as exc:  # no NVML, or a GPU without the counter (before Volta)
            self.unavailable = f"NVML energy counter unavailable: {exc}"

    def joules(self) -> float | None:
        if self.handle is None:
            return None
        return self._pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000

    def record(self) -> Energy:
        return Energy(METHOD if self.unavailable is None else "NVML energy counter", reason=self.unavailable)
