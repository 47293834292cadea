"""Reading a history: run directories in order, oldest first, each usable one with what identifies it (start time,
commit, label of the code under test, GPU model, host, library versions), the others skipped with the reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from flux2bench.compare import CompareError, identity, load_run, measurement_environment
from flux2bench.results import CaseResult
from flux2bench.run_options import check_label
from flux2bench.store import RunDirError, RunStore

Order = Literal["time", "given"]
ORDERS: tuple[Order, ...] = ("time", "given")


class HistoryError(Exception):
    """Input a history cannot be built from (no usable run, bad options); the message is for the user."""


@dataclass
class HistoryRun:
    """One usable run directory: a point of every series it has a value for."""

    position: int  # 1 is the oldest run of the history
    path: Path
    run_id: str
    started: str  # run.json's created_at
    scenario: str
    commit: str | None  # flux2bench's own git commit (run.json's environment)
    label: str | None  # the code under test, where it is not flux2bench's own (run --label)
    gpu: str | None  # the GPU model of the run's environment (each record names its own as well)
    host: str  # host identity: the --host-label, else the machine id, else CPU model and count
    software: dict[str, Any]  # driver, CUDA and library versions, which compare requires to match
    results: dict[str, CaseResult] = field(repr=False)

    @property
    def code(self) -> str:
        """The code under test in a few characters: its label, else flux2bench's commit."""
        return self.label or (self.commit or "no commit")[:12]


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


def host_identity(environment: dict[str, Any]) -> str:
    """What names a host across runs: the label given to its runs, else its machine id, else its CPU."""
    if environment.get("host_label"):
        return str(environment["host_label"])
    if environment.get("machine_id"):
        return f"machine {str(environment['machine_id'])[:12]}"
    return f"{environment.get('cpu') or 'unknown CPU'} x{environment.get('cpu_count') or '?'}"


def _start_time(text: Any) -> datetime:
    if not isinstance(text, str):
        raise ValueError("no start time (created_at) in run.json")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"run.json's start time {text!r} is not an ISO 8601 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def candidates(paths: list[Path]) -> tuple[list[Path], list[Skipped]]:
    """The run directories the arguments name: a run directory itself, or each folder inside a folder of runs (by
    name); an argument that is neither is skipped."""
    found: list[Path] = []
    skipped: list[Skipped] = []
    for path in paths:
        if (path / "run.json").exists() or (path / "run.json").is_symlink():
            found.append(path)
        elif path.is_dir():
            inner = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
            found += [p for p in inner if (p / "run.json").exists()]
            skipped += [Skipped(str(p), "not a run directory (no run.json)") for p in inner
                        if not (p / "run.json").exists()]
            if not inner:
                skipped.append(Skipped(str(path), "neither a run directory nor a folder holding any"))
        else:
            skipped.append(Skipped(str(path), "does not exist" if not path.exists() else "not a run directory"))
    return found, skipped


def read_run(path: Path) -> tuple[HistoryRun, datetime | None]:
    """One run directory, complete and readable, with its start time (None when run.json has none that parses);
    ValueError with the reason otherwise."""
    try:
        store = RunStore.open(path)
        if problems := store.incomplete():
            raise ValueError(f"incomplete: {'; '.join(problems)}")
        loaded = load_run(path, "history")
    except (OSError, RunDirError, CompareError) as exc:
        raise ValueError(f"unreadable: {exc}") from None
    meta = store.meta
    label = meta.get("label")
    try:
        label = None if label is None else check_label(label)
    except ValueError as exc:
        raise ValueError(f"run.json's label {str(label)[:40]!r}: {exc}") from None
    try:
        started: datetime | None = _start_time(meta.get("created_at"))
    except ValueError:
        started = None
    environment = measurement_environment(meta)
    run = HistoryRun(0, path, str(meta.get("run_id") or path.name), str(meta.get("created_at")),
                     Path(str(meta.get("scenario_path") or "unknown")).stem, environment.get("git_commit"),
                     label, environment.get("gpu_name"),
                     host_identity(environment), identity(environment), loaded.results)
    return run, started


def _duplicate(run: HistoryRun, earlier: list[HistoryRun]) -> str | None:
    for other in earlier:
        if run.path.resolve() == other.path.resolve():
            return f"given twice (also as {other.path})"
        if (run.run_id, run.started) == (other.run_id, other.started):
            return f"a copy of {other.path} (the same run id and start time)"
    return None


def _other_scenario(run: HistoryRun, newest: HistoryRun) -> str | None:
    if run.results.keys() & newest.results.keys():
        return None
    return (f"another scenario ({run.scenario}): no case key in common with the newest run {newest.path} "
            f"({newest.scenario})")


def read_history(paths: list[Path], order: Order = "time") -> tuple[list[HistoryRun], list[Skipped]]:
    """The usable runs, oldest first (by run.json's start time, or in the order given), and the skipped ones with
    the reason: not a run directory, unreadable, incomplete, without a start time (by time), duplicated, or of
    another scenario than the newest run."""
    if order not in ORDERS:
        raise HistoryError(f"order must be one of {', '.join(ORDERS)}, not {order!r}")
    found, skipped = candidates(paths)
    read: list[tuple[HistoryRun, datetime | None]] = []
    for path in found:
        try:
            run, started = read_run(path)
        except ValueError as exc:
            skipped.append(Skipped(str(path), str(exc).splitlines()[0]))
            continue
        if why := _duplicate(run, [r for r, _ in read]):
            skipped.append(Skipped(str(path), why))
        elif started is None and order == "time":
            skipped.append(Skipped(str(path), f"no readable start time in run.json ({run.started}); order the runs "
                                              "with --order given"))
        else:
            read.append((run, started))
    if order == "time":
        read.sort(key=lambda item: (item[1], item[0].path.name))
    runs = [run for run, _ in read]
    kept = []
    for run in runs:
        if why := _other_scenario(run, runs[-1]):
            skipped.append(Skipped(str(run.path), why))
        else:
            kept.append(run)
    for position, run in enumerate(kept, 1):
        run.position = position
    return kept, skipped
