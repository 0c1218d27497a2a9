"""knockd-style backend: a door's start and stop commands, run as shell text.

What it does (docs/firewall.md says the same):

* ``open`` runs the door's start command (``start_command``, or
  ``start_command_6`` for an IPv6 client, ``%IP%`` replaced by the client
  address) through ``/bin/sh -c``, exactly as knockd hands it to
  ``system()``; a re-grant of the same door and address runs nothing, so a
  knock repeated while the door is open never adds a second rule (the grant
  manager just moves the deadline);
* ``close`` runs the stop command, if the door has one; a door without one
  closes by doing nothing, as in knockd.

The caller is never blocked: commands run on a small thread pool, one at a
time per door and address (a stop never starts before the start of the same
grant has finished), each with a time limit after which its whole process
group is killed. They see ``/dev/null`` on stdin, ``/`` as working
directory and only a pinned ``PATH`` and ``LC_ALL=C`` in their environment.
Their exit status and output are logged in knockd's words (``DOOR: running
command: ...``, ``DOOR: command returned non-zero status code (N)``); a
failure is logged, never raised.

This backend cannot see what its commands did to the firewall: ``list``
returns nothing and nothing closes a grant if the daemon dies, exactly as
with knockd. Commands run in the network namespace of the pool's worker
threads, which is that of the thread whose ``open``/``close`` started them.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from spa.grant import ActiveGrant, Address
from spa.server.firewall.base import Backend
from spa.server.firewall.run import PINNED_ENV

log = logging.getLogger(__name__)

SHELL = "/bin/sh"
DEFAULT_TIMEOUT = 30.0
DEFAULT_WORKERS = 4
DEFAULT_KEEP = 100
# Captured stdout/stderr kept (and logged) per command.
OUTPUT_LIMIT = 2048

_Key = tuple[str, Address]


@dataclass(frozen=True, slots=True)
class CommandResult:
    """One command that ran: what, for whom, and how it ended."""

    door: str
    address: Address
    which: Literal["start", "stop"]
    argv: tuple[str, ...]
    #: Exit status; negative for a signal (as ``subprocess``), None when it could not start.
    returncode: int | None
    stdout: str
    stderr: str
    duration: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@dataclass(frozen=True, slots=True)
class _Job:
    door: str
    address: Address
    which: Literal["start", "stop"]
    text: str
    on_done: Callable[[], None] | None = None


def _read_capped(f) -> str:
    f.seek(0)
    data = f.read(OUTPUT_LIMIT + 1)
    text = data[:OUTPUT_LIMIT].decode(errors="replace")
    if len(data) > OUTPUT_LIMIT:
        text += "... (truncated)"
    return text


class CommandBackend(Backend):
    name = "command"
    kernel_expiry = False
    lists_firewall = False

    def __init__(
        self,
        timeout: float = DEFAULT_TIMEOUT,
        workers: int = DEFAULT_WORKERS,
        keep: int = DEFAULT_KEEP,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not timeout > 0:
            raise ValueError(f"command timeout {timeout!r} must be a positive number of seconds")
        if workers < 1:
            raise ValueError(f"command workers {workers!r} must be at least 1")
        self.timeout = float(timeout)
        self.workers = workers
        self._clock = clock
        #: The last ``keep`` commands that ran, oldest first.
        self.results: deque[CommandResult] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        # Jobs waiting behind a running one of the same door and address; a
        # key is present while a worker is busy with it.
        self._queues: dict[_Key, deque[_Job]] = {}
        self._pending = 0
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not os.access(SHELL, os.X_OK):
            return f"{SHELL} is missing or not executable; knockd-style commands need a POSIX shell"
        return None

    # -- structure: nothing to build -------------------------------------------

    def setup(self) -> None:
        pass

    def check(self) -> list[str]:
        return []

    def teardown(self) -> None:
        """Wait for the commands already queued (stop commands among them), then free the workers."""
        self.shutdown(None)

    # -- grants ------------------------------------------------------------------

    def open(self, grant: ActiveGrant, previous: ActiveGrant | None = None) -> None:
        if previous is not None and previous.key == grant.key:
            # knockd would run the start command again and stack a second
            # rule; we only extend the deadline (the grant manager's job).
            log.debug("%s: %s is already open; start command not run again", grant.door, grant.address)
            return
        if grant.commands is None:
            log.warning("%s: grant for %s carries no commands; nothing to run", grant.door, grant.address)
            return
        start, _stop = grant.commands.commands_for(grant.address)
        if start is None:
            log.debug("%s: no start command for %s", grant.door, grant.address)
            return
        self._enqueue(_Job(grant.door, grant.address, "start", start))

    def close(self, grant: ActiveGrant, on_done: Callable[[], None] | None = None) -> None:
        """Queue the stop command; ``on_done`` runs once it has run (or at once when there is none).

        The grant manager forgets a grant only in ``on_done``, so a stop command
        that a crash prevented still runs at the next start.
        """
        stop = grant.commands.commands_for(grant.address)[1] if grant.commands is not None else None
        if stop is None:
            # A door without a stop command closes by doing nothing, as in knockd.
            if on_done is not None:
                on_done()
            return
        self._enqueue(_Job(grant.door, grant.address, "stop", stop, on_done))

    def list(self) -> list[ActiveGrant]:
        return []  # commands leave nothing we could read back

    # -- the queue -----------------------------------------------------------------

    def _enqueue(self, job: _Job) -> None:
        key = (job.door, job.address)
        with self._lock:
            self._pending += 1
            waiting = self._queues.get(key)
            if waiting is not None:
                waiting.append(job)  # the busy worker for this key takes it next
                return
            self._queues[key] = deque()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="spa-command")
            pool = self._pool
        try:
            pool.submit(self._drain, key, job)
        except RuntimeError as exc:  # the interpreter is shutting down
            log.error("%s: cannot run command %s: %s", job.door, job.text, exc)
            with self._lock:
                dropped = self._queues.pop(key, ())
                self._done_locked(1 + len(dropped))

    def _done_locked(self, n: int = 1) -> None:
        self._pending -= n
        if self._pending <= 0:
            self._pending = 0
            self._idle.notify_all()

    def _drain(self, key: _Key, job: _Job) -> None:
        """Run ``job``, then every job queued behind it for the same key, in order."""
        while True:
            try:
                self._run(job)
                if job.on_done is not None:
                    job.on_done()
            except BaseException:  # a worker must never lose the queue
                log.exception("%s: command %s failed unexpectedly", job.door, job.text)
            with self._lock:
                self._done_locked()
                waiting = self._queues[key]
                if not waiting:
                    del self._queues[key]
                    return
                job = waiting.popleft()

    def _run(self, job: _Job) -> CommandResult:
        argv = (SHELL, "-c", job.text)
        log.info("%s: running command: %s", job.door, job.text)
        began = self._clock()
        returncode: int | None = None
        timed_out = False
        out = err = ""
        # Output goes to unlinked files, not pipes: we wait for the shell, not
        # for end-of-file, so a command that leaves a process in the
        # background (``... &``) returns at once, as under knockd's system().
        with tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=fout,
                    stderr=ferr,
                    cwd="/",
                    env=dict(PINNED_ENV),
                    close_fds=True,
                    start_new_session=True,
                )
            except OSError as exc:
                err = f"cannot start {SHELL}: {exc}"
                log.error("%s: %s", job.door, err)
            else:
                try:
                    returncode = proc.wait(timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    # The shell is not reaped yet, so its group id cannot have
                    # been reused: kill everything it started.
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    returncode = proc.wait()
                out, err = _read_capped(fout), _read_capped(ferr)
        duration = self._clock() - began
        result = CommandResult(job.door, job.address, job.which, argv, returncode, out, err, duration, timed_out)
        self.results.append(result)
        self._log_result(result)
        return result

    @staticmethod
    def _log_result(r: CommandResult) -> None:
        if r.timed_out:
            log.error("%s: command timed out after %.1f s; killed its process group: %s", r.door, r.duration, r.argv[2])
        elif r.returncode is None:
            pass  # could not start: already logged
        elif r.returncode < 0:
            log.warning("%s: command killed by signal %d", r.door, -r.returncode)
        elif r.returncode != 0:
            log.warning("%s: command returned non-zero status code (%d)", r.door, r.returncode)
        else:
            log.info("%s: command exited with status 0 after %.2f s", r.door, r.duration)
        level = logging.INFO if r.ok else logging.WARNING
        if r.stdout.strip():
            log.log(level, "%s: command stdout: %s", r.door, r.stdout.rstrip())
        if r.stderr.strip():
            log.log(level, "%s: command stderr: %s", r.door, r.stderr.rstrip())

    # -- waiting ---------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Commands queued or running."""
        with self._lock:
            return self._pending

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every queued command has finished; False if ``timeout`` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def shutdown(self, timeout: float | None = None) -> bool:
        """Wait for queued commands (up to ``timeout``), then stop the workers; True if all finished.

        The backend stays usable: the next ``open`` or ``close`` starts a new pool.
        """
        finished = self.wait(timeout)
        with self._lock:
            pool, self._pool = self._pool, None
            left = self._pending
        if not finished:
            log.warning("command backend: %d command(s) still running or queued at shutdown", left)
        if pool is not None:
            # Running commands end by themselves (each has a time limit).
            pool.shutdown(wait=finished)
        return finished

