"""What ``flux2bench run`` is asked to do: typed, validated once at the edge (the command line builds it), then
passed explicitly to everything that acts on it. Light to import: the command line reads it, and decides on the fork
server, before torch is imported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flux2bench.executors import ExecutorOptions
from flux2bench.fork_server import DEFAULT_START, StartMethod
from flux2bench.scenario_yaml import MAX_CASES

MAX_LABEL = 200


def check_label(label: Any) -> str:
    """A label of the code under test (``run --label``): one line of printable text, at most MAX_LABEL characters;
    ValueError otherwise (also when read back from a run.json)."""
    if not isinstance(label, str) or not label.strip():
        raise ValueError("a label is non-empty text")
    if len(label) > MAX_LABEL or not label.isprintable():
        raise ValueError(f"a label is one line of printable text of at most {MAX_LABEL} characters")
    return label.strip()


class RunOptions(BaseModel):
    """One ``flux2bench run``: a new run of ``scenario``, or the continuation of the run directory ``resume``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scenario: Path | None = Field(None, description="scenario YAML file (omit with --resume)")
    resume: Path | None = Field(None, description="run directory to continue; finished cases are skipped")
    out: Path = Field(Path("runs"), description="folder that receives the new run directory")
    blocks: tuple[str, ...] = Field((), description="run only these blocks; --resume runs the rest later")
    max_cases: int = Field(MAX_CASES, ge=1, description="refuse a scenario that expands to more cases than this "
                                                        "(counted before exclude rules)")
    retry_failed: bool = Field(False, description="with --resume, run again the cases that ended error, timeout "
                                                  "or killed")
    drift_only: bool = Field(False, description="with --resume, run nothing: attach drift to finished cases that "
                                                "lack it (after bringing the images of a run made in parts together)")
    report: bool = Field(True, description="write the report when the run ends")
    profile: bool = Field(False, description="profile every case this run runs, on extra calls after its timed ones: "
                                             "what holds the peak, where a step goes (docs/why.md); as the scenario "
                                             "field profile: true")
    host_label: str | None = Field(None, description="a name for this machine, recorded with the run: compare treats "
                                                     "runs of one label as one host")
    label: str | None = Field(None, description="the code under test where it is not flux2bench's own (e.g. another "
                                                "repository's commit), recorded in run.json for history")
    checkpoints: Path | None = Field(None, description="folder of the on-disk checkpoints of weights: checkpoint "
                                                       "(default: $FLUX2BENCH_CHECKPOINTS, else "
                                                       "~/.cache/flux2bench/checkpoints)")
    cache: Path | None = Field(None, description="folder that keeps prompt embeddings, checkpoints and compiled code "
                                                 "(compile_cache: portable) across runs, keyed by content and library "
                                                 "versions (default: $FLUX2BENCH_CACHE; "
                                                 "none when unset); with --executor ray, each node keeps its own "
                                                 "cache at this path")
    executor: ExecutorOptions = ExecutorOptions()
    worker_start: StartMethod = Field(DEFAULT_START, description="how each case's process starts: fork-server "
                                      "(forked after one import of torch and diffusers per run, before any CUDA call) "
                                      "or fresh (a new interpreter each; always so under a RAM cap and with "
                                      "--executor ray)")

    @model_validator(mode="after")
    def _one_source(self) -> RunOptions:
        if (self.scenario is None) == (self.resume is None):
            raise ValueError("give a scenario file, or --resume RUN_DIR (not both)")
        for given, option in ((self.drift_only, "--drift-only"), (self.retry_failed, "--retry-failed")):
            if given and self.resume is None:
                raise ValueError(f"{option} continues a run: give it with --resume RUN_DIR")
        if self.label is not None and self.resume is not None:
            raise ValueError("--label names the code of a new run; a resumed run keeps the label it was started with")
        return self

    @field_validator("label")
    @classmethod
    def _code_label(cls, value: str | None) -> str | None:
        return None if value is None else check_label(value)

    @field_validator("host_label")
    @classmethod
    def _label(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or not value.isprintable()):
            raise ValueError(f"--host-label {value!r}: give a printable, non-empty name")
        return value

    @property
    def forks_workers(self) -> bool:
        """Whether the run's workers are forked from the fork server: asked for, on this host (Ray starts each case
        in its own actor), and with cases to measure (``--drift-only`` measures none)."""
        return self.worker_start == "fork-server" and self.executor.name == "local" and not self.drift_only
