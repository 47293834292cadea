"""Entries of compiled code in the artifact cache: their key, their file, and the decision to load or compile.

An entry is one zip file: ``artifacts.bin``, the bytes of ``torch.compiler.save_cache_artifacts()`` (PyTorch's
portable "Mega-Cache": inductor's compiled graphs with their Triton kernels, AOT autograd's, autotuning results and
dynamo's shape decisions); ``kernels/...``, the files of the case's Triton cache folder (the kernels Triton built in
the case's calls, those built at their first launch included, which the Mega-Cache does not carry); and
``entry.json``: the format, the key and what it hashes, the SHA-256 of the bytes and of each kernel file, and what
made the entry (the case, when, its compile time). It is stored as a file artifact of ``flux2bench.artifact_cache``
(named by its key; the cache adds its own manifest and the library versions to the identity).

An entry is used only when everything checks: the cache's manifest, the zip's CRCs, the format, the key (every input
of it, not only its hash), the SHA-256 of the bytes and of every kernel file (each a plain relative path), and torch
reading them back. Anything else is a stale or corrupt entry: it is removed, and the case compiles and stores a new
one. torch checks what it loads too (each compiled graph's own cache key, dynamo's guards): code that does not fit is
compiled again, and the record shows it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from flux2bench.artifact_cache import ArtifactCache

FORMAT = 2
AXIS_NAME = "compile_cache"
BYTES_MEMBER = "artifacts.bin"
ENTRY_MEMBER = "entry.json"
KERNELS = "kernels/"
LIBRARIES = ("torch", "triton", "pytorch-triton", "diffusers", "transformers", "torchao", "flux2bench")


class StaleEntry(Exception):
    """An entry that cannot be used; the message says why."""


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment(device: Any) -> dict[str, Any]:
    """What compiled code depends on outside the case: library versions, CUDA, Python and the device."""
    import torch

    found: dict[str, Any] = {"versions": {name: _version(name) for name in LIBRARIES},
                             "torch": torch.__version__, "cuda": torch.version.cuda,
                             "python": ".".join(map(str, sys.version_info[:3])), "machine": platform.machine()}
    if device.type == "cuda":
        found["device"] = {"name": torch.cuda.get_device_name(device),
                           "capability": list(torch.cuda.get_device_capability(device))}
    else:
        found["device"] = {"type": device.type, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    return found


def model_config(transformer_config: Any) -> dict[str, Any]:
    """The transformer's architecture: its config without the bookkeeping keys (path, versions) diffusers adds."""
    config = {key: value for key, value in dict(transformer_config).items() if not key.startswith("_")}
    plain: dict[str, Any] = json.loads(json.dumps(config, sort_keys=True, default=str))
    return plain


