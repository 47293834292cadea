"""Reading a history: run directories in order, oldest first, each usable one with what identifies it (start time,
commit, label of the code under test, GPU model, host, library versions), the others skipped with the reason."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from flux2bench.compare import CompareError, load_run, measurement_environment, software_identity
from flux2bench.compare.verdict import plural
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
    # Whether the gate cannot judge the newest runs when this one is among them: a run that could not be used (not
    # a duplicate, whose data the history holds once, nor a folder's entry that is no run at all).
    blocks_gate: bool = False
    scenario: str | None = None  # the run's scenario, where it was skipped as of another scenario than the newest
    newer_runs: int | None = None  # usable runs after it in the history's order; None where its place is unknown

    def among_newest(self, newest: int) -> bool:
        """Whether it would be one of the ``newest`` runs the gate looks at (also when its place is unknown)."""
        return self.blocks_gate and (self.newer_runs is None or self.newer_runs < newest)


class UnusableRun(ValueError):
    """A run directory the history cannot use, with its start time where run.json has one that parses."""

    def __init__(self, reason: str, started: datetime | None):
        super().__init__(reason)
        self.started = started


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


def listed(paths: list[Path]) -> list[Path | Skipped]:
    """The run directories the arguments name, in the order listed: a run directory itself, or each folder inside
    a folder of runs (by name); an argument that is neither is skipped."""
    entries: list[Path | Skipped] = []
    for path in paths:
        if (path / "run.json").exists() or (path / "run.json").is_symlink():
            entries.append(path)
        elif path.is_dir():
            inner = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
            entries += [p if (p / "run.json").exists() else Skipped(str(p), "not a run directory (no run.json)")
                        for p in inner]
            if not inner:
                entries.append(Skipped(str(path), "neither a run directory nor a folder holding any"))
        else:  # named as a run and missing: it may be the run under test
            entries.append(Skipped(str(path), "does not exist" if not path.exists() else "not a run directory",
                                   blocks_gate=True))
    return entries


def _start_or_none(text: Any) -> datetime | None:
    try:
        return _start_time(text)
    except ValueError:
        return None


def read_run(path: Path) -> tuple[HistoryRun, datetime | None]:
    """One run directory, complete and readable, with its start time (None when run.json has none that parses);
    UnusableRun with the reason otherwise."""
    started = None
    try:
        store = RunStore.open(path)
        started = _start_or_none(store.meta.get("created_at"))
        if problems := store.incomplete():
            raise UnusableRun(f"incomplete: {'; '.join(problems)}", started)
        loaded = load_run(path, "history")
    except (OSError, RunDirError, CompareError) as exc:
        raise UnusableRun(f"unreadable: {exc}", started) from None
    meta = store.meta
    label = meta.get("label")
    try:
        label = None if label is None else check_label(label)
    except ValueError as exc:
        raise UnusableRun(f"run.json's label {str(label)[:40]!r}: {exc}", started) from None
    environment = measurement_environment(meta)
    run = HistoryRun(0, path, str(meta.get("run_id") or path.name), str(meta.get("created_at")),
                     Path(str(meta.get("scenario_path") or "unknown")).stem, environment.get("git_commit"),
                     label, environment.get("gpu_name"),
                     host_identity(environment), software_identity(environment), loaded.results)
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
    another scenario than the newest run. Each skipped run that the gate cannot do without is placed: how many
    usable runs follow it in the history's order (``Skipped.newer_runs``)."""
    if order not in ORDERS:
        raise HistoryError(f"order must be one of {', '.join(ORDERS)}, not {order!r}")
    read: list[tuple[HistoryRun, datetime | None, int]] = []  # with its start time and its place in the list
    skipped: list[tuple[Skipped, datetime | None, int]] = []
    for place, entry in enumerate(listed(paths)):
        if isinstance(entry, Skipped):
            skipped.append((entry, None, place))
            continue
        try:
            run, started = read_run(entry)
        except UnusableRun as exc:
            skipped.append((Skipped(str(entry), str(exc).splitlines()[0], blocks_gate=True), exc.started, place))
            continue
        if why := _duplicate(run, [r for r, _, _ in read]):
            skipped.append((Skipped(str(entry), why), started, place))
        elif started is None and order == "time":
            skipped.append((Skipped(str(entry), f"no readable start time in run.json ({run.started}); order the runs "
                                                "with --order given", blocks_gate=True), None, place))
        else:
            read.append((run, started, place))
    if order == "time":
        read.sort(key=lambda item: (item[1], item[0].path.name))
    kept: list[tuple[HistoryRun, datetime | None, int]] = []
    for run, started, place in read:
        if why := _other_scenario(run, read[-1][0]):
            skipped.append((Skipped(str(run.path), why, blocks_gate=True, scenario=run.scenario), started, place))
        else:
            kept.append((run, started, place))

    def newer_runs(path: str, started: datetime | None, place: int) -> int | None:
        if order == "given":
            return sum(place < other for _, _, other in kept)
        if started is None:
            return None
        return sum((started, Path(path).name) < (other, run.path.name) for run, other, _ in kept if other)

    for position, (run, _, _) in enumerate(kept, 1):
        run.position = position
    placed = [replace(s, newer_runs=newer_runs(s.path, started, place)) if s.blocks_gate else s
              for s, started, place in skipped]
    return [run for run, _, _ in kept], placed


def cannot_judge(runs: list[HistoryRun], skipped: list[Skipped], newest: int) -> str | None:
    """Why the gate cannot judge the ``newest`` runs, in one sentence (None when it can): a run that would be among
    them was skipped, or every run before them is of another scenario (nothing to judge them against)."""
    them = "the newest run" if newest == 1 else f"the newest {newest} runs"
    unusable = [f"{s.path} ({s.reason}{'' if s.newer_runs is not None else '; no start time places it'})"
                for s in skipped if s.among_newest(newest)]
    if unusable:
        return (f"The gate looks at {them}, and {'it' if newest == 1 else 'a run among them'} was skipped: "
                f"{'; '.join(unusable)}.")
    if (others := sorted({s.scenario for s in skipped if s.scenario})) and len(runs) <= newest:
        return (f"The gate looks at {them}, and every usable run before {'it' if newest == 1 else 'them'} is of "
                f"another scenario ({', '.join(others)}), without a case key in common with {runs[-1].path} "
                f"({runs[-1].scenario}).")
    return None


def order_warning(runs: list[HistoryRun]) -> str | None:
    """Where runs in the order given contradict their start times (run.json's created_at), in one line; None where
    they do not (``--order given`` is for runs whose clocks cannot be trusted, so this is no error)."""
    timed = [(run, started) for run in runs if (started := _start_or_none(run.started)) is not None]
    against = [(a, b) for (a, ta), (b, tb) in zip(timed, timed[1:]) if tb < ta]
    if not against:
        return None
    (first, later), (latest, at) = against[0], max(timed, key=lambda item: item[1])
    last = _start_or_none(runs[-1].started)
    newest = "" if last == at else f"; the newest as listed is {runs[-1].path}, by start time {latest.path}"
    return (f"--order given contradicts the runs' start times (run.json created_at) at {plural(len(against), 'place')}"
            f": {later.path} (started {later.started}) is listed after {first.path} (started {first.started})"
            f"{newest}")
