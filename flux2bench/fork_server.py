"""Starting workers without paying their imports each time: multiprocessing's fork server, preloaded with what
every worker imports (``flux2bench.worker_preload``: torch, diffusers, transformers), forks each worker.

A worker's imports take 13.5-22 s on an H200 host, more than the timed images of a small case. The fork server
imports once per run, before any CUDA call, while the runner does its own start-up; each worker is still its own
process, forked from that state, with its own CUDA context, peak counters and session, started only when its case
is due. Before the first worker, a probe forked the same way checks that CUDA is untouched in the server and works in
a child; otherwise (or with ``fresh``) workers start as fresh interpreters, and the run says why.

This module imports nothing but the standard library, so that ``flux2bench run`` can start the server before it
imports torch (``flux2bench.cli.run``).

The server is never trusted to answer: every wait for it has a timeout (its probe, each fork), and a server that is
stopped, hangs or ends is killed and replaced by fresh interpreters for the rest of the run, with the reason kept for
``run.json``; multiprocessing never restarts it behind the run's back. A worker whose server ended while it ran
died with it (its parent-death signal), which its case records as ``killed``. The server's own output goes through
a pipe to the runner, which writes it into the run directory (``logs/fork-server.log``) once there is one: nothing of
it is a file outside the run directory, and it takes no variable from the caller's environment.

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
import threading
import time
from contextlib import suppress
from dataclasses import asdict, dataclass
from multiprocessing.reduction import DupFd
from pathlib import Path
from typing import Any, Callable, Literal

from flux2bench import child_env
from flux2bench.fork_server_log import LOG_NAME, ServerLog
from flux2bench.safe_files import open_fresh

StartMethod = Literal["fork-server", "fresh"]  # how a worker process starts (`run --worker-start`)
DEFAULT_START: StartMethod = "fork-server"
PRELOAD = "flux2bench.worker_preload"
_PROBE_TIMEOUT_S = 600.0
SPAWN_TIMEOUT_S = 60.0  # a fork takes milliseconds; a server that has not forked in this long is stuck
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
    """A worker forked by the server, with the part of ``subprocess.Popen`` the runner uses. Its exit status comes
    from the server: a server that ended or stopped is given up (``ended_with_server`` says how the worker ended)."""

    def __init__(self, process: multiprocessing.process.BaseProcess, server: ForkServer):
        assert process.pid is not None, "a started process"
        self._process = process
        self._server = server
        self.pid: int = process.pid
        self.ended_with_server: str | None = None

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        code = self._process.exitcode
        gone = self._server.gone() if code in (None, 255) else None
        if gone is not None:
            self.ended_with_server = self.ended_with_server or f"the fork server, its parent, {gone}"
            self._server.give_up(f"the fork server {gone} while a worker ran; the cases after it started as fresh "
                                 "interpreters", kill=True)
            _kill_group(self.pid)
            code = self._process.exitcode if code is None else code
        return code

    def wait(self) -> int | None:
        while self.poll() is None:
            self._process.join(0.2)
        return self._process.exitcode


def _kill_group(pid: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _process_end(pid: int) -> str | None:
    """How the process ``pid`` (a child of this one, never reaped here) stands: None while it runs; "is stopped",
    "ended (...)" otherwise, from Linux's /proc (where there is none, None)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return "ended" if Path("/proc/self/stat").exists() else None
    except (OSError, IndexError):
        return None
    state = fields[0]
    if state in ("T", "t"):
        return "is stopped (SIGSTOP or a debugger)"
    if state not in ("Z", "X", "x"):
        return None
    code = os.waitstatus_to_exitcode(int(fields[-1])) if fields[-1].isdigit() else None
    how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
           else f"exit code {code}" if code is not None else "how is not known")
    return f"ended ({how})"