def key_of(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Entry:
    """An entry read from the cache (or none: ``state`` says why, ``"miss"`` or ``"stale: ..."``)."""

    state: str
    artifacts: bytes | None = None
    made_by: dict[str, Any] = field(default_factory=dict)
    kernels: dict[str, bytes] = field(default_factory=dict)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _plain_relative(name: str) -> bool:
    """A path that stays inside the folder it is put in: relative, no '..', nothing empty."""
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and "\\" not in name and all(p not in ("", ".", "..") for p in parts)


def kernels_in(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (a Triton cache folder) by its path relative to it; none if it does not exist."""
    if not folder.is_dir():
        return {}
    return {path.relative_to(folder).as_posix(): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file() and not path.is_symlink()}


def kernels_size(kernels: dict[str, bytes]) -> dict[str, int]:
    """How many kernel files, and their bytes: what a record says of them."""
    return {"files": len(kernels), "bytes": sum(len(data) for data in kernels.values())}


def put_kernels(kernels: dict[str, bytes], folder: Path) -> dict[str, int]:
    """Write an entry's kernel files into ``folder`` (the case's empty Triton cache folder): files and bytes written."""
    for name, data in kernels.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return kernels_size(kernels)


def write_entry(path: Path, artifacts: bytes, inputs: dict[str, Any], made_by: dict[str, Any],
                kernels: dict[str, bytes] | None = None) -> None:
    kernels = kernels or {}
    entry = {"format": FORMAT, "key": key_of(inputs), "inputs": inputs, "bytes": len(artifacts),
             "sha256": _sha256(artifacts), "kernels": {name: _sha256(data) for name, data in kernels.items()},
             "made_by": made_by}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(ENTRY_MEMBER, json.dumps(entry, sort_keys=True, indent=1))
        archive.writestr(BYTES_MEMBER, artifacts)
        for name, data in kernels.items():
            archive.writestr(KERNELS + name, data)


def _read_kernels(archive: zipfile.ZipFile, listed: Any) -> dict[str, bytes]:
    """The entry's kernel files, each checked against its listed SHA-256; StaleEntry for any other member or path."""
    if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
        raise StaleEntry("its list of kernel files is not a map of paths to SHA-256")
    members = {name.removeprefix(KERNELS) for name in archive.namelist() if name.startswith(KERNELS)}
    if members != set(listed):
        raise StaleEntry("its kernel files differ from the files it lists")
    kernels = {}
    for name, digest in listed.items():
        if not _plain_relative(name):
            raise StaleEntry(f"a kernel file's path leaves its folder: {name!r}")
        data = archive.read(KERNELS + name)
        if _sha256(data) != digest:
            raise StaleEntry(f"the kernel file {name} differs from its recorded SHA-256")
        kernels[name] = data
    return kernels


def read_entry(path: Path, inputs: dict[str, Any]) -> Entry:
    """The entry at ``path`` if it is whole and made for ``inputs``; StaleEntry otherwise."""
    try:
        with zipfile.ZipFile(path) as archive:
            entry = json.loads(archive.read(ENTRY_MEMBER))
            artifacts = archive.read(BYTES_MEMBER)  # checks the member's CRC
            if not isinstance(entry, dict) or entry.get("format") != FORMAT:
                raise StaleEntry(f"format {entry.get('format') if isinstance(entry, dict) else None!r}, not {FORMAT}")
            if entry.get("inputs") != json.loads(json.dumps(inputs, sort_keys=True, default=str)):
                raise StaleEntry("made for other inputs than its name says")
            if _sha256(artifacts) != entry.get("sha256") or len(artifacts) != entry.get("bytes"):
                raise StaleEntry("its bytes differ from their recorded SHA-256")
            kernels = _read_kernels(archive, entry.get("kernels"))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise StaleEntry(f"unreadable: {type(exc).__name__}: {exc}") from exc
    made_by = entry.get("made_by")
    return Entry("hit", artifacts, made_by if isinstance(made_by, dict) else {}, kernels)


class CompiledCode:
    """Compiled code of one key in an artifact cache: ``restore`` before the first call, ``store`` after it."""

    def __init__(self, cache: ArtifactCache, inputs: dict[str, Any]):
        self.cache = cache
        self.inputs = inputs
        self.key = key_of(inputs)
        self.name = f"{self.key[:32]}.zip"

    def restore(self) -> Entry:
        """The entry, verified; a stale or corrupt one is removed and reported as such."""
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / self.name
            with self.cache.lock(AXIS_NAME, path):
                state = self.cache.restore(AXIS_NAME, path)
                if state != "hit":
                    return Entry(state)
                try:
                    return read_entry(path, self.inputs)
                except StaleEntry as exc:
                    self.cache.discard(AXIS_NAME, path)
                    return Entry(f"stale: {exc}")

    def discard(self, reason: str) -> Entry:
        """Remove the entry (torch could not read what it holds)."""
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / self.name
            with self.cache.lock(AXIS_NAME, path):
                self.cache.discard(AXIS_NAME, path)
        return Entry(f"stale: {reason}")

    def store(self, artifacts: bytes, made_by: dict[str, Any], kernels: dict[str, bytes] | None = None) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / self.name
            write_entry(path, artifacts, self.inputs, made_by, kernels)
            with self.cache.lock(AXIS_NAME, path):
                self.cache.store(AXIS_NAME, path)


def load_into_torch(artifacts: bytes) -> tuple[float, dict[str, int]]:
    """Hand the artifacts to torch's caches: the seconds it took and the artifacts by kind; StaleEntry when torch
    cannot read them."""
    import torch

    start = time.perf_counter()
    try:
        info = torch.compiler.load_cache_artifacts(artifacts)
    except Exception as exc:  # noqa: BLE001 - whatever torch raises on bytes it cannot read, the entry is unusable
        raise StaleEntry(f"torch could not load it: {type(exc).__name__}: {exc}") from exc
    if info is None:
        raise StaleEntry("torch could not read its artifacts")
    return time.perf_counter() - start, {kind: len(keys) for kind, keys in info.artifacts.items()}


def saved_from_torch() -> tuple[bytes, dict[str, int]] | None:
    """Every artifact torch's caches recorded in this process (compiled or loaded), or None when there are none."""
    import torch

    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    artifacts, info = saved
    return artifacts, {kind: len(keys) for kind, keys in info.artifacts.items()}
