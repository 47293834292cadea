"""What a run ran on: GPU, driver, CUDA, library versions, CPU, host RAM, harness version and commit.

Captured without creating a CUDA context (NVML and package metadata only), so the runner's parent
process can call it before any worker starts. A value that cannot be read is None, and
``unavailable`` says why.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import psutil

from flux2bench.axes import quantization_backends
from flux2bench.trackers.bandwidth import host_to_device
from flux2bench.units import GIB

# The libraries a pipeline's numbers depend on: the model stack, then each quantization backend's own.
PIPELINE_LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", *quantization_backends.libraries())
LIBRARIES = (*PIPELINE_LIBRARIES, "mistral-common", "kernels", "flash-attn-3", "nvidia-ml-py", "flux2bench")
# Fields that make two runs incomparable when they differ (used by compare).
GPU_IDENTITY = ("gpu_name",)
SOFTWARE_IDENTITY = ("driver", "cuda", *PIPELINE_LIBRARIES)
# Host-bound timings (loading, offload) and host RSS are compared only between runs of one host, identified by what
# does not change between two runs on it; a measured bandwidth varies run to run (4.8-8.2 GiB/s pageable on one H100
# host), so it is a measurement, never identity.
RAM_TOLERANCE = 0.02
STABLE_HOST = (("machine_id", "machine id"), ("cpu", "CPU"), ("cpu_count", "CPU count"))
MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


def _gpu_links(env: dict[str, Any]) -> Any:
    gpus = env.get("gpus") or []
    if not isinstance(gpus, list):  # the GPUs of several Ray nodes that differ, merged into one string
        return gpus
    return [(gpu.get("name"), gpu.get("pcie_max_link")) for gpu in gpus]


def _ram_differs(ram: list[Any]) -> bool:
    if ram[0] == ram[1]:
        return False
    if not all(isinstance(value, (int, float)) and value > 0 for value in ram):  # unrecorded, or merged nodes'
        return True
    return abs(ram[1] / ram[0] - 1) > RAM_TOLERANCE


def _recorded(value: Any) -> str:
    return "not recorded" if value is None else str(value)


def _gib(value: Any) -> str:
    return "not recorded" if value is None else f"{value:.1f}" if isinstance(value, (int, float)) else str(value)


def host_differences(baseline: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """How two runs' hosts differ. A label the user gave both runs (run --host-label) decides alone; otherwise
    what stays the same between runs on one host: machine id, CPU model and count, RAM size, each GPU's model and
    maximum PCIe link. A run of an earlier version lacks some of these: what neither run recorded is not a
    difference, and one run compared with itself never differs."""
    labels = [env.get("host_label") for env in (baseline, current)]
    if None not in labels:
        return [] if labels[0] == labels[1] else [f"host label {labels[0]} vs {labels[1]}"]
    differences = [f"{what} {_recorded(baseline.get(name))} vs {_recorded(current.get(name))}"
                   for name, what in STABLE_HOST if baseline.get(name) != current.get(name)]
    ram = [env.get("host_ram_gib") for env in (baseline, current)]
    if _ram_differs(ram):
        differences.append(f"host RAM {_gib(ram[0])} vs {_gib(ram[1])} GiB")
    if _gpu_links(baseline) != _gpu_links(current):
        differences.append(f"GPUs and PCIe links {_gpu_links(baseline)} vs {_gpu_links(current)}")
    return differences


def _machine_id() -> str | None:
    for path in MACHINE_ID_FILES:
        try:
            return Path(path).read_text().strip() or None
        except OSError:
            continue
    return None


def _pcie_max_link(pynvml: Any, handle: Any) -> str | None:
    try:
        return f"gen{pynvml.nvmlDeviceGetMaxPcieLinkGeneration(handle)} x{pynvml.nvmlDeviceGetMaxPcieLinkWidth(handle)}"
    except pynvml.NVMLError:  # e.g. an SXM board that reports none
        return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def _gpus() -> tuple[list[dict[str, Any]], str | None, str | None]:
    """GPUs as NVML sees them, the driver version, and why NVML gave nothing (if it did not)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no NVIDIA driver on this machine
        return [], None, f"NVML unavailable: {exc}"
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append({
                "index": i,
                "name": pynvml.nvmlDeviceGetName(handle),
                "memory_gib": pynvml.nvmlDeviceGetMemoryInfo(handle).total / GIB,
                "compute_capability": f"{major}.{minor}",
                "pcie_max_link": _pcie_max_link(pynvml, handle),
            })
        return gpus, driver, None
    finally:
        pynvml.nvmlShutdown()


def merge_environments(environments: list[dict[str, Any]]) -> dict[str, Any]:
    """One environment for several (the nodes of a Ray run): each value that all share, else every distinct value
    joined by `` | `` (so that a comparison with a run on other nodes shows the difference)."""
    if len(environments) == 1:
        return environments[0]

    def merge(values: list[Any]) -> Any:
        if all(isinstance(v, dict) for v in values):
            return {k: merge([v.get(k) for v in values]) for k in dict.fromkeys(k for v in values for k in v)}
        distinct = list(dict.fromkeys(json.dumps(v, sort_keys=True, default=str) for v in values))
        return values[0] if len(distinct) == 1 else " | ".join(sorted(str(v) for v in {str(v) for v in values}))

    return merge(environments)


def gpu_names() -> list[str]:
    """The names of this host's GPUs as NVML reports them (none without an NVIDIA driver)."""
    return [gpu["name"] for gpu in _gpus()[0]]


def capture_environment(host_label: str | None = None) -> dict[str, Any]:
    gpus, driver, gpu_unavailable = _gpus()
    versions = {name: _version(name) for name in LIBRARIES}
    try:
        import torch

        cuda = torch.version.cuda
    except ImportError:
        cuda = None
    unavailable = {}
    if gpu_unavailable:
        unavailable["gpu"] = gpu_unavailable
    commit = _git_commit()
    if commit is None:
        unavailable["git_commit"] = "flux2bench is not running from a git checkout"
    bandwidth = host_to_device() if gpus else {"unavailable": "no GPU"}
    if "unavailable" in bandwidth:
        unavailable["host_to_device"] = bandwidth.pop("unavailable")
    return {
        "gpu_name": gpus[0]["name"] if gpus else None,
        "gpu_memory_gib": gpus[0]["memory_gib"] if gpus else None,
        "gpus": gpus,
        "driver": driver,
        "cuda": cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": psutil.cpu_count(logical=True),
        "host_ram_gib": psutil.virtual_memory().total / GIB,
        "machine_id": _machine_id(),
        "host_label": host_label,
        "host_to_device": bandwidth or None,
        "versions": versions,
        "git_commit": commit,
        "unavailable": unavailable,
    }
