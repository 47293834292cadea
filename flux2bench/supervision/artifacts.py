"""The artifacts a case needs before its worker runs (precomputed prompt embeddings, on-disk checkpoints): each made
once, in a worker of its own, under a lock, or restored from the artifact cache."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from flux2bench.artifact_cache import ArtifactCache
from flux2bench.axes import registry
from flux2bench.axes.base import ArtifactPlaces
from flux2bench.case import Case
from flux2bench.results import CaseResult
from flux2bench.safe_files import open_lock
from flux2bench.store import RunStore
from flux2bench.supervision.process import Workers, classify


@contextmanager
def artifact_lock(locks: Path, path: Path) -> Iterator[None]:
    """Held while the artifact ``path`` is made: two device slots, or two Ray workers of one node, never make it at
    once (an flock on a file in ``locks``, which separate opens of one process contend for too; not beside the
    artifact, whose folder, e.g. the checkpoints folder, holds artifacts only)."""
    name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    fd = open_lock(locks / f"{name}.lock")
    with os.fdopen(fd, "r+") as lock:  # a link in the run directory is never followed
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Artifacts:
    """Makes (or restores from ``cache``) what a case needs before its worker runs."""

    def __init__(self, store: RunStore, workers: Workers, cache: ArtifactCache | None, checkpoints: Path):
        self.store = store
        self.workers = workers
        self.cache = cache
        self.checkpoints = checkpoints

    def prepare(self, case: Case, device: str | None, on_stage: Callable[[str], None],
                walls: list[float]) -> CaseResult | None:
        """Make each missing artifact of the case once, in its own worker (its wall appended to ``walls``); a
        failure becomes the case's record."""
        for axis, path in registry.artifacts(case, ArtifactPlaces(self.store.root, self.checkpoints)):
            with artifact_lock(self.store.subdir("locks"), path), self._cache_lock(axis, path):
                if self._have(axis, path, on_stage):
                    continue
                made = self.workers.run(case, device, on_stage, prepare=axis)
                if self._cached(path) and made.returncode == 0 and made.result is None and path.exists():
                    assert self.cache is not None
                    self.cache.store(axis, path)
            walls.append(made.wall_s)
            if made.result is not None:  # the step found that the case cannot run here
                return made.result
            if made.returncode != 0 or made.timed_out:
                failed = classify(case, made, self.store.root)
                failed.reason = f"{axis} step failed: {failed.reason}"
                return failed
        return None

    def _cached(self, path: Path) -> bool:
        """Whether the cache keeps this artifact: a file (copied in and out) or a folder inside the cache."""
        return self.cache is not None and (self.cache.in_place(path) or bool(path.suffix))

    def _cache_lock(self, axis: str, path: Path) -> contextlib.AbstractContextManager[None]:
        """One maker per cache key across run directories (the artifact lock is per run directory)."""
        if self.cache is None or not self._cached(path):
            return nullcontext()
        return self.cache.lock(axis, path)

    def _have(self, axis: str, path: Path, on_stage: Callable[[str], None]) -> bool:
        """Whether the artifact is there to use: made earlier in this run directory, or restored from the cache (a
        stale or corrupt cache entry is removed and the artifact made again)."""
        if self.cache is None or not self._cached(path) or (path.exists() and not self.cache.in_place(path)):
            return path.exists()
        state = self.cache.restore(axis, path)
        on_stage(f"{axis} from the cache: {state}")
        return state == "hit"
