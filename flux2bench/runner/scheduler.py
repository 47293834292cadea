"""Scheduling cases onto device slots: each slot (a ``CUDA_VISIBLE_DEVICES`` value, or None for the inherited
environment) runs one case at a time and takes the next one when its last one ends."""

from __future__ import annotations

import os
import threading
from queue import Empty, Queue
from typing import Callable, TypeVar

Item = TypeVar("Item")


def omp_threads(slots: int) -> str | None:
    """The workers' OpenMP threads: inherited, or with several slots the CPUs shared out, not oversubscribed."""
    if "OMP_NUM_THREADS" in os.environ or slots == 1:
        return os.environ.get("OMP_NUM_THREADS")
    return str(max(1, (os.cpu_count() or 1) // slots))


def run_on_slots(items: list[Item], slots: list[str | None], run_one: Callable[[Item, str | None], None],
                 stop: Callable[[], None], stopping: threading.Event) -> None:
    """Run ``run_one(item, slot)`` for every item over the slots; on any failure (or Ctrl-C) call ``stop`` and
    re-raise it in this thread."""
    queue: Queue[Item] = Queue()
    for item in items:
        queue.put(item)
    finished: Queue[BaseException | None] = Queue()

    def slot(device: str | None) -> None:
        try:
            while not stopping.is_set():
                try:
                    item = queue.get_nowait()
                except Empty:
                    return
                run_one(item, device)
                finished.put(None)
        except BaseException as exc:  # surfaced in the main thread
            finished.put(exc)

    threads = [threading.Thread(target=slot, args=(d,), daemon=True) for d in slots[:len(items)]]
    for thread in threads:
        thread.start()
    try:
        for _ in items:
            if (failure := finished.get()) is not None:
                raise failure
    except BaseException:  # Ctrl-C, a kill of the runner or a slot's failure: take the workers down too
        stopping.set()
        stop()
        raise
    for thread in threads:
        thread.join()