class ForkServer:
    """One per process (``shared_server``): ``start()`` at the beginning of a run, ``state()`` before the first
    worker, ``spawn`` for each."""

    def __init__(self) -> None:
        self.log = ServerLog()
        self.pid: int | None = None
        self._state: ServerState | None = None
        self._settled = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the server (if this process has none yet) and probe it in the background."""
        if self._thread is not None:
            return
        _CONTEXT.set_forkserver_preload([PRELOAD])
        started = time.perf_counter()
        # Inherited by the server only: workers get the environment the runner gives them.
        server_only = {_NVML_CHECK: "1", child_env.FORK_SERVER_LOG: self.log.address()}
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
        self.pid = _server_pid()
        self._thread = threading.Thread(target=self._probe, args=(started,), daemon=True)
        self._thread.start()

    def answered(self) -> bool:
        """Whether the probe has answered (``state`` then returns at once)."""
        return self._done.is_set()

    def state(self, timeout_s: float = _PROBE_TIMEOUT_S) -> ServerState:
        """What the probe found (it is started here if it was not), waiting for it at most ``timeout_s``: a server
        that has not answered by then, or that has stopped or ended since, is given up (fresh workers)."""
        self.start()
        if not self._done.wait(timeout_s):
            self.give_up(f"the fork server did not answer within {timeout_s:g} s (its imports or its probe hung)",
                         kill=True)
        elif self._state is not None and self._state.usable and (gone := self.gone()):
            self.give_up(f"the fork server {gone}; the cases after it started as fresh interpreters", kill=True)
        assert self._state is not None
        return self._state

    def gone(self) -> str | None:
        """Why the server can no longer fork (stopped, ended, replaced), or None while it runs."""
        if self.pid is None:
            return None
        if _server_pid() != self.pid:
            return f"(pid {self.pid}) ended and was replaced"
        end = _process_end(self.pid)
        return None if end is None else f"(pid {self.pid}) {end}"

    def give_up(self, reason: str, kill: bool = False) -> None:
        """No worker is forked from now on, for ``reason`` (kept for run.json); with ``kill``, a server that is stuck
        or stopped is killed, so that nothing waits on it any longer (its forked workers die with it)."""
        with self._settled:
            if self._state is not None and not self._state.usable:
                return
            known = self._state or ServerState(False, None)
            self._state = ServerState(False, known.ready_s, known.imports_s, reason)
        if kill and self.pid is not None and _server_pid() == self.pid:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5.0  # ended before anything asks multiprocessing whether it still runs
            while not (_process_end(self.pid) or "").startswith("ended") and time.monotonic() < deadline:
                time.sleep(0.01)
        self._done.set()

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
                                                    f"answer (the server's output: logs/{LOG_NAME})"}
            self._settle(ServerState(found["usable"], time.perf_counter() - started, found.get("imports_s"),
                                     found.get("reason")))
        except Exception as exc:  # noqa: BLE001 - any failure means fresh workers, with the reason recorded
            self._settle(ServerState(False, None, reason=f"the fork server could not start: {exc!r}"))
        finally:
            self._done.set()

    def _settle(self, state: ServerState) -> None:
        with self._settled:
            if self._state is None:  # a server given up meanwhile stays given up
                self._state = state

    def spawn(self, module: str, argv: list[str], env: dict[str, str], log: Path, events_fd: int | None,
              timeout_s: float = SPAWN_TIMEOUT_S) -> ForkedWorker | None:
        """Fork a worker running ``module.main(argv)`` in a new session, with ``env`` as its whole environment and
        its output in ``log``; ``events_fd`` becomes the child's ``FLUX2BENCH_EVENTS_FD``. None when the server is
        gone (e.g. killed by the kernel's OOM killer), stopped, or has not forked within ``timeout_s``: the server is
        then given up for the rest of the run, and says why."""
        fresh = "the cases after it started as fresh interpreters"
        if gone := self.gone():
            self.give_up(f"the fork server {gone}; {fresh}", kill=True)
            return None
        out = open_fresh(log)
        try:
            fds = (_Fd(out), None if events_fd is None else _Fd(events_fd))
            process = _CONTEXT.Process(target=_worker_child, args=(module, argv, env, *fds),
                                       name=f"flux2bench-worker-{log.stem}")
            failure = _start_within(process, min(timeout_s, SPAWN_TIMEOUT_S),
                                    lambda why: self.give_up(f"the fork server {why}; {fresh}", kill=True))
        finally:
            os.close(out)
        if failure is None and _server_pid() != self.pid:  # multiprocessing restarted a server that had ended
            failure = f"(pid {self.pid}) ended, and multiprocessing started another (pid {_server_pid()}) unasked"
            for pid, kill in ((process.pid, _kill_group), (_server_pid(), lambda pid: os.kill(pid, signal.SIGKILL))):
                with suppress(ProcessLookupError, PermissionError, TypeError):
                    kill(pid)
        if failure is not None:
            self.give_up(f"the fork server {failure}; {fresh}")
            return None
        return ForkedWorker(process, self)


def _server_pid() -> int | None:
    return multiprocessing.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]


def _start_within(process: multiprocessing.process.BaseProcess, timeout_s: float,
                  stuck: Callable[[str], None]) -> str | None:
    """Start ``process`` through the server, waiting at most ``timeout_s``; None when it started, else why not. A
    start still blocked then is handed to ``stuck`` (which kills the server, releasing it)."""
    done = threading.Event()
    failure: list[BaseException] = []

    def start() -> None:
        try:
            process.start()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=start, name="flux2bench-fork", daemon=True).start()
    if not done.wait(timeout_s):
        why = f"did not fork a worker within {timeout_s:g} s"
        stuck(why)
        done.wait(5.0)  # released by the kill: its descriptors are no longer in use
        return why
    if failure:
        if not isinstance(failure[0], (OSError, EOFError)):
            raise failure[0]
        return f"stopped answering: {failure[0]!r}"
    return None


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
