"""GPU and host memory measurement.

Three sources, each recorded with its method:
- the PyTorch CUDA allocator's peak allocated and reserved bytes (reset at the start of a phase);
- NVML's device-level used memory, sampled by a background thread at ``SAMPLE_HZ`` and taken
  relative to the idle baseline read before the worker created its CUDA context; it sees what the
  allocator does not (CUDA context, cuBLAS workspaces, bitsandbytes buffers);
- the worker's resident set from the kernel: the peak (VmHWM, reset per phase through
  ``/proc/self/clear_refs``) and anonymous vs file-backed pages (sampled), plus pinned host memory
  held by PyTorch's caching host allocator.

``MemorySampler`` runs for the whole worker and writes the timeline; ``MemoryTracker`` is the
per-phase context manager that turns counters and samples into a ``PhaseMemory``.
"""

from __future__ import annotations

import csv
import gzip
import os
import shutil
import threading
import time
from pathlib import Path
from typing import IO, Any

import torch

from flux2bench.results import Metric, PhaseMemory
from flux2bench.safe_files import replacing
from flux2bench.units import GIB

SAMPLE_HZ = 100
_PROC_STATUS = Path("/proc/self/status")
_PROC_STAT = Path("/proc/self/stat")
_PROC_IO = Path("/proc/self/io")
_CLEAR_REFS = Path("/proc/self/clear_refs")

NVML_METHOD = f"NVML device memory used, sampled at {SAMPLE_HZ} Hz, minus the idle baseline before the worker's CUDA context"
RSS_METHOD = "kernel VmHWM of the worker (peak resident set), reset at the phase start via /proc/self/clear_refs"


def read_proc_status() -> dict[str, float]:
    """Resident-set fields of this process in GiB (Linux), empty elsewhere."""
    try:
        text = _PROC_STATUS.read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[name] = int(rest.split()[0]) * 1024 / GIB
    return fields


def read_io_counters() -> dict[str, float]:
    """Major page faults (``/proc/self/stat``) and bytes read from storage (``/proc/self/io``) so far."""
    counters = {}
    try:  # field 12 is majflt; the command name (field 2) may hold spaces, so count from its closing parenthesis
        counters["major_faults"] = float(_PROC_STAT.read_text().rpartition(")")[2].split()[9])
    except (OSError, IndexError, ValueError):
        pass
    try:
        for line in _PROC_IO.read_text().splitlines():
            name, _, value = line.partition(":")
            if name == "read_bytes":
                counters["disk_read_gib"] = int(value) / GIB
    except (OSError, ValueError):
        pass
    return counters


def reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def nvml_device(device_index: int) -> tuple[Any, Any]:
    """(pynvml, the NVML handle of CUDA device ``device_index``). NVML numbers devices physically, so the index is
    mapped through CUDA_VISIBLE_DEVICES (when it lists indices)."""
    import pynvml

    pynvml.nvmlInit()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    physical = int(visible[device_index]) if visible[0].strip().isdigit() else device_index
    return pynvml, pynvml.nvmlDeviceGetHandleByIndex(physical)


class _Nvml:
    """The device-level view of one GPU, or None-valued when NVML is not there."""

    def __init__(self, device_index: int | None):
        self.handle = None
        self.unavailable = "no CUDA device in this case"
        if device_index is None:
            return
        try:
            self._pynvml, self.handle = nvml_device(device_index)
        except Exception as exc:
            self.unavailable = f"NVML unavailable: {exc}"

    def used_gib(self) -> float | None:
        if self.handle is None:
            return None
        return self._pynvml.nvmlDeviceGetMemoryInfo(self.handle).used / GIB


