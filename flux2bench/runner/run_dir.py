"""Opening a run directory: a new one for a valid scenario (nothing is created for a bad file), or an existing one
to resume, whose cases come from the scenario text saved with it."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flux2bench import __version__
from flux2bench.case import Case
from flux2bench.scenario import load_cases
from flux2bench.store import RunStore, write_atomic
from flux2bench.trackers.environment import capture_environment


def run_dir_stem(scenario_path: Path) -> str:
    """A new run directory's name before any suffix: the scenario's name and the UTC second the run starts."""
    return f"{scenario_path.stem}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def start_run(scenario_path: str | Path, run_dir: Path | None = None, out_root: str | Path = "reports",
              blocks: list[str] | None = None, host_label: str | None = None,
              label: str | None = None) -> tuple[RunStore, list[Case]]:
    """Validate the scenario, then create the run directory with run.json (nothing is created for a bad file).
    ``host_label`` names this machine in run.json: ``compare`` treats runs of one label as one host; ``label`` names
    the code under test where it is not flux2bench's own (e.g. another repository's commit)."""
    scenario_path = Path(scenario_path)
    cases = load_cases(scenario_path, blocks)
    text = scenario_path.read_text()
    meta: dict[str, Any] = {
        "scenario_path": str(scenario_path),
        "scenario_text": text,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": capture_environment(host_label),
        "case_keys": [c.key for c in load_cases(scenario_path)],
        "flux2bench_version": __version__,
        **({"label": label} if label is not None else {}),
    }
    if run_dir is None:
        store = RunStore.create_unique(Path(out_root), run_dir_stem(scenario_path), meta)
    else:
        store = RunStore.create(run_dir, {**meta, "run_id": Path(run_dir).name})
    write_atomic(store.root / "scenario.yaml", text)
    return store, cases


def resume_run(run_dir: str | Path, blocks: list[str] | None = None,
               host_label: str | None = None) -> tuple[RunStore, list[Case]]:
    """Reopen a run directory; its cases come from the scenario text saved with it."""
    store = RunStore.open(run_dir)
    store.refuse_if_in_use()  # a refused resume writes nothing
    cases = load_cases(store.root / "scenario.yaml", blocks)
    meta = store.meta
    meta["case_keys"] = [c.key for c in load_cases(store.root / "scenario.yaml")]
    meta.setdefault("resumed", []).append({"at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                            "environment": capture_environment(host_label)})
    store.update_meta(meta)
    return store, cases
