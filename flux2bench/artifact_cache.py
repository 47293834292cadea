"""A cache of pure-input artifacts across runs, keyed by content: prompt embeddings, on-disk checkpoints and compiled
code (``flux2bench.axes.compile_cache``).

``run --cache DIR`` (or ``$FLUX2BENCH_CACHE``) picks the folder; a CI runner keeps it between jobs. An artifact's key
is the hash of its axis, its name (which the axis derives from the model, weights, precision and prompts) and the
versions of the libraries that make it (torch, diffusers, transformers, flux2bench), so an upgrade makes new
entries instead of reusing stale ones.

Every entry carries a manifest of its files (size and SHA-256), read as untrusted input, and is used only when its
files match it; one that does not (a damaged or foreign manifest, a file missing, added or linked elsewhere) is
removed and made again. Entries appear whole or not at all: a file entry is written into a temporary folder and
renamed into place; a checkpoint folder (written in place by its own axis, which renames it whole) gets its manifest
last. Every file is written through ``safe_files`` (a new inode, never through a link). Two runs sharing the folder
take a lock file per key (``fcntl.flock``; a lock that is a link or a hard link is refused), so one makes an artifact
while the other waits and then uses it. Files larger than ``HASHED_BYTES`` (checkpoint shards) are checked by size
at lookup, since hashing tens of GB would cost what the cache saves; their hash is recorded.

The cache is an optimisation and fails open: when it cannot be written or read (a full disk, a damaged folder), the
run goes on without it, one warning says why, what it left half-written is removed, and the next run makes the
entry again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from flux2bench.safe_files import open_lock, read_regular, replacing, write_atomic

ENV = "FLUX2BENCH_CACHE"
MANIFEST = ".flux2bench-manifest.json"
HASHED_BYTES = 64 * 2**20
MAX_MANIFEST_BYTES = 16 * 2**20
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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FileEntry(_Strict):
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(_Strict):
    """An entry's manifest, as read back: what made it, and each of its files' size and hash."""

    identity: dict[str, Any]
    files: dict[str, FileEntry]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The entry's own files (not its manifest, not hidden ones), and anything in it that is not a regular file or
    a folder (a link, a FIFO): the latter makes an entry unusable."""
    files, strange = [], []
    for parent, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(parent, name)
            mode = os.lstat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                strange.append(path)
            elif stat.S_ISREG(mode) and name != MANIFEST and not name.startswith("."):
                files.append(path)
    return sorted(files), strange


def write_manifest(folder: Path, identity: dict) -> None:
    """Record every file's size and hash; written last and renamed into place, so a manifest means a whole entry."""
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(folder)[0]}
    write_atomic(folder / MANIFEST, json.dumps({"identity": identity, "files": files}, indent=1, sort_keys=True))


def verify(folder: Path, identity: dict) -> str | None:
    """None when the folder matches its manifest and ``identity``; else what is wrong with it."""
    if folder.is_symlink() or not folder.is_dir():
        return "not a folder of its own"
    try:
        manifest = Manifest.model_validate_json(read_regular(folder / MANIFEST, MAX_MANIFEST_BYTES))
    except (OSError, ValueError):
        return "no readable manifest"
    if manifest.identity != identity:
        return "made for another identity (library versions or content)"
    files, strange = _files(folder)
    if strange:
        return f"{strange[0].relative_to(folder)} is a link or not a regular file"
    if sorted(manifest.files) != [str(p.relative_to(folder)) for p in files]:
        return "files missing or added"
    for name, expected in manifest.files.items():
        path = folder / name
        if path.stat().st_size != expected.bytes:
            return f"{name}: size differs"
        if expected.bytes <= HASHED_BYTES and _sha256(path) != expected.sha256:
            return f"{name}: checksum differs"
    return None


def _problem(exc: OSError) -> str:
    return f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)


class ArtifactCache:
    """File artifacts (prompt embeddings) are copied in and out of ``root/entries/<key>``; folder artifacts that
    live in the cache already (checkpoints, under ``checkpoints_dir``) are verified in place. ``warn`` receives the
    one warning of a cache that failed (default: a Python warning)."""

    def __init__(self, root: Path, warn: Callable[[str], None] | None = None):
        self.root = root
        self.versions = library_versions()
        self.failed: str | None = None  # why the cache stopped storing entries, once it failed
        self._warn = warn or (lambda message: warnings.warn(message, RuntimeWarning, stacklevel=3))
        try:
            (root / "locks").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._fail("its locks folder cannot be made", exc)

    def _fail(self, what: str, exc: OSError) -> None:
        if self.failed is None:
            self.failed = f"{what}: {_problem(exc)}"
            self._warn(f"the artifact cache {self.root} failed ({self.failed}); the run goes on without it, and "
                       "its entries are made again by the next run")

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
        """Held while the artifact is looked up, made and stored: one maker per key across processes (none, with the
        warning, where the lock cannot be taken)."""
        fd = None
        try:
            fd = open_lock(self.root / "locks" / f"{self._hash(self.identity(axis, artifact))[:32]}.lock")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if fd is not None:
                os.close(fd)
                fd = None
            self._fail("a lock cannot be taken", exc)
        try:
            yield
        finally:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    def restore(self, axis: str, artifact: Path) -> str:
        """Put a valid cached copy at ``artifact``: "hit", or "miss"/"stale: why" after removing what was unusable,
        or "failed: why" when the cache cannot be read (the artifact is then made as without a cache)."""
        try:
            return self._restore(axis, artifact)
        except OSError as exc:
            self._fail("an entry cannot be read", exc)
            return f"failed: {_problem(exc)}"

    def _restore(self, axis: str, artifact: Path) -> str:
        identity = self.identity(axis, artifact)
        folder = artifact if self.in_place(artifact) else self._entry(identity)
        if not folder.exists() and not folder.is_symlink():
            return "miss"
        problem = verify(folder, identity)
        if problem is not None:
            _remove(folder)
            return f"stale: {problem}"
        if not self.in_place(artifact):
            artifact.parent.mkdir(parents=True, exist_ok=True)
            source = os.open(folder / artifact.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(source, "rb") as cached, replacing(artifact) as copy:
                shutil.copyfileobj(cached, copy)
        return "hit"

    def discard(self, axis: str, artifact: Path) -> None:
        """Remove the entry of ``artifact``: one that matched its manifest but that its reader found unusable."""
        identity = self.identity(axis, artifact)
        _remove(artifact if self.in_place(artifact) else self._entry(identity))

    def store(self, axis: str, artifact: Path) -> None:
        """Publish a freshly made artifact: a manifest for a folder in the cache, else a copy in a new entry. A cache
        that failed stores nothing; a store that fails leaves nothing half-written."""
        if self.failed is not None:
            return
        identity = self.identity(axis, artifact)
        final = self._entry(identity)
        partial = final.with_name(f".{final.name}.{os.getpid()}.partial")
        try:
            if self.in_place(artifact):
                write_manifest(artifact, identity)
                return
            _remove(partial)
            partial.mkdir(parents=True)
            with open(artifact, "rb") as made, replacing(partial / artifact.name) as copy:
                shutil.copyfileobj(made, copy)
            write_manifest(partial, identity)
            _remove(final)
            os.replace(partial, final)
        except OSError as exc:
            self._fail("an entry cannot be stored", exc)
            with suppress(OSError):
                _remove(partial)


def _remove(path: Path) -> None:
    """Remove a file, a link (never what it points to) or a folder."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