class MemorySampler:
    """Background sampler of device memory (NVML) and the worker's RSS, with a CSV timeline.

    Create it before the worker touches CUDA so the idle baseline excludes its own context.
    """

    COLUMNS = ("t_s", "phase", "gpu_used_gib", "rss_gib", "anon_gib", "file_gib", "shared_gib")

    def __init__(self, device_index: int | None, timeline: IO[str] | None = None):
        self._nvml = _Nvml(device_index)
        self.idle_baseline_gib = self._nvml.used_gib()
        self._timeline = timeline
        self._phase = "start"
        self._peaks: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._t0 = time.perf_counter()
        if timeline is not None:
            timeline.write(",".join(self.COLUMNS) + "\n")

    @property
    def gpu_unavailable(self) -> str | None:
        return None if self._nvml.handle is not None else self._nvml.unavailable

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        if self._timeline is not None:
            self._timeline.flush()

    def open_window(self, name: str) -> None:
        """Start tracking the maxima of every sampled quantity under ``name``; also names the timeline phase."""
        with self._lock:
            self._phase = name
            self._peaks[name] = {}
        self.sample()

    def close_window(self, name: str) -> dict[str, float]:
        self.sample()
        with self._lock:
            return self._peaks.pop(name, {})

    def sample(self) -> None:
        gpu = self._nvml.used_gib()
        status = read_proc_status()
        values = {"rss_gib": status.get("VmRSS"), "anon_gib": status.get("RssAnon"), "file_gib": status.get("RssFile"),
                  "shared_gib": status.get("RssShmem")}
        if gpu is not None and self.idle_baseline_gib is not None:
            values["gpu_used_gib"] = gpu - self.idle_baseline_gib
        with self._lock:
            for peaks in self._peaks.values():
                for name, value in values.items():
                    if value is not None:
                        peaks[name] = max(value, peaks.get(name, value))
            if self._timeline is not None:
                row = [f"{time.perf_counter() - self._t0:.3f}", self._phase] + [
                    "" if values.get(c) is None else f"{values[c]:.4f}" for c in self.COLUMNS[2:]]
                self._timeline.write(",".join(row) + "\n")

    def _run(self) -> None:
        period = 1 / SAMPLE_HZ
        last_flush = time.perf_counter()
        while not self._stop.wait(period):
            self.sample()
            if self._timeline is not None and time.perf_counter() - last_flush > 1.0:
                # Flushed every second so the parent can read the peak of a worker the kernel killed.
                self._timeline.flush()
                last_flush = time.perf_counter()


def _pinned_peak_gib() -> float | None:
    try:
        stats = torch.cuda.host_memory_stats()
    except Exception:
        return None
    if not stats:  # the pinned allocator has not allocated anything in this process
        return 0.0
    peak = stats.get("allocated_bytes.peak")
    return None if peak is None else peak / GIB


