"""Entries of compiled code in the artifact cache: their key, their file, and the decision to load or compile.

An entry is one zip file: ``artifacts.bin``, the bytes of ``torch.compiler.save_cache_artifacts()`` (PyTorch's
portable "Mega-Cache": inductor's compiled graphs with their Triton kernels, AOT autograd's, autotuning results and
dynamo's shape decisions); ``kernels/...``, the files of the case's Triton cache folder (the kernels Triton built in
the case's calls, those built at their first launch included, which the Mega-Cache does not carry); and
``entry.json``: the format, the key and what it hashes, the SHA-256 of the bytes and of each kernel file, and what
made the entry (the case, when, its compile time). It is stored as a file artifact of ``flux2bench.artifact_cache``
(named by its key; the cache adds its own manifest and the library versions to the identity).

An entry is used only when everything checks: the cache's manifest, the zip's CRCs, ``entry.json`` read as
untrusted input (``EntryFile``: each field of the right type and in range, ``made_by``'s numbers finite, every kernel
file a plain relative path of a sane length that no other one needs as a folder), the format, the key (every input
of it, not only its hash), the SHA-256 of the bytes and of every kernel file, the kernel files put in place, and torch
reading the bytes back. Anything else is a stale or corrupt entry: it is removed, and the case compiles and stores a
new one. torch checks what it loads too (each compiled graph's own cache key, dynamo's guards): code that does not
fit is compiled again, and the record shows it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from flux2bench.artifact_cache import ArtifactCache

FORMAT = 2
AXIS_NAME = "compile_cache"
BYTES_MEMBER = "artifacts.bin"
ENTRY_MEMBER = "entry.json"
KERNELS = "kernels/"
LIBRARIES = ("torch", "triton", "pytorch-triton", "diffusers", "transformers", "torchao", "flux2bench")
MAX_ENTRY_BYTES = 16 * 2**20
# Triton names its files "<hash>/<kernel name>.<suffix>": far below these. A component over NAME_MAX cannot be made on
# Linux file systems; the whole path must leave room under PATH_MAX (4096) for the case's cache folder.
NAME_MAX = 255
MAX_KERNEL_PATH = 1024
# Far beyond any compile (a worker is stopped at its case's timeout), far below a number that means nothing.
MAX_COMPILE_S = 7 * 24 * 3600.0
MAX_GRAPHS = 1_000_000


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
    return (bool(name) and not name.startswith("/") and "\\" not in name and "\0" not in name
            and all(p not in ("", ".", "..") for p in parts))


def _kernel_path(name: str) -> str:
    if not _plain_relative(name):
        raise ValueError("a kernel file's path leaves its folder")
    if len(name.encode()) > MAX_KERNEL_PATH or any(len(part.encode()) > NAME_MAX for part in name.split("/")):
        raise ValueError(f"a kernel file's path is too long (at most {MAX_KERNEL_PATH} bytes, {NAME_MAX} a name)")
    return name


def _aware_time(text: str) -> str:
    try:
        aware = datetime.fromisoformat(text).tzinfo is not None
    except ValueError:
        aware = False
    if not aware:
        raise ValueError("not an ISO 8601 time with its time zone")
    return text


SHA256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class MadeBy(_Strict):
    """What made an entry (``axes.compile_cache`` writes it): the case (its key), when, its compile time and how many
    graphs it compiled; a record of loaded code carries it."""

    case: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,200}-[0-9a-f]{12}$")
    at: Annotated[str, Field(max_length=64), AfterValidator(_aware_time)]
    compile_s: float = Field(ge=0, le=MAX_COMPILE_S, allow_inf_nan=False)
    graphs_compiled: int = Field(ge=0, le=MAX_GRAPHS)


class EntryFile(_Strict):
    """An entry's ``entry.json`` as read back: untrusted input, as the cache folder may hold anything."""

    format: int
    key: SHA256
    inputs: dict[str, Any]
    bytes: int = Field(ge=0)
    sha256: SHA256
    kernels: dict[Annotated[str, AfterValidator(_kernel_path)], SHA256]
    made_by: MadeBy

    @field_validator("kernels")
    @classmethod
    def _no_file_is_a_folder(cls, kernels: dict[str, str]) -> dict[str, str]:
        clash = sorted(set(kernels) & _parents(kernels))
        if clash:
            raise ValueError(f"{clash[0]!r} is both a kernel file and a folder of others")
        return kernels


