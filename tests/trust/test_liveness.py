"""No wait for the fork server is unbounded: a server that never answers, is stopped (SIGSTOP) or is killed while a
case runs is given up, the run goes on with fresh interpreters and run.json says why; a case whose server was killed
under it is ``killed``, and multiprocessing never restarts the server behind the run's back."""

from __future__ import annotations

import json
import os
import signal
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from flux2bench import fork_server
from flux2bench.fork_server import ForkServer, _server_pid
from flux2bench.runner import Runner, SupervisorConfig, start_run

TWO_CASES = """
defaults: {model: tiny, device: cpu, resolution: 64, steps: 1, repeats: 1, warmup: 0, timeout_s: 120,
           drift_baseline: "off"}
blocks:
  first: {prompts: "FAULT:pause"}
  second: {prompts: "FAULT:none", steps: 2}
"""


class SilentServer(ForkServer):
    """A server whose imports never end: its probe never answers."""

    def _probe(self, started: float) -> None:
        threading.Event().wait()


@pytest.fixture
def server_killed_at_the_end():
    """A test whose server kills the process's forkserver: afterwards the process's next run starts a new one."""
    yield
    fork_server._SHARED = None


def test_a_server_that_never_answers_is_given_up_after_the_timeout(server_killed_at_the_end):
    server = SilentServer()
    began = time.monotonic()
    state = server.state(timeout_s=0.5)
    assert time.monotonic() - began < 5
    assert state.usable is False and "did not answer within 0.5 s" in state.reason
    assert server.state(timeout_s=0.5) is state  # given up for good, at once


@pytest.fixture
def own_server(tmp_path):
    """A real fork server for a test that stops or kills it: afterwards the process's next run starts a new one."""
    server = ForkServer()
    server.log.attach(tmp_path / "fork-server.log")
    state = server.state()
    assert state.usable, f"{state.reason}\n{(tmp_path / 'fork-server.log').read_text()[-3000:]}"
    yield server
    if server.pid is not None:
        for sig in (signal.SIGKILL, signal.SIGCONT):
            try:
                os.kill(server.pid, sig)
            except ProcessLookupError:
                pass
    fork_server._SHARED = None


def run(tmp_path: Path, fault_worker: str, server: ForkServer, blocks: list[str],
        during: Callable[..., None] = lambda store, cases: None):
    """Run the blocks with ``server`` as the run's fork server, calling ``during(store, cases)`` meanwhile."""
    scenario = tmp_path / "two.yaml"
    scenario.write_text(textwrap.dedent(TWO_CASES))
    store, cases = start_run(scenario, run_dir=tmp_path / "run", blocks=blocks)
    runner = Runner(store, SupervisorConfig(worker_module=fault_worker))
    runner.supervisor.workers.fork_server = server
    watcher = threading.Thread(target=during, args=(store, cases), daemon=True)
    watcher.start()
    results = runner.run(cases)
    watcher.join(timeout=60)
    return store, {r.block: r for r in results}


@pytest.mark.slow  # real fork servers stopped and killed under running cases: 9 s
def test_a_stopped_server_is_killed_and_the_run_goes_on_with_fresh_workers(tmp_path, fault_worker, own_server):
    os.kill(own_server.pid, signal.SIGSTOP)
    began = time.monotonic()
    store, results = run(tmp_path, fault_worker, own_server, ["second"])
    assert time.monotonic() - began < 100  # a fresh interpreter's imports, not the case's timeout
    assert (results["second"].status, results["second"].wall_split.worker_start) == ("ok", "fresh")
    (entry,) = store.meta["fork_server"]
    assert entry["usable"] is False and f"(pid {own_server.pid}) is stopped" in entry["reason"]
    assert "fresh interpreters" in entry["reason"]
    assert _state(own_server.pid) in ("Z", None)  # killed, not left stopped


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


@pytest.mark.slow
def test_a_server_killed_under_a_case_gives_killed_and_the_next_case_starts_fresh(tmp_path, fault_worker,
                                                                                  own_server, monkeypatch):
    monkeypatch.setenv("FAULT_RELEASE_FILE", str(tmp_path / "never"))

    def kill_when_paused(store, cases):
        loads = store.root / "loads" / f"{cases[0].key}.json"
        deadline = time.monotonic() + 60
        while not loads.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(own_server.pid, signal.SIGKILL)

    store, results = run(tmp_path, fault_worker, own_server, ["first", "second"], during=kill_when_paused)
    killed = results["first"]
    assert killed.status == "killed" and killed.wall_split is None
    assert f"the fork server, its parent, (pid {own_server.pid}) ended (killed by SIGKILL)" in killed.reason
    assert (results["second"].status, results["second"].wall_split.worker_start) == ("ok", "fresh")
    (entry,) = store.meta["fork_server"]
    assert entry["usable"] is False and "ended (killed by SIGKILL) while a worker ran" in entry["reason"]
    assert _server_pid() == own_server.pid  # not restarted behind the run's back
    pid = json.loads((store.root / "loads" / f"{cases_key(store, 'first')}.json").read_text())[0]["pid"]
    assert _state(pid) is None  # the worker died with its server


def cases_key(store, block: str) -> str:
    return next(key for key in store.meta["case_keys"] if key.startswith(f"{block}-"))