class MemoryTracker:
    """Peak memory over one phase: ``with MemoryTracker(sampler, "inference", device) as mem: ...; mem.result``.

    The result is filled in on exit even when the phase raised (an OOM keeps the peak it reached).
    """

    def __init__(self, sampler: MemorySampler, phase: str, device: torch.device):
        self.sampler = sampler
        self.phase = phase
        self.device = device
        self.result: PhaseMemory | None = None
        self._rss_reset = False
        self._io_before: dict[str, float] = {}

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    def __enter__(self) -> MemoryTracker:
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            if hasattr(torch.cuda, "reset_peak_host_memory_stats"):
                torch.cuda.reset_peak_host_memory_stats()
        self._rss_reset = reset_rss_peak()
        self._io_before = read_io_counters()
        self.sampler.open_window(self.phase)
        return self

    def __exit__(self, *exc) -> None:
        if self._cuda:
            try:
                torch.cuda.synchronize(self.device)
            except Exception:  # a failed kernel (e.g. after OOM) must not hide the peaks already counted
                pass
        sampled = self.sampler.close_window(self.phase)
        self.result = PhaseMemory(
            gpu_allocated_peak_gib=self._allocator("max_memory_allocated"),
            gpu_reserved_peak_gib=self._allocator("max_memory_reserved"),
            gpu_device_peak_gib=self._device_peak(sampled),
            host_rss_peak_gib=self._rss_peak(sampled),
            host_anon_peak_gib=self._sampled(sampled, "anon_gib", "RssAnon"),
            host_file_peak_gib=self._sampled(sampled, "file_gib", "RssFile"),
            host_pinned_peak_gib=self._pinned(),
            host_shared_peak_gib=self._sampled(sampled, "shared_gib", "RssShmem (pinned cudaHostAlloc memory is here)"),
            **self._io_deltas(),
        )

    def _io_deltas(self) -> dict[str, Metric]:
        """What the phase made the kernel read: major page faults (weights paged in from a file) and bytes from
        storage (a page-cache hit reads none)."""
        after = read_io_counters()
        methods = {"major_faults": "majflt of /proc/self/stat over the phase",
                   "disk_read_gib": "read_bytes of /proc/self/io over the phase (storage reads, not page-cache hits)"}
        return {name: Metric(after[name] - self._io_before[name], method)
                if name in after and name in self._io_before else Metric.missing(method, "not readable on this OS")
                for name, method in methods.items()}

    def _allocator(self, counter: str) -> Metric:
        method = f"torch.cuda.{counter}, reset at the phase start"
        if not self._cuda:
            return Metric.missing(method, f"no CUDA device in this case (device {self.device})")
        return Metric(getattr(torch.cuda, counter)(self.device) / GIB, method)

    def _device_peak(self, sampled: dict[str, float]) -> Metric:
        if self.sampler.gpu_unavailable:
            return Metric.missing(NVML_METHOD, self.sampler.gpu_unavailable)
        return Metric(sampled.get("gpu_used_gib"), NVML_METHOD)

    def _rss_peak(self, sampled: dict[str, float]) -> Metric:
        if self._rss_reset and (hwm := read_proc_status().get("VmHWM")) is not None:
            return Metric(hwm, RSS_METHOD)
        method = f"VmRSS sampled at {SAMPLE_HZ} Hz (VmHWM could not be reset here)"
        if "rss_gib" in sampled:
            return Metric(sampled["rss_gib"], method)
        return Metric.missing(method, "/proc/self/status is not available on this OS")

    @staticmethod
    def _sampled(sampled: dict[str, float], name: str, field: str) -> Metric:
        method = f"{field} from /proc/self/status, sampled at {SAMPLE_HZ} Hz"
        if name in sampled:
            return Metric(sampled[name], method)
        return Metric.missing(method, "/proc/self/status has no such field on this OS")

    def _pinned(self) -> Metric:
        method = "torch.cuda.host_memory_stats allocated_bytes peak (PyTorch's pinned host allocator)"
        if not self._cuda:
            return Metric.missing(method, "no CUDA device in this case")
        peak = _pinned_peak_gib()
        if peak is None:
            return Metric.missing(method, f"torch {torch.__version__} does not report pinned host memory")
        return Metric(peak, method)


def peaks_from_timeline(path: Path, reason: str) -> dict[str, PhaseMemory]:
    """Per-phase peaks read back from a timeline, for a worker that died before reporting its own."""
    peaks: dict[str, dict[str, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            phase = peaks.setdefault(row["phase"], {})
            for column in MemorySampler.COLUMNS[2:]:
                if row.get(column):
                    phase[column] = max(float(row[column]), phase.get(column, float("-inf")))
    method = f"maximum of the timeline samples ({SAMPLE_HZ} Hz, flushed every second)"

    def metric(values: dict[str, float], column: str) -> Metric:
        return Metric(values[column], method) if column in values else Metric.missing(method, "no sample")

    missing = Metric.missing("reported by the worker at the end of a phase", reason)
    return {
        phase: PhaseMemory(
            gpu_allocated_peak_gib=missing, gpu_reserved_peak_gib=missing,
            gpu_device_peak_gib=metric(values, "gpu_used_gib"), host_rss_peak_gib=metric(values, "rss_gib"),
            host_anon_peak_gib=metric(values, "anon_gib"), host_file_peak_gib=metric(values, "file_gib"),
            host_shared_peak_gib=metric(values, "shared_gib"), host_pinned_peak_gib=missing, major_faults=missing,
            disk_read_gib=missing,
        )
        for phase, values in peaks.items() if phase in ("load", "inference")
    }


def compress_timeline(run_dir: Path, timeline: str) -> str:
    """Gzip a finished worker's CSV timeline in ``run_dir`` (about a fifth of the size; pandas reads it as is)
    and return the new relative path. Done by the runner once the worker has exited, so a killed worker's
    timeline is still plain CSV, readable up to its last flush, when the runner reads its peaks."""
    source = run_dir / timeline
    target = source.with_name(source.name + ".gz")
    with open(source, "rb") as raw, replacing(target) as out, gzip.GzipFile(fileobj=out, mode="wb") as packed:
        shutil.copyfileobj(raw, packed)
    source.unlink()
    return str(target.relative_to(run_dir))
