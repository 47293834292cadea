"""The fork server's own output (its imports' warnings, a failed probe's traceback): a pipe from the server to the
runner, written into the run directory once there is one. Standard library only, like ``fork_server``.

The server is started before the run directory exists (``flux2bench.__main__``), so its output cannot go to a file
there at first; it is never a file elsewhere either (a name in ``$TMPDIR`` could be planted, and would be left
behind). The server opens the runner's end of the pipe through ``/proc/<runner>/fd/<fd>``, named by a variable
which the runner sets for the server alone (``child_env.FORK_SERVER_LOG``).
"""

from __future__ import annotations

import os
import stat
import threading
from contextlib import suppress
from pathlib import Path

from flux2bench.safe_files import open_fresh

LOG_NAME = "fork-server.log"  # in the run directory's logs/
_BUFFER_BYTES = 2**20


class ServerLog:
    """The fork server's own output (its imports' warnings) through a pipe that this process drains: kept in memory
    (its last MiB) until ``attach`` names its file in a run directory, then written there."""

    def __init__(self) -> None:
        self._write: int | None = None
        self._buffer = bytearray()
        self._file: int | None = None
        self.path: Path | None = None
        self._guard = threading.Lock()
        self._attaching = threading.Lock()  # cases on several devices start at once, each attaching the same file

    def address(self) -> str:
        """How the server opens the pipe's writing end: this process's id and the descriptor's number (the pipe is
        made, and drained, from the first call)."""
        if self._write is None:
            read, self._write = os.pipe()
            threading.Thread(target=self._drain, args=(read,), name="flux2bench-fork-server-log", daemon=True).start()
        return f"{os.getpid()}:{self._write}"

    def attach(self, path: Path) -> None:
        """Write what the server said so far, and all it says next, to ``path`` (a new file, never through a link);
        nothing when it writes there already."""
        with self._attaching:
            if self.path == path:
                return
            fd = open_fresh(path)
            with self._guard:
                os.write(fd, bytes(self._buffer))
                self._buffer.clear()
                previous, self._file, self.path = self._file, fd, path
            if previous is not None:
                os.close(previous)

    def _drain(self, read: int) -> None:
        while chunk := os.read(read, 65536):
            with self._guard:
                if self._file is None:
                    self._buffer += chunk
                    del self._buffer[:-_BUFFER_BYTES]
                    continue
                with suppress(OSError):  # a full disk loses the server's warnings, not the run
                    os.write(self._file, chunk)




def open_from_server(address: str | None) -> int | None:
    """In the server: a descriptor of the runner's pipe that ``address`` ("PID:FD") names, or None when it names
    none (a value that is not the server's parent's pipe is not opened)."""
    pid, _, fd = (address or "").partition(":")
    if pid != str(os.getppid()) or not fd.isdigit():
        return None
    try:
        out = os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return None
    if not stat.S_ISFIFO(os.fstat(out).st_mode):
        os.close(out)
        return None
    return out
