"""Scheduling cases onto device slots: each slot (a ``CUDA_VISIBLE_DEVICES`` value, or None for the inherited
environment) runs one case at a time and takes the next one when its last one ends."""

from __future__ import annotations

import os
import threading
from typing import Callable, TypeVar

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
