"""Starting workers without paying their imports each time: multiprocessing's fork server, preloaded with what
every worker imports (``flux2bench.worker_preload``: torch, diffusers, transformers), forks each worker.

A worker's imports take 13.5-22 s on an H200 host, more than the timed images of a small case. The fork server
imports once per run, before any CUDA call, while the runner does its own start-up; each worker is still its own
process, forked from that state, with its own CUDA context, peak counters and session, started only when its case
is due. Before the first worker, a probe forked the same way checks that CUDA is untouched in the server and works in
a child; otherwise (or with ``fresh``) workers start as fresh interpreters, and the run says why.

This module imports nothing but the standard library, so that ``flux2bench run`` can start the server before it
imports torch (``flux2bench.cli.run``).

A worker under a RAM cap always starts fresh: its cgroup must be charged for every page it uses, and pages it would
share with the fork server are charged to the server.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from multiprocessing.reduction import DupFd
from pathlib import Path
from typing import Any, Literal

from flux2bench import child_env

StartMethod = Literal["fork-server", "fresh"]  # how a worker process starts (`run --worker-start`)
START_METHODS: tuple[StartMethod, ...] = ("fork-server", "fresh")
DEFAULT_START: StartMethod = "fork-server"
PRELOAD = "flux2bench.worker_preload"
_PROBE_TIMEOUT_S = 600.0
# Read by torch.cuda.is_available(): count GPUs through NVML instead of initialising CUDA, in the server only.
_NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"
_CONTEXT = multiprocessing.get_context("forkserver")


@dataclass
class ServerState:
    """What the probe found. ``usable``: workers are forked; ``ready_s``: from ``start`` to the probe's answer (the
    server's imports and whatever else the host did meanwhile); ``imports_s``: the imports alone, timed in the
    server; ``reason``: why workers are not forked."""

    usable: bool
    ready_s: float | None
    imports_s: float | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ForkedWorker:
    """A worker forked by the server, with the part of ``subprocess.Popen`` the runner uses."""

    def __init__(self, process: multiprocessing.process.BaseProcess):
        assert process.pid is not None, "a started process"
        self._process = process
        self.pid: int = process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self) -> int | None:
        self._process.join()
        return self._process.exitcode


class ForkServer:
    """One per process (``shared_server``): ``start()`` at the beginning of a run, ``state()`` before the first
    worker, ``spawn`` for each."""

    def __init__(self) -> None:
        self.log = Path(tempfile.gettempdir()) / f"flux2bench-fork-server-{os.getpid()}.log"
        self._state: ServerState | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the server (if this process has none yet) and probe it in the background."""
        if self._thread is not None:
            return
        _CONTEXT.set_forkserver_preload([PRELOAD])
        started = time.perf_counter()
        # Inherited by the server only: workers get the runner's environment.
        server_only = {_NVML_CHECK: "1", child_env.FORK_SERVER_LOG: str(self.log)}
        previous = {name: os.environ.get(name) for name in server_only}
        os.environ.update(server_only)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            for name, value in previous.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value
        self._thread = threading.Thread(target=self._probe, args=(started,), daemon=True)
        self._thread.start()

    def answered(self) -> bool:
        """Whether the probe has answered (``state`` then returns at once)."""
        return self._done.is_set()

    def state(self) -> ServerState:
        """Wait for the probe (started here if it was not); what it found."""
        self.start()
        self._done.wait()
        assert self._state is not None
        return self._state

    def _probe(self, started: float) -> None:
        try:
            receiver, sender = _CONTEXT.Pipe(duplex=False)
            # a daemon: a runner that exits early (bad input, nothing to run) does not wait for it
            process = _CONTEXT.Process(target=_probe_child, args=(sender,), name="flux2bench-probe", daemon=True)
            process.start()
            sender.close()
            process.join(_PROBE_TIMEOUT_S)
            if process.exitcode is None:
                process.kill()
                process.join()
            try:
                found = receiver.recv()  # the probe has ended: its answer, or EOF
            except EOFError:
                found = {"usable": False, "reason": f"the probe ended with exit code {process.exitcode} without an "
                                                    f"answer (the server's output: {self.log})"}
            self._state = ServerState(found["usable"], time.perf_counter() - started, found.get("imports_s"),
                                      found.get("reason"))
        except Exception as exc:  # noqa: BLE001 - any failure means fresh workers, with the reason recorded
            self._state = ServerState(False, None, reason=f"the fork server could not start: {exc!r}")
        finally:
            self._done.set()

    def _stopped(self, exc: BaseException) -> None:
        known = self._state or ServerState(True, None)
        self._state = ServerState(False, known.ready_s, known.imports_s, f"the fork server stopped answering: {exc!r}")

    def spawn(self, module: str, argv: list[str], env: dict[str, str], log: Path,
              events_fd: int | None) -> ForkedWorker | None:
        """Fork a worker running ``module.main(argv)`` in a new session, with ``env`` as its whole environment and
        its output in ``log``; ``events_fd`` becomes the child's ``FLUX2BENCH_EVENTS_FD``. None when the server is
        gone (e.g. killed by the kernel's OOM killer): the server is then unusable for the rest of the run, and says
        why."""
        with open(log, "wb") as out:
            fds = (_Fd(out.fileno()), None if events_fd is None else _Fd(events_fd))
            process = _CONTEXT.Process(target=_worker_child, args=(module, argv, env, *fds),
                                       name=f"flux2bench-worker-{log.stem}")
            try:
                process.start()
            except (OSError, EOFError) as exc:
                self._stopped(exc)
                return None
        return ForkedWorker(process)