def _parents(names: Iterable[str]) -> set[str]:
    """Every folder the paths ``names`` need (``a/b/c`` needs ``a`` and ``a/b``)."""
    parents: set[str] = set()
    for name in names:
        parts = name.split("/")
        parents.update("/".join(parts[:end]) for end in range(1, len(parts)))
    return parents


_JSON_OBJECT: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])


def _invalid(exc: ValidationError) -> str:
    """The first problems of a validation, each where it is (the input left out: it may be anything)."""
    def where(loc: tuple[int | str, ...]) -> str:
        return ".".join(str(part) if len(str(part)) <= 60 else f"{str(part)[:57]}..." for part in loc)

    problems = [f"{where(e['loc'])}: {e['msg']}" if e["loc"] else e["msg"] for e in exc.errors()[:3]]
    more = exc.error_count() - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more else "")


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
    """Write an entry's kernel files into ``folder`` (the case's empty Triton cache folder): files and bytes written;
    StaleEntry when they cannot be written there (what was written stays: the caller empties the folder)."""
    try:
        for name, data in kernels.items():
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    except (OSError, ValueError) as exc:
        raise StaleEntry(f"its kernel files cannot be put in place: {type(exc).__name__}: {exc}") from exc
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


def _read_kernels(archive: zipfile.ZipFile, listed: dict[str, str]) -> dict[str, bytes]:
    """The entry's kernel files, each checked against its listed SHA-256; StaleEntry for any other member."""
    members = {name.removeprefix(KERNELS) for name in archive.namelist() if name.startswith(KERNELS)}
    if members != set(listed):
        raise StaleEntry("its kernel files differ from the files it lists")
    kernels = {}
    for name, digest in listed.items():
        data = archive.read(KERNELS + name)
        if _sha256(data) != digest:
            raise StaleEntry(f"the kernel file {name} differs from its recorded SHA-256")
        kernels[name] = data
    return kernels


def _entry_file(archive: zipfile.ZipFile) -> EntryFile:
    """The entry's ``entry.json``, validated (an entry of another format says so rather than what it lacks)."""
    if archive.getinfo(ENTRY_MEMBER).file_size > MAX_ENTRY_BYTES:
        raise StaleEntry(f"its {ENTRY_MEMBER} is larger than {MAX_ENTRY_BYTES} bytes")
    try:
        raw = _JSON_OBJECT.validate_json(archive.read(ENTRY_MEMBER))  # a parser with a depth limit
        if raw.get("format") != FORMAT:
            raise StaleEntry(f"format {raw.get('format')!r}, not {FORMAT}")
        return EntryFile.model_validate(raw)
    except ValidationError as exc:
        raise StaleEntry(f"its {ENTRY_MEMBER} is not one: {_invalid(exc)}") from exc


def read_entry(path: Path, inputs: dict[str, Any]) -> Entry:
    """The entry at ``path`` if it is whole and made for ``inputs``; StaleEntry otherwise."""
    try:
        with zipfile.ZipFile(path) as archive:
            entry = _entry_file(archive)
            if entry.inputs != json.loads(json.dumps(inputs, sort_keys=True, default=str)):
                raise StaleEntry("made for other inputs than its name says")
            if entry.key != key_of(inputs):
                raise StaleEntry("its key is not the hash of its inputs")
            artifacts = archive.read(BYTES_MEMBER)  # checks the member's CRC
            if _sha256(artifacts) != entry.sha256 or len(artifacts) != entry.bytes:
                raise StaleEntry("its bytes differ from their recorded SHA-256")
            kernels = _read_kernels(archive, entry.kernels)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, RecursionError) as exc:
        raise StaleEntry(f"unreadable: {type(exc).__name__}: {exc}") from exc
    return Entry("hit", artifacts, entry.made_by.model_dump(), kernels)


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
