"""What workers import, imported once per run by the fork server (``flux2bench.fork_server``) before it forks
each worker: torch, diffusers and transformers with the classes of every model flux2bench knows.

Nothing here may initialise CUDA, or no forked worker could use it. bitsandbytes does when it is imported (it reads
the GPUs' compute capability), so it is bound here and its code runs in the worker that first uses it. The fork
server's probe checks, in a forked child, that CUDA is untouched and works.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time
import traceback
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flux2bench import child_env  # noqa: E402 - the standard library only
from flux2bench.fork_server_log import open_from_server  # noqa: E402 - the standard library only

_STARTED = time.perf_counter()  # before torch's import: the server's imports are all of a worker's


def _output_to_log() -> None:
    """In the fork server (which the runner starts with ``child_env.FORK_SERVER_LOG``), the server's output (its
    imports' warnings) goes to the runner's pipe for it (``fork_server_log``), else nowhere, and the runner's stdout
    and stderr are let go before the imports: a command that exits before the server has imported (bad input) is not
    kept waiting by a caller reading its output to the end."""
    if child_env.FORK_SERVER_LOG not in os.environ:
        return
    fd = open_from_server(os.environ.pop(child_env.FORK_SERVER_LOG))
    if fd is None:
        fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


_output_to_log()

import torch  # noqa: E402

# Packages that initialise CUDA when imported: bound here, run on first use in a worker.
IMPORTED_ON_FIRST_USE = ("bitsandbytes",)


class _OnFirstUse(types.ModuleType):
    """A package in ``sys.modules`` whose code runs when an attribute other than its name, file and spec is first
    read. (``importlib.util.LazyLoader`` runs it on any attribute, and ``inspect.getmodule``, which torch.library
    calls while libraries register operators, reads ``__file__`` of every module.)"""

    def __init__(self, spec: importlib.machinery.ModuleSpec):
        super().__init__(spec.name)
        self.__spec__, self.__file__, self.__loader__ = spec, spec.origin, spec.loader

    def __getattr__(self, attr: str) -> Any:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attr)


def bind_on_first_use(name: str) -> None:
    if name not in sys.modules and (spec := importlib.util.find_spec(name)) is not None:
        sys.modules[name] = _OnFirstUse(spec)


# Where the preload initialised CUDA, if it did (the probe's reason names it): the innermost library frames.
CUDA_INITIALISED_AT: str | None = None
# How long preload() took in the fork server: what a fresh worker's own imports would take, counted in a forked
# worker's time to first image.
IMPORT_S: float | None = None


@contextmanager
def _compute_capability_from_nvml() -> Iterator[None]:
    """While importing, answer "which GPU is this?" from NVML instead of a CUDA context. Libraries ask at import time:
    torchao checks ``torch.cuda.get_device_capability()`` (``is_sm_at_least_100``) and calls
    ``torch.utils._triton.has_triton()``, which reads it through dynamo's device interface; either initialises CUDA.
    NVML gives the same compute capability (the lowest of the host's GPUs: what every one of them can run)."""
    from torch._dynamo.device_interface import CudaInterface

    try:
        import pynvml

        pynvml.nvmlInit()
        capabilities = [pynvml.nvmlDeviceGetCudaComputeCapability(pynvml.nvmlDeviceGetHandleByIndex(i))
                        for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # noqa: BLE001 - no NVML: torch's own answers (the probe then finds CUDA initialised, if so)
        yield
        return
    if not capabilities:
        yield
        return
    major, minor = (int(value) for value in min(capabilities))
    originals = (torch.cuda.get_device_capability, CudaInterface.Worker.get_device_properties)
    torch.cuda.get_device_capability = lambda device=None: (major, minor)
    CudaInterface.Worker.get_device_properties = staticmethod(  # type: ignore[method-assign]
        lambda device=None: types.SimpleNamespace(major=major, minor=minor))
    try:
        yield
    finally:
        torch.cuda.get_device_capability, CudaInterface.Worker.get_device_properties = originals  # type: ignore


@contextmanager
def _noting_cuda_initialisation() -> Iterator[None]:
    original = torch.cuda._lazy_init

    def noted() -> None:
        global CUDA_INITIALISED_AT
        if CUDA_INITIALISED_AT is None and not torch.cuda.is_initialized():
            frames = traceback.extract_stack()[:-1]
            CUDA_INITIALISED_AT = " <- ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno}"
                                             for f in reversed(frames[-6:]))
        original()

    torch.cuda._lazy_init = noted
    try:
        yield
    finally:
        torch.cuda._lazy_init = original


def preload() -> None:
    global IMPORT_S
    for name in IMPORTED_ON_FIRST_USE:
        bind_on_first_use(name)
    with _noting_cuda_initialisation(), _compute_capability_from_nvml():
        import flux2bench.case_run  # noqa: F401 - torch, PIL, numpy, flux2bench's worker side
        from flux2bench.models import MODELS, import_model_classes

        for spec in MODELS.values():
            import_model_classes(spec)
    IMPORT_S = time.perf_counter() - _STARTED


preload()