class _Fd:
    """A file descriptor handed to a forked child: sent with the fork request, an int again in the child."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        return _received, (DupFd(self.fd),)  # pickled while the child is being started: the fd goes with it


def _received(dup: Any) -> int:
    return int(dup.detach())


_SHARED: ForkServer | None = None
_SHARED_GUARD = threading.Lock()


def shared_server() -> ForkServer:
    """This process's fork server (multiprocessing keeps one per process)."""
    global _SHARED
    with _SHARED_GUARD:
        if _SHARED is None:
            _SHARED = ForkServer()
        return _SHARED


def _probe_child(sender: Any) -> None:
    """In a child of the server: is CUDA untouched there, and does it work here?"""
    import torch

    from flux2bench import worker_preload

    found: dict[str, Any] = {"usable": True, "imports_s": worker_preload.IMPORT_S}
    if torch.cuda.is_initialized() or torch.cuda._is_in_bad_fork():
        found |= {"usable": False, "reason": "importing the worker's libraries initialised CUDA in the fork server (at "
                                             f"{worker_preload.CUDA_INITIALISED_AT or 'a place not noted'})"}
    elif torch.cuda.is_available():
        try:
            torch.zeros(1, device="cuda").add_(1)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - recorded as the reason
            found |= {"usable": False, "reason": f"CUDA fails in a forked child: {exc}"}
    try:
        sender.send(found)
    except OSError:  # the runner is gone (e.g. it exited on bad input before the probe answered)
        pass


def _worker_child(module: str, argv: list[str], env: dict[str, str], log_fd: int, events_fd: int | None) -> None:
    """In a child of the server: become what ``python -m module argv`` started by the runner would be."""
    os.setsid()  # its own session and process group, killed as one
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    os.environ.clear()
    os.environ.update(env)
    if events_fd is not None:
        os.environ[child_env.EVENTS_FD] = str(events_fd)
    # The server is this worker's parent: the worker dies with it, and the server ends when the runner does.
    os.environ[child_env.PARENT_PID] = str(os.getppid())
    for entry in reversed(env.get("PYTHONPATH", "").split(os.pathsep)):
        if entry and entry not in sys.path:
            sys.path.insert(0, entry)
    if threads := env.get("OMP_NUM_THREADS"):  # read by OpenMP when torch was imported in the server
        import torch

        torch.set_num_threads(int(threads))
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.argv = [module, *argv]
    sys.exit(importlib.import_module(module).main(argv))
