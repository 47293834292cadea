"""A cache of pure-input artifacts across runs, keyed by content: prompt embeddings, on-disk checkpoints and compiled
code (``flux2bench.axes.compile_cache``).

``run --cache DIR`` (or ``$FLUX2BENCH_CACHE``) picks the folder; a CI runner keeps it between jobs. An artifact's key
is the hash of its axis, its name (which the axis derives from the model, weights, precision and prompts) and the
versions of the libraries that make it (torch, diffusers, transformers, flux2bench), so an upgrade makes new
entries instead of reusing stale ones.

Every entry carries a manifest of its files (size and SHA-256) and is used only when its files match it; one that
does not is removed and made again. Entries appear whole or not at all: a file entry is written into a temporary
folder and renamed into place; a checkpoint folder (written in place by its own axis, which renames it whole) gets its
manifest last, through a temporary file renamed into place. Two runs sharing the folder take a lock file per key
(``fcntl.flock``), so one makes an artifact while the other waits and then uses it. Files larger than
``HASHED_BYTES`` (checkpoint shards) are checked by size at lookup, since hashing tens of GB would cost what the
cache saves; their hash is recorded.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterator

ENV = "FLUX2BENCH_CACHE"
MANIFEST = ".flux2bench-manifest.json"
HASHED_BYTES = 64 * 2**20
LIBRARIES = ("torch", "diffusers", "transformers", "flux2bench")


def library_versions() -> dict[str, str | None]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def cache_root(explicit: str | Path | None = None) -> Path | None:
    """The cache folder: ``explicit`` (``run --cache``), else ``$FLUX2BENCH_CACHE``, else None (no cache)."""
    chosen = explicit or os.environ.get(ENV)
    return Path(chosen).expanduser().resolve() if chosen else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


def write_manifest(folder: Path, identity: dict) -> None:
    """Record every file's size and hash; written last and renamed into place, so a manifest means a whole entry."""
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(folder)}
    partial = folder / f"{MANIFEST}.tmp"
    partial.write_text(json.dumps({"identity": identity, "files": files}, indent=1, sort_keys=True))
    os.replace(partial, folder / MANIFEST)


def verify(folder: Path, identity: dict) -> str | None:
    """None when the folder matches its manifest and ``identity``; else what is wrong with it."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no readable manifest"
    if manifest.get("identity") != identity:
        return "made for another identity (library versions or content)"
    files = manifest.get("files") or {}
    if sorted(files) != [str(p.relative_to(folder)) for p in _files(folder)]:
        return "files missing or added"
    for name, expected in files.items():
        path = folder / name
        if path.stat().st_size != expected["bytes"]:
            return f"{name}: size differs"
        if expected["bytes"] <= HASHED_BYTES and _sha256(path) != expected["sha256"]:
            return f"{name}: checksum differs"
    return None


class ArtifactCache:
    """File artifacts (prompt embeddings) are copied in and out of ``root/entries/<key>``; folder artifacts that
    live in the cache already (checkpoints, under ``checkpoints_dir``) are verified in place."""

    def __init__(self, root: Path):
        self.root = root
        self.versions = library_versions()
        (root / "locks").mkdir(parents=True, exist_ok=True)

    @property
    def checkpoints_dir(self) -> Path:
        """Where ``weights: checkpoint`` folders live, one folder per set of library versions."""
        return self.root / "checkpoints" / self._hash(self.versions)[:12]

    @staticmethod
    def _hash(data: object) -> str:
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def identity(self, axis: str, artifact: Path) -> dict:
        return {"axis": axis, "artifact": artifact.name, "versions": self.versions}

    def _entry(self, identity: dict) -> Path:
        return self.root / "entries" / self._hash(identity)[:32]

    def in_place(self, artifact: Path) -> bool:
        return artifact.is_relative_to(self.root)

    @contextmanager
    def lock(self, axis: str, artifact: Path) -> Iterator[None]:
        """Held while the artifact is looked up, made and stored: one maker per key across processes."""
        path = self.root / "locks" / f"{self._hash(self.identity(axis, artifact))[:32]}.lock"
        with open(path, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def restore(self, axis: str, artifact: Path) -> str:
        """Put a valid cached copy at ``artifact``: "hit", or "miss"/"stale: why" after removing what was unusable."""
        identity = self.identity(axis, artifact)
        folder = artifact if self.in_place(artifact) else self._entry(identity)
        if not folder.exists():
            return "miss"
        problem = verify(folder, identity)
        if problem is not None:
            _remove(folder)
            return f"stale: {problem}"
        if not self.in_place(artifact):
            artifact.parent.mkdir(parents=True, exist_ok=True)
            partial = artifact.with_name(f".{artifact.name}.restoring")
            shutil.copyfile(folder / artifact.name, partial)
            os.replace(partial, artifact)
        return "hit"

    def discard(self, axis: str, artifact: Path) -> None:
        """Remove the entry of ``artifact``: one that matched its manifest but that its reader found unusable."""
        identity = self.identity(axis, artifact)
        _remove(artifact if self.in_place(artifact) else self._entry(identity))

    def store(self, axis: str, artifact: Path) -> None:
        """Publish a freshly made artifact: a manifest for a folder in the cache, else a copy in a new entry."""
        identity = self.identity(axis, artifact)
        if self.in_place(artifact):
            write_manifest(artifact, identity)
            return
        final = self._entry(identity)
        partial = final.with_name(f".{final.name}.{os.getpid()}.partial")
        _remove(partial)
        partial.mkdir(parents=True)
        shutil.copyfile(artifact, partial / artifact.name)
        write_manifest(partial, identity)
        _remove(final)
        os.replace(partial, final)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
