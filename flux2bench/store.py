"""The run directory: ``run.json`` plus one durable record per finished case.

A run directory holds ``run.json`` (the scenario, the environment, when it started) and one
``results/<case key>.json`` per finished case, each written atomically (temporary file, fsync, rename), so that a
crash or ``kill -9`` of the runner never leaves a truncated record. A record that does not parse (written by hand,
damaged on disk) is not a finished case: the runner moves it to ``invalid/`` and runs the case again. One runner at
a time holds a run directory (``.lock``), and every file a record names is resolved inside the directory.

Nothing in a run directory can redirect a write: every file the store writes is created without following a link
(a temporary with ``O_EXCL | O_NOFOLLOW``, then renamed over the target), and a run directory that holds a link, or
a folder where a file belongs (or the reverse), is refused before anything is written.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Iterator

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from flux2bench.record_checks import Machines, first_problem, machine_problems
from flux2bench.case import DRIFT_BASELINE_SUFFIX
from flux2bench.results import CaseResult
from flux2bench.safe_files import open_lock, open_new, read_regular, write_atomic

__all__ = ["LOCK_FILE", "Records", "RunDirError", "RunMeta", "RunStore", "inside", "open_new", "rank_suffix",
           "read_record", "write_atomic"]

LOCK_FILE = ".lock"
# What the store expects in a run directory: these names are files, these folders.
STORE_FILES = ("run.json", "scenario.yaml", LOCK_FILE)
STORE_FOLDERS = ("results", "tmp", "invalid", "timelines", "locks")
RUN_DIR_NAME_ATTEMPTS = 1000


# Bounds on what is read back: a run.json holds the scenario and the environment, a record its raw samples.
MAX_RUN_JSON_BYTES = 64 * 2**20
MAX_RECORD_BYTES = 64 * 2**20


class RunDirError(Exception):
    """A run directory that cannot be used as asked; the message is for the user."""


class _Read(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


# A size in GiB read back: a JSON number (not a string or a boolean), finite and above zero.
_GiB = Annotated[float | None, Field(gt=0, strict=True)]


def _iso_time(text: str | None) -> str | None:
    if text is not None:
        try:
            datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an ISO 8601 time") from None
    return text


class _Gpu(_Read):
    name: str | None = None
    memory_gib: _GiB = None


# A bandwidth read back: a JSON number, finite and above zero.
_GiBPerS = Annotated[float, Field(gt=0, strict=True)]


class _HostToDevice(_Read):
    method: str | None = None
    pageable_gib_s: _GiBPerS | None = None
    pinned_gib_s: _GiBPerS | None = None
    pageable_samples_gib_s: list[_GiBPerS] = []
    pinned_samples_gib_s: list[_GiBPerS] = []


class _Environment(_Read):
    gpu_name: str | None = None
    gpu_memory_gib: _GiB = None
    gpus: list[_Gpu] = []
    host_ram_gib: _GiB = None
    host_label: str | None = None
    versions: dict[str, str | None] = {}
    host_to_device: _HostToDevice | None = None


class _Node(_Read):
    environment: _Environment | None = None


class _Session(_Read):
    environment: _Environment | None = None


class _ForkServerEntry(_Read):
    usable: bool | None = None
    imports_s: float | None = Field(None, ge=0)
    ready_s: float | None = Field(None, ge=0)
    reason: str | None = None


class RunMeta(_Read):
    """What the commands read back from ``run.json``, validated like user input (types, finite numbers, sizes above
    zero, the start an ISO 8601 time); other fields are kept as written."""

    run_id: str | None = None
    created_at: Annotated[str | None, AfterValidator(_iso_time)] = None
    scenario_path: str | None = None
    scenario_text: str | None = None
    flux2bench_version: str | None = None
    case_keys: list[str] = []
    environment: _Environment | None = None
    nodes: dict[str, _Node] | None = None
    resumed: list[_Session] = []
    fork_server: list[_ForkServerEntry] = []


def writable_folder_problem(folder: Path, option: str) -> str | None:
    """Why no file can be made in ``folder`` (created if missing), or None."""
    existing = next(f for f in (folder, *folder.parents) if f.exists())
    if not existing.is_dir():
        return f"{option} {folder}: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{option} {folder}: {existing} cannot be written"
    return None


def rank_suffix(rank: int) -> str:
    """Rank 0's files keep the case's own names; the other ranks' of a multi-GPU case carry their rank."""
    return f".rank{rank}" if rank else ""


