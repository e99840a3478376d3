"""One run per output directory: an exclusive lock on `<output_dir>/.lock`.

The lock is an `fcntl.flock` on the file, which the kernel drops when its holder exits however it exits
(kill -9 included), so a lock left by a dead process is free again and the next run takes it over. The file
names its holder (`{"pid": ..., "host": ...}`) for the error a second run gets. On a file system without
`flock`, the recorded pid decides instead: a lock of a process that no longer runs on this host is stale.

Re-entrant within a process (the command line takes the lock, then the trainer it starts asks again), and
free of torch, so the command line can take it before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["LOCK_FILE", "OutputLocked", "lock_output_dir"]

LOCK_FILE = ".lock"
_held: dict[str, tuple[int, int]] = {}  # resolved lock path -> (file descriptor, re-entry depth)


class OutputLocked(RuntimeError):
    """Another live process holds the output directory."""


def _holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text() or "{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive_here(holder: dict) -> bool:
    """Whether the holder recorded in a lock file is a running process of this host (or cannot be ruled
    out: another host, or no pid)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _refuse(path: Path, holder: dict) -> OutputLocked:
    who = f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    return OutputLocked(
        f"{path.parent}: in use by {who} (lock file {path}); wait for that run to end, or choose another "
        "output directory"
    )


def _acquire(path: Path) -> int:
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = False
        if fcntl is not None:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                raise _refuse(path, _holder(path)) from None
            except OSError as error:
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        if not locked:  # no flock here: trust the recorded pid
            holder = _holder(path)
            if holder and holder.get("pid") != os.getpid() and _alive_here(holder):
                raise _refuse(path, holder)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, record, 0)
        os.fsync(descriptor)
        return descriptor
    except BaseException:
        os.close(descriptor)
        raise


@contextlib.contextmanager
def lock_output_dir(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Holds the exclusive lock on `output_dir` (created if needed) for the block; OutputLocked naming the
    holder's pid and host when another live process has it."""
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    key = os.path.realpath(path)
    if key in _held:
        descriptor, depth = _held[key]
        _held[key] = (descriptor, depth + 1)
    else:
        _held[key] = (_acquire(path), 1)
    try:
        yield path
    finally:
        descriptor, depth = _held[key]
        if depth > 1:
            _held[key] = (descriptor, depth - 1)
        else:
            del _held[key]
            with contextlib.suppress(OSError):
                os.ftruncate(descriptor, 0)  # no holder named any more; the file stays (unlinking races)
            os.close(descriptor)  # releases the flock
