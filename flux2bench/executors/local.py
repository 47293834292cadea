"""The local executor: cases spread over this host's GPUs, one case per GPU slot at a time (``--devices``).

A case that asks for a GPU kind (the ``gpu`` axis) runs only where this host's GPUs are of that kind; elsewhere it
is not run and not recorded (it is a fact about this machine, not about the setup), so that ``run --resume`` on a
host with that kind runs it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from flux2bench.axes import gpu, registry
from flux2bench.executors import CaseSink, ExecutorOptions, ExecutorUnavailable, refuse_foreign
from flux2bench.supervision.supervisor import Placement
from flux2bench.trackers.environment import gpu_names

if TYPE_CHECKING:
    from flux2bench.case import Case
    from flux2bench.supervision.supervisor import CaseSupervisor


Item = TypeVar("Item")


def run_on_devices(items: list[Item], devices: Sequence[str | None], gpus_of: Callable[[Item], int],
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
            run_one(item, None if taken == [None] else ",".join(d for d in taken if d is not None))
        except BaseException as exc:  # surfaced in the main thread
            failures.append(exc)
        finally:
            with ready:
                free.extend(taken)
                free.sort(key=list(devices).index)
                ready.notify_all()

    try:
        for item in items:
            need = 1 if list(devices) == [None] else min(gpus_of(item), len(devices))
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


def _check_devices(devices: Sequence[str], visible: int) -> None:
    given = ",".join(devices)
    if visible == 0:
        raise ExecutorUnavailable(f"--devices {given}: this machine has no NVIDIA GPU; run without --devices")
    beyond = [d for d in devices if d.isdigit() and int(d) >= visible]
    if beyond and "CUDA_VISIBLE_DEVICES" not in os.environ:  # indices then count the visible GPUs only
        raise ExecutorUnavailable(f"--devices {given}: GPU {', '.join(beyond)} does not exist; this machine has "
                                  f"{visible} (0 to {visible - 1})")


class LocalExecutor:
    name = "local"

    def __init__(self, devices: Sequence[str] | None = None, gpu_names: Callable[[], list[str]] = gpu_names):
        self.devices: list[str | None] = list(devices) if devices else [None]
        self._gpu_names = gpu_names

    @classmethod
    def from_options(cls, options: ExecutorOptions) -> LocalExecutor:
        refuse_foreign(options, ("devices",))
        if options.devices:
            _check_devices(options.devices, len(gpu_names()))
        return cls(options.devices)

    @property
    def slots(self) -> int:
        return len(self.devices)

    def unplaceable(self, case: Case) -> str | None:
        """A case for a CUDA GPU on a host without one, or for a GPU kind this host lacks."""
        wanted = gpu.AXIS.kind(case)
        if wanted is None and case.device != "cuda":
            return None
        kinds = self._kinds()
        if wanted is None:
            return None if self._gpu_names() else "device: cuda, and this host has no NVIDIA GPU"
        if wanted in kinds:
            return None
        here = ", ".join(sorted(kinds)) or "no NVIDIA GPU"
        return (f"needs a {wanted} GPU; this host has {here} (run --resume on a host with a {wanted}, or use "
                "--executor ray)")

    def _kinds(self) -> set[str]:
        return {kind for name in self._gpu_names() if (kind := gpu.kind_of(name))}

    def execute(self, cases: list[Case], supervisor: CaseSupervisor, sink: CaseSink) -> None:
        placement = Placement.here()
        runnable = []
        for case in cases:
            if (reason := self.unplaceable(case)) is None:
                runnable.append(case)
            else:
                sink.deferred(case, reason)

        def run_one(case: Case, device: str | None) -> None:
            sink.started(case, device)
            sink.finished(supervisor.run(case, device, placement, slots=self.slots))

        run_on_devices(runnable, self.devices, registry.gpus, run_one, supervisor.stop, supervisor.stopping)
