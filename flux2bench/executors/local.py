"""The local executor: cases spread over this host's GPUs, one case per GPU slot at a time (``--devices``).

A case that asks for a GPU kind (the ``gpu`` axis) runs only where this host's GPUs are of that kind; elsewhere it
is not run and not recorded (it is a fact about this machine, not about the setup), so that ``run --resume`` on a
host with that kind runs it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from flux2bench.axes import gpu, registry
from flux2bench.executors import Placement
from flux2bench.trackers.environment import gpu_names

if TYPE_CHECKING:
    from flux2bench.case import Case
    from flux2bench.runner import Runner


Item = TypeVar("Item")


def omp_threads(slots: int) -> str | None:
    """The workers' OpenMP threads: inherited, or with several slots the CPUs shared out, not oversubscribed."""
    if "OMP_NUM_THREADS" in os.environ or slots == 1:
        return os.environ.get("OMP_NUM_THREADS")
    return str(max(1, (os.cpu_count() or 1) // slots))


def run_on_devices(items: list[Item], devices: list[str | None], gpus_of: Callable[[Item], int],
                   run_one: Callable[[Item, str | None], None], stop: Callable[[], None],
                   stopping: threading.Event) -> None:
    """Run ``run_one(item, devices)`` for every item, in order, each as soon as ``gpus_of(item)`` devices are free
    (passed joined by commas, as CUDA_VISIBLE_DEVICES takes them). ``[None]`` is one slot with the inherited
    environment. An item that needs more devices than there are gets all of them (its worker then says why it
    cannot run). On any failure (or Ctrl-C) ``stop`` is called and the failure re-raised in this thread."""
    free = list(devices)
    ready = threading.Condition()
    failures: list[BaseException] = []
    threads: list[threading.Thread] = []

    def run(item: Item, taken: list[str | None]) -> None:
        try:
            run_one(item, None if taken == [None] else ",".join(taken))
        except BaseException as exc:  # surfaced in the main thread
            failures.append(exc)
        finally:
            with ready:
                free.extend(taken)
                free.sort(key=devices.index)
                ready.notify_all()

    try:
        for item in items:
            need = 1 if devices == [None] else min(gpus_of(item), len(devices))
            with ready:
                while len(free) < need and not failures:
                    ready.wait(timeout=0.5)
                if failures or stopping.is_set():
                    break
                taken, free[:] = free[:need], free[need:]
            threads.append(threading.Thread(target=run, args=(item, taken), daemon=True))
            threads[-1].start()
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.5)
        if failures:
            raise failures[0]
    except BaseException:  # Ctrl-C, a kill of the runner or a slot's failure: take the workers down too
        stopping.set()
        stop()
        raise


def host_gpu_kinds() -> set[str]:
    return {kind for name in gpu_names() if (kind := gpu.kind_of(name))}


class LocalExecutor:
    name = "local"

    def __init__(self, devices: list[str] | None = None, gpu_kinds: Callable[[], set[str]] = host_gpu_kinds):
        self.devices: list[str | None] = list(devices) if devices else [None]
        self._gpu_kinds = gpu_kinds

    @property
    def slots(self) -> int:
        return len(self.devices)

    def execute(self, runner: Runner, cases: list[Case]) -> None:
        kinds = self._gpu_kinds() if any(gpu.AXIS.kind(c) for c in cases) else set()
        placement = Placement.here()
        runnable = []
        for case in cases:
            wanted = gpu.AXIS.kind(case)
            if wanted is None or wanted in kinds:
                runnable.append(case)
            else:
                here = ", ".join(sorted(kinds)) or "no NVIDIA GPU"
                runner.defer(case, f"needs a {wanted} GPU; this host has {here} (run --resume on a host with a "
                                   f"{wanted}, or use --executor ray)")

        def run_one(case: Case, device: str | None) -> None:
            runner.progress.on_case_start(case, device)
            runner.record(runner.run_case(case, device, placement, slots=self.slots))

        run_on_devices(runnable, self.devices, registry.gpus, run_one, runner.workers.kill_all,
                       runner.workers.stopping)