def inside(root: Path, name: str) -> Path:
    """``root / name``, refused (ValueError) when it resolves outside ``root`` (an absolute path, ``..``, a link)."""
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ValueError(f"{name!r} is outside the run directory {root}")
    return path


@dataclass
class Records:
    """The records of a run directory: those that parse, by key, and those that do not, with the reason."""

    valid: dict[str, CaseResult] = field(default_factory=dict)
    invalid: dict[Path, str] = field(default_factory=dict)


class RunStore:
    """A run directory: ``run.json`` plus one durable record per finished case."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    def subdir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or not path.is_dir():
            raise RunDirError(f"{path} is not a folder; the run directory {self.root} is damaged")
        return path

    def check_layout(self) -> None:
        """Refuse a run directory that holds a link anywhere, or a folder where the store writes a file (or the
        reverse): writing into it could land outside the directory or destroy what is not the run's."""
        for name in (*STORE_FILES, *STORE_FOLDERS):
            path = self.root / name
            if path.is_symlink():
                raise RunDirError(f"{path} is a link; a run directory holds only its own files, so this one is "
                                  "refused (replace the link by the file it points to, or remove it)")
            if name in STORE_FILES and path.exists() and not path.is_file():
                raise RunDirError(f"{path} is not a file; the run directory {self.root} is damaged")
            if name in STORE_FOLDERS and path.exists() and not path.is_dir():
                raise RunDirError(f"{path} is not a folder; the run directory {self.root} is damaged")
        for folder, dirs, files in os.walk(self.root):
            for name in dirs + files:
                if os.path.islink(os.path.join(folder, name)):
                    raise RunDirError(f"{os.path.join(folder, name)} is a link; a run directory holds only its own "
                                      "files, so this one is refused (replace the link by the file, or remove it)")

    def path(self, name: str) -> Path:
        """A file a record names, resolved inside the run directory."""
        return inside(self.root, name)

    @classmethod
    def create(cls, root: str | Path, meta: dict[str, Any]) -> RunStore:
        store = cls(root)
        store.results_dir.mkdir(parents=True, exist_ok=False)  # exclusive: two runs never share a directory
        store.update_meta(meta)
        return store

    @classmethod
    def create_unique(cls, parent: Path, stem: str, meta: dict[str, Any]) -> RunStore:
        """A new run directory ``parent/stem``, else ``stem-2``, ``stem-3``...: the first name no other run took,
        also when runs start at once (each name is taken by an exclusive mkdir); ``meta['run_id']`` is its name."""
        for n in range(1, RUN_DIR_NAME_ATTEMPTS + 1):
            root = parent / (stem if n == 1 else f"{stem}-{n}")
            parent.mkdir(parents=True, exist_ok=True)
            try:
                root.mkdir()  # exclusive: the first run to make it owns it
            except FileExistsError:
                continue
            return cls.create(root, {**meta, "run_id": root.name})
        raise RunDirError(f"{parent}: {RUN_DIR_NAME_ATTEMPTS} run directories named {stem}* already exist")

    @classmethod
    def open(cls, root: str | Path) -> RunStore:
        store = cls(root)
        if not store.root.exists():
            raise FileNotFoundError(f"{store.root}: no such directory")
        if not (store.root / "run.json").exists() and not (store.root / "run.json").is_symlink():
            runs = sorted(p.parent for p in store.root.glob("*/run.json")) if store.root.is_dir() else []
            inside = f"; it holds run directories, e.g. {runs[-1]}" if runs else ""
            raise FileNotFoundError(f"{store.root} is not a flux2bench run directory (no run.json){inside}")
        store.check_layout()
        store.meta  # noqa: B018 - fails early, with the reason, on a damaged run.json
        return store

    def owns(self, path: Path) -> bool:
        """Whether ``path`` is one of the run directory's own files (or inside one of its folders), which no
        command but the store may write."""
        try:
            relative = path.resolve().relative_to(self.root.resolve())
        except ValueError:
            return False
        return bool(relative.parts) and (len(relative.parts) > 1 or path.exists() or relative.parts[0] in STORE_FILES)

    @property
    def meta(self) -> dict[str, Any]:
        """``run.json``, checked by ``RunMeta``; a damaged one is a RunDirError naming the field."""
        path = self.root / "run.json"
        try:
            meta = json.loads(read_regular(path, MAX_RUN_JSON_BYTES))
        except RecursionError:
            raise RunDirError(f"{path}: unreadable run description (nested too deeply)") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise RunDirError(f"{path}: unreadable run description ({exc})") from None
        if not isinstance(meta, dict):
            raise RunDirError(f"{path}: expected a JSON object")
        try:
            RunMeta.model_validate(meta)
        except ValidationError as exc:
            raise RunDirError(f"{path}: invalid run description: {first_problem(exc)}") from None
        return meta

    def update_meta(self, meta: dict[str, Any]) -> None:
        write_atomic(self.root / "run.json", json.dumps(meta, indent=1, sort_keys=True, default=str))

    def put_file(self, name: str, data: bytes) -> Path:
        """Write a file a worker made elsewhere (another node) at ``name`` inside the run directory, atomically and
        without following a link: the name comes from the node, so a link in its place is replaced, its folder must
        lie inside the run directory, and the store's own files are refused."""
        relative = Path(name)
        folder = inside(self.root, str(relative.parent))
        path = folder / relative.name
        if relative.name in ("", ".", "..") or path.parent == self.root.resolve() and relative.name in STORE_FILES:
            raise ValueError(f"{name!r} is not a file a node may write in the run directory {self.root}")
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
        return path

    def write(self, result: CaseResult) -> Path:
        path = self.subdir("results") / f"{result.key}.json"
        write_atomic(path, result.to_json())
        return path

    def machines(self) -> Machines:
        """The machines run.json lists, which bound the peaks of the run's records (none before it is written)."""
        if not (self.root / "run.json").exists():
            return Machines()
        return Machines.of(self.meta)

    def records(self) -> Records:
        """Every record of ``results/``: valid, or set aside (not moved) with the reason it is not (the reasons of
        ``read_record``, or a peak above the memory of the machines run.json lists)."""
        records = Records()
        machines = self.machines()
        case_keys = self.meta.get("case_keys", []) if (self.root / "run.json").exists() else []
        for path in sorted(self.results_dir.glob("*.json")):
            try:
                record = read_record(path)
                if problem := foreign_problem(record, case_keys) or next(iter(machine_problems(record, machines)),
                                                                          None):
                    raise ValueError(problem)
            except (OSError, ValueError) as exc:
                records.invalid[path] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                continue
            records.valid[record.key] = record
        return records

    def incomplete(self) -> list[str]:
        """Why the run directory does not hold a result for every case of its scenario, one line each (none when
        complete): cases without a record, records set aside as invalid, cases this machine could not run."""
        records = self.records()
        lines = []
        missing = [key for key in self.meta.get("case_keys", []) if key not in records.valid]
        if missing:
            lines.append(f"{len(missing)} case(s) without a result: {', '.join(missing)}")
        set_aside = dict(sorted(records.invalid.items()))
        for path in sorted((self.root / "invalid").glob("*.json")):
            try:
                set_aside[path] = read_regular(path.with_suffix(".reason"), 4096).decode(errors="replace").strip()
            except (OSError, ValueError):  # set aside by an earlier version, without its reason
                set_aside[path] = None
        if set_aside:
            lines.append(f"{len(set_aside)} record(s) set aside as invalid: " + ", ".join(
                f"{path.relative_to(self.root)}" + (f" ({reason})" if reason else "")
                for path, reason in set_aside.items()))
        lacking = [key for key, record in records.valid.items() if record.machine_lacks]
        if lacking:
            lines.append(f"{len(lacking)} case(s) the machine could not run (not a result about the setup): "
                         f"{', '.join(lacking)}")
        return lines

    def completed_keys(self) -> set[str]:
        return set(self.records().valid)

    def results(self) -> list[CaseResult]:
        """The valid records, in the order the scenario listed the cases (the order of run.json's case keys)."""
        order = {key: i for i, key in enumerate(self.meta.get("case_keys", []))}
        return sorted(self.records().valid.values(), key=lambda r: (order.get(r.key, len(order)), r.key))

    def set_aside_invalid(self) -> dict[Path, str]:
        """Move invalid records to ``invalid/`` (so that their cases run again), each beside a ``.reason`` file;
        a name already there is kept, the newcomer takes the next free one. Returns where each went, with the
        reason."""
        moved = {}
        for path, reason in self.records().invalid.items():
            target = _move_to_free_name(path, self.subdir("invalid"))
            write_atomic(target.with_suffix(".reason"), reason + "\n")
            moved[target] = reason
        return moved

    def refuse_if_in_use(self) -> None:
        """RunDirError when another runner holds the run directory; decided before a command writes anything."""
        if not (self.root / LOCK_FILE).exists():
            return
        with self.locked(note_holder=False):
            pass

    def clean_tmp(self) -> None:
        """Remove what workers of an interrupted run left in ``tmp/``."""
        self.check_layout()
        shutil.rmtree(self.root / "tmp", ignore_errors=True)

    @contextmanager
    def locked(self, note_holder: bool = True) -> Iterator[None]:
        """Hold the run directory for this process; a second runner is refused with the holder's PID (written into
        the lock with ``note_holder``)."""
        path = self.root / LOCK_FILE
        try:
            fd = open_lock(path)
        except OSError as exc:
            raise RunDirError(f"{path}: cannot be used as the run's lock file ({exc.strerror}); a run directory's "
                              ".lock is a plain file") from None
        with os.fdopen(fd, "r+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "unknown"
                raise RunDirError(f"{self.root} is in use by another flux2bench run (pid {holder}); wait for it to "
                                  "end, or stop it") from None
            if not note_holder:
                yield
                return
            lock.seek(0)
            lock.truncate()
            lock.write(str(os.getpid()))
            lock.flush()
            try:
                yield
            finally:
                lock.truncate(0)


def foreign_problem(record: CaseResult, case_keys: list[str]) -> str | None:
    """Why a record is not one of the run's cases (run.json's ``case_keys``), nor the drift baseline the runner
    added for one of its blocks (block ``<block>.baseline``), or None; no case keys check nothing."""
    if not case_keys or record.key in case_keys:
        return None
    blocks = {key.rsplit("-", 1)[0] for key in case_keys}
    if record.block.endswith(DRIFT_BASELINE_SUFFIX) and record.block.removesuffix(DRIFT_BASELINE_SUFFIX) in blocks:
        return None
    return (f"case {record.key} is not one of the run's (run.json's case_keys), nor a drift baseline of one of "
            "its blocks")


def read_record(path: Path) -> CaseResult:
    """The record in ``path``; ValueError (with the reason) when it is not one: not a file of its own, not a record,
    numbers that cannot be (``CaseResult.from_json``), or a key that is not its file name. The one rule for every
    command that reads records (run, report, export, compare)."""
    if path.is_symlink():
        raise ValueError("the record is a link, not a file")
    try:
        record = CaseResult.from_json(read_regular(path, MAX_RECORD_BYTES).decode())
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc.reason})") from None
    if record.key != path.stem:
        raise ValueError(f"the record's key {record.key!r} is not its file name")
    return record


def _move_to_free_name(path: Path, folder: Path) -> Path:
    """Move ``path`` into ``folder`` under its name, else ``<stem>-2``, ``-3``...: never over a file already there
    (a link then an unlink, which fails rather than replace)."""
    for n in range(1, RUN_DIR_NAME_ATTEMPTS + 1):
        target = folder / (path.name if n == 1 else f"{path.stem}-{n}{path.suffix}")
        try:
            os.link(path, target, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError:  # a file system without hard links: the name is checked, then taken by a rename
            if target.exists() or target.is_symlink():
                continue
            os.rename(path, target)
            return target
        os.unlink(path)
        return target
    raise RunDirError(f"{folder}: {RUN_DIR_NAME_ATTEMPTS} invalid records named {path.stem}* are already there")
