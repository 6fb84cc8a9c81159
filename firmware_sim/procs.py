"""Child processes of the simulated fleet: start, watch, kill, restart.

Each service (broker, aggregator, node, baseline trainer) is its own OS process, started
in its own session so a kill reaches nothing else. Its stdout is read line by line on a
thread; lines that parse as JSON objects go to a shared queue tagged with the process
name, other lines and stderr go to a log file in the run directory. CPU time is read
from ``/proc/<pid>/stat`` (Linux; None elsewhere), so the orchestrator can report each
board's compute time apart from the waiting that sharing two cores with five boards adds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

# One BLAS thread per child: the fleet already runs more processes than cores.
SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux), else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; fields after it are fixed.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLK_TCK


def python_command(module: str, *args: str) -> list[str]:
    """``python -m module args...`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def estdp_command(verb: str, *args: str) -> list[str]:
    """The ``estdp`` CLI run with this interpreter (works without the console script)."""
    return python_command("estdp.cli", verb, *args)


class ManagedProcess:
    """A named child process whose JSON stdout lines land in ``events``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        events: queue.Queue[tuple[str, dict[str, Any]]],
        log_dir: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.events = events
        self.log_path = Path(log_dir) / f"{name}.log"
        self.env = {**os.environ, **SINGLE_THREAD_ENV, **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.exit_reported = False  # set by the orchestrator once it has handled an exit
        self._log: IO[str] | None = None
        self._readers: list[threading.Thread] = []
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        """Start (or start again) the process."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self._log = open(self.log_path, "a", buffering=1)  # noqa: SIM115 - closed in wait()
        self._log.write(f"--- start {self.starts + 1}: {' '.join(self.argv)}\n")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        self.starts += 1
        self.exit_reported = False
        self._readers = [
            threading.Thread(target=self._read_stdout, args=(self.proc,), daemon=True),
            threading.Thread(target=self._read_stderr, args=(self.proc,), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def _write_log(self, line: str) -> None:
        with self._lock:
            if self._log is not None and not self._log.closed:
                self._log.write(line)

    def _read_stdout(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            record = _json_object(line)
            if record is not None:
                self.events.put((self.name, record))
            self._write_log(line)

    def _read_stderr(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            self._write_log(raw.decode(errors="replace"))

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.proc.pid) if self.running and self.proc else None

    def signal(self, sig: int) -> None:
        if self.running and self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL, as a board losing power would."""
        self.signal(signal.SIGKILL)
        self.wait(5.0)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; returns the exit status."""
        if self.running:
            self.signal(signal.SIGTERM)
            if not self.wait(timeout):
                log.warning("%s ignored SIGTERM for %.0f s; killing it", self.name, timeout)
                self.kill()
        self.wait(1.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for exit; True when the process has ended (readers drained, log closed)."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        for reader in self._readers:
            reader.join(2.0)
        with self._lock:
            if self._log is not None and not self._log.closed:
                self._log.write(f"--- exit {self.proc.returncode}\n")
                self._log.close()
        return True

    def tail(self, lines: int = 5) -> str:
        """The last lines of this process's log (for error messages)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


def _json_object(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def wait_all(procs: Sequence[ManagedProcess], deadline: float) -> None:
    """Wait for each of ``procs`` until the monotonic ``deadline``."""
    for proc in procs:
        proc.wait(max(0.0, deadline - time.monotonic()))
