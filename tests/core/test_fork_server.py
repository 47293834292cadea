"""Workers start from a fork server that imported torch and diffusers once: each case still in its own process,
with the runner's environment and its own log, and fresh interpreters wherever forking is not safe or not asked."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import subprocess
import sys
import textwrap
import time
import tomllib
from types import SimpleNamespace

import pytest
import torch

from flux2bench import fork_server
from flux2bench.runner import Runner, SupervisorConfig, RunProgress, start_run
from flux2bench.run_options import RunOptions
from flux2bench.fork_server import ForkServer, ServerState, _probe_child, shared_server
from flux2bench.supervision.process import Workers
from flux2bench.store import RunStore

from conftest import REPO

TWO_CASES = """
defaults: {model: tiny, device: cpu, resolution: 64, steps: 1, repeats: 1, warmup: 0, timeout_s: 120,
           prompts: "FAULT:none", drift_baseline: "off"}
blocks:
  first: {}
  second: {steps: 2}
"""


class UnusableServer(ForkServer):
    """A fork server whose probe found that forked workers cannot be used."""

    def _probe(self, started: float) -> None:
        self._state = ServerState(False, None, reason="the probe's CUDA call failed (test)")
        self._done.set()


class ServerThatStops(ForkServer):
    """A fork server that passed its probe and then stopped answering (e.g. the OOM killer took it)."""

    def _probe(self, started: float) -> None:
        self._state = ServerState(True, 1.0, 1.0)
        self._done.set()


def _run(tmp_path, fault_worker, blocks=None, **options):
    scenario = tmp_path / "two.yaml"
    scenario.write_text(textwrap.dedent(TWO_CASES))
    store, cases = start_run(scenario, run_dir=tmp_path / "run", blocks=blocks)
    config = SupervisorConfig(worker_module=fault_worker, **{k: v for k, v in options.items()
                                                            if k not in ("server", "progress")})
    runner = Runner(store, config, progress=options.get("progress"))
    if "server" in options:
        runner.supervisor.workers.fork_server = options["server"]
    return store, runner.run(cases)


def _pids(store: RunStore) -> list[int]:
    return [load["pid"] for path in sorted((store.root / "loads").glob("*.json"))
            for load in json.loads(path.read_text())]


def test_each_case_is_its_own_process_forked_after_one_import_and_the_run_says_so(tmp_path, fault_worker):
    store, results = _run(tmp_path, fault_worker)
    assert [r.status for r in results] == ["ok", "ok"]
    assert [r.wall_split.worker_start for r in results] == ["fork-server", "fork-server"]
    pids = _pids(store)
    assert len(set(pids)) == 2 and not {*pids} & {multiprocessing.current_process().pid}
    assert all(r.wall_split.imports_s < 1.0 for r in results)  # torch and diffusers came with the fork
    (server,) = store.meta["fork_server"]
    assert server["usable"] is True and server["imports_s"] > 0 and server["reason"] is None
    # a forked worker's time to first image counts the server's imports, which a fresh one would have done itself
    assert all(r.latency.time_to_first_image_s > server["imports_s"] for r in results)


@pytest.mark.slow  # a fresh worker imports torch and diffusers
def test_fresh_workers_when_asked(tmp_path, fault_worker):
    store, results = _run(tmp_path, fault_worker, blocks=["first"], worker_start="fresh")  # a fresh one costs 10 s
    assert [r.wall_split.worker_start for r in results] == ["fresh"]
    assert results[0].wall_split.imports_s > 0.5
    assert "fork_server" not in store.meta


@pytest.mark.slow  # a fresh worker imports torch and diffusers
def test_a_fork_server_that_cannot_be_used_gives_fresh_workers_and_the_run_says_why(tmp_path, fault_worker):
    store, results = _run(tmp_path, fault_worker, blocks=["first"], server=UnusableServer())
    assert [r.status for r in results] == ["ok"]
    assert [r.wall_split.worker_start for r in results] == ["fresh"]
    (server,) = store.meta["fork_server"]
    assert server["usable"] is False and server["reason"] == "the probe's CUDA call failed (test)"


@pytest.mark.slow  # a fresh worker imports torch and diffusers
def test_a_fork_server_that_stops_answering_gives_fresh_workers_from_then_on(tmp_path, fault_worker, monkeypatch):
    def refused(**options):
        return SimpleNamespace(start=lambda: (_ for _ in ()).throw(ConnectionRefusedError("no fork server")))

    no_server = SimpleNamespace(Process=refused, set_forkserver_preload=lambda modules: None)
    monkeypatch.setattr(fork_server, "_CONTEXT", no_server)
    store, results = _run(tmp_path, fault_worker, blocks=["first"], server=ServerThatStops())
    assert [(r.status, r.wall_split.worker_start) for r in results] == [("ok", "fresh")]
    (server,) = store.meta["fork_server"]
    assert server["usable"] is False and "stopped answering" in server["reason"]


@pytest.mark.slow  # a fresh worker imports torch and diffusers
def test_a_case_that_waits_for_the_fork_server_says_so_in_its_progress(tmp_path, fault_worker):
    class Slow(UnusableServer):
        def _probe(self, started: float) -> None:
            time.sleep(0.5)
            super()._probe(started)

    stages = []
    progress = RunProgress(on_stage=lambda case, stage: stages.append(stage))
    _run(tmp_path, fault_worker, blocks=["first"], server=Slow(), progress=progress)
    assert stages[0] == "waiting for the fork server's imports"


def test_a_worker_under_a_ram_cap_starts_fresh_so_its_cgroup_is_charged_for_every_page(tmp_path):
    workers = Workers(RunStore(tmp_path))
    assert workers._forks(None, print) is True
    assert workers._forks(tmp_path / "capped", print) is False


def test_the_probe_refuses_a_server_whose_imports_initialised_cuda(monkeypatch):
    receiver, sender = multiprocessing.Pipe(duplex=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    _probe_child(sender)
    found = receiver.recv()
    assert found["usable"] is False and "initialised CUDA in the fork server" in found["reason"]


@pytest.mark.parametrize("text, options", [("blocks: {a: {model: no-such-model}}\n", []),
                                           ("blocks: {a: {model: tiny}}\n", ["--worker-start", "spawn"])])
def test_bad_input_exits_at_once_with_one_line(tmp_path, text, options):
    scenario = tmp_path / "bad.yaml"
    scenario.write_text(text)
    done = subprocess.run([sys.executable, "-m", "flux2bench", "run", str(scenario), "--out", str(tmp_path / "out"),
                           *options], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr + done.stdout
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, forks", [
    (dict(scenario="s.yaml"), True),
    (dict(resume="RUN", blocks=("a",)), True),
    (dict(scenario="s.yaml", worker_start="fresh"), False),
    (dict(scenario="s.yaml", executor=dict(name="ray")), False),
    (dict(resume="RUN", drift_only=True), False),
])
def test_a_run_forks_its_workers_from_the_fork_server_only_on_this_host_and_with_cases_to_measure(options, forks):
    assert RunOptions(**options).forks_workers is forks


def test_the_command_starts_the_fork_server_before_it_imports_torch():
    probe = ("import sys, flux2bench.__main__ as entry, flux2bench.fork_server as fs\n"
             "fs.ForkServer.start = lambda self: print('torch imported:', 'torch' in sys.modules) or sys.exit(0)\n"
             "sys.argv = ['flux2bench', 'run', 'scenario.yaml']\n"
             "entry.main()\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "torch imported: False", done.stdout + done.stderr


def test_ctrl_c_while_the_command_imports_exits_130_with_one_line():
    probe = ("import sys\n"
             "class Interrupting:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'flux2bench.cli': raise KeyboardInterrupt\n"
             "sys.meta_path.insert(0, Interrupting())\n"
             "import flux2bench.__main__ as entry\n"
             "sys.argv = ['flux2bench', 'report', 'RUN']\n"
             "entry.main()\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130
    assert done.stderr.strip() == "interrupted while starting; nothing was run", done.stderr


def test_the_installed_command_is_that_entry():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["flux2bench"] == "flux2bench.__main__:main"


# The fork server's imports on a host that looks like a CUDA host (NVML sees an sm_90 GPU, torch says CUDA is
# there) with CUDA's initialisation refused: the libraries' import-time device checks (torchao's
# is_sm_at_least_100) must be answered without it.
AS_ON_A_CUDA_HOST = """
import sys, types
import torch
nvml = types.ModuleType("pynvml")
nvml.nvmlInit = lambda: None
nvml.nvmlDeviceGetCount = lambda: 1
nvml.nvmlDeviceGetHandleByIndex = lambda index: index
nvml.nvmlDeviceGetCudaComputeCapability = lambda handle: (9, 0)
sys.modules["pynvml"] = nvml
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.version.cuda = "13.0"
def refuse():
    raise RuntimeError("CUDA initialised")
