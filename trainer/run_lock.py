"""One run per ``output_dir``: global rank 0 holds an exclusive lock on ``<output_dir>/.lock`` while it trains.

Two runs into one directory would interleave their logs, cut each other's ``metrics.jsonl`` and both write
``step_N``. ``Session.start`` takes the lock after its inputs are checked (bad input still leaves
``output_dir`` untouched) and before it reads a checkpoint, writes anything or loads the model; ``launcher run``
checks it first (``check_free``), so the common mistake fails without the trainer's start-up. Evaluation
reads checkpoints only and takes no lock.

Why ``fcntl.flock`` and nothing more: the kernel releases the lock when its holder dies (a kill -9, an OOM
kill), so a crash leaves no lock behind on a local disk. On an NFS volume (a Kubernetes PVC) Linux turns
``flock`` into an NFS lock: a dead process's is released by its client at once, and that of a node that
died by the server once the node's lease runs out (NFSv4: ~90 s), well before Kubernetes replaces the pods of
a lost node (~5 min); as NFS locks are POSIX locks there, they guard against other processes only, not
against this one locking twice. A heartbeat (a holder whose file is older than N s counts as dead) was considered and
left out: a step can outlast any fixed N, and a restarted PyTorchJob pod keeps its name, so its hostname,
while its pids start over, so host and pid cannot prove a holder dead where ``flock`` says it is alive.

The file's content (host, pid, start time, command; one JSON line) only names the holder in messages. A
free lock whose file still names a holder is what a crashed run leaves behind: it is reported as stale
and taken over. A filesystem without ``flock`` (some FUSE mounts) falls back to the content: a holder on
this host whose pid is alive is respected; otherwise the run goes on with a warning. A clean release
empties the file (it is never deleted: a run that opened it just before the deletion would lock a
file nobody else sees).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.errors import UserError

LOCK_NAME = ".lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_held: list[RunLock] = []  # locks this process holds, oldest first (``api.train`` releases what it took)


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float  # time.time() when the lock was taken
    command: str

    @property
    def since(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(self.started))

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, since {self.since}: {self.command}"

    def alive_here(self) -> bool:
        """This host's process ``pid`` exists (and is not this process)."""
        if self.host != socket.gethostname() or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's process: it exists
            return True
        return True


class RunLock:
    """A held lock; ``stale`` is the holder a crashed run left in the file, taken over (None normally)."""

    def __init__(self, path: Path, fd: int, holder: Holder, stale: Holder | None, flock: bool):
        self.path = path
        self.holder = holder
        self.stale = stale
        self.flock = flock  # False: the filesystem has no flock; only the content guards the directory
        self._fd: int | None = fd

    def release(self) -> None:
        """Empty the file and unlock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):  # releasing must never mask how the run ended
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor releases the flock
        if self in _held:
            _held.remove(self)


def command_line() -> str:
    """The command that started this run, to show in the lock and to say how to resume.

    ``launcher run`` passes its own as ``USERLOOP_COMMAND`` (the trainer's argv is not what the user typed);
    ``python -m trainer`` sets it from its arguments; otherwise (the Python API) it is this process's argv.
    """
    cmd = os.environ.get("USERLOOP_COMMAND")
    if cmd:
        return cmd
    return shlex.join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]])


def acquire(output_dir: str | Path, command: str | None = None) -> RunLock:
    """Lock ``output_dir`` for this process or raise ``UserError`` naming the run that holds it.

    Creates ``output_dir``. Retries for a moment: ``check_free`` in another launcher holds a shared lock
    for a few microseconds.
    """
    path = Path(output_dir) / LOCK_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"output_dir {output_dir}", f"cannot create {path}: {e.strerror}",
                        hint="fix the permissions or set another output_dir") from None  # fmt: skip
    flock = True
    try:
        for attempt in range(5):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 4:
                    raise _in_use(output_dir, _read(fd)) from None
                time.sleep(0.1)
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    raise
                flock = False
                break
        previous = _read(fd)
        if not flock and previous is not None and previous.alive_here():
            raise _in_use(output_dir, previous)
        holder = Holder(socket.gethostname(), os.getpid(), time.time(), command or command_line())
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(asdict(holder)) + "\n").encode(), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    lock = RunLock(path, fd, holder, previous, flock)
    _held.append(lock)
    return lock


def check_free(output_dir: str | Path) -> None:
    """Raise ``UserError`` if a run holds ``output_dir`` now; writes nothing (``launcher run`` calls it)."""
    path = Path(output_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file (or unreadable: the trainer's own attempt will say why)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(output_dir, _read(fd)) from None
        except OSError:
            holder = _read(fd)
            if holder is not None and holder.alive_here():
                raise _in_use(output_dir, holder) from None
    finally:
        os.close(fd)  # drops the shared lock, if taken


def held() -> list[RunLock]:
    return list(_held)


def _read(fd: int) -> Holder | None:
    try:
        raw = json.loads(os.pread(fd, 65536, 0).decode("utf-8", "replace") or "null")
        return None if raw is None else Holder(str(raw["host"]), int(raw["pid"]), float(raw["started"]),
                                               str(raw["command"]))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None  # empty (released) or not ours: nobody to name


def _in_use(output_dir: str | Path, holder: Holder | None) -> UserError:
    who = holder.describe() if holder is not None else "a run that did not say who it is"
    stop = "stop it"
    if holder is not None:
        stop += f" (Ctrl-C in its terminal, or kill -INT {holder.pid} on {holder.host})"
    return UserError(f"output_dir {output_dir}", f"another run is writing into it: {who}",
                     hint=f"wait for it to finish, {stop}, or write this run elsewhere: set another output_dir, "
                     "or another name when output_dir uses {name} (--set name=...)")  # fmt: skip