torch.cuda._lazy_init = refuse
import flux2bench.worker_preload as preload
print("imports_s", preload.IMPORT_S, "cuda", preload.CUDA_INITIALISED_AT)
print("bitsandbytes", type(sys.modules.get("bitsandbytes")).__name__)  # its code not run yet
"""


@pytest.mark.slow  # a fresh interpreter imports torch and diffusers
def test_the_preloaded_imports_never_initialise_cuda_on_a_cuda_host():
    done = subprocess.run([sys.executable, "-c", AS_ON_A_CUDA_HOST], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cuda None" in done.stdout
    if importlib.util.find_spec("bitsandbytes") is not None:
        assert "bitsandbytes _OnFirstUse" in done.stdout


def test_the_shared_server_is_one_per_process():
    assert shared_server() is shared_server()


def test_cases_starting_at_once_on_several_devices_attach_the_servers_log_once(tmp_path):
    import threading

    from flux2bench.fork_server_log import ServerLog

    log, path = ServerLog(), tmp_path / "fork-server.log"
    start, failed = threading.Barrier(8), []

    def attach():
        start.wait()
        try:
            log.attach(path)
        except OSError as exc:
            failed.append(exc)

    threads = [threading.Thread(target=attach) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    inode = path.stat().st_ino
    log.attach(path)
    assert failed == [] and log.path == path and path.stat().st_ino == inode
