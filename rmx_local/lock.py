"""One run folder, one writer: `run_lock(run_dir)` holds RUN_DIR/.rmx-lock while a run or an export writes there.

The lock file holds {"pid", "host", "started", "proc_start"} of its holder and carries an `fcntl.flock`, which
the kernel drops when the holder dies, kill -9 included. So:
  - a second `rmx-local run` (or `export`) on a folder in use stops at once with one line naming the holder's pid;
  - a lock file left by a killed process is stale: the next run takes it over and says whose it was, and clears
    the temp files (`.NAME.*.tmp`, `.NAME.old`) that the killed run's atomic writes left behind.
Belt and braces for filesystems where flock does nothing (some network mounts): a lock whose holder is on this
host and still alive (same pid and process start time, so a recycled pid does not count) is never taken over.
The lock is re-entrant within one process (a run that exports at its end keeps its lock).
Shortcut: POSIX only (fcntl); two hosts sharing a folder over a filesystem without flock are not detected.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

from rmx_local.errors import RmxError
from rmx_local.io import umask_mode, write_error

LOCK_NAME = ".rmx-lock"
_HELD: dict[Path, int] = {}  # lock path -> nesting depth, for this process


def _proc_start(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def holder_alive(info: dict) -> bool:
    """Whether the process recorded in a lock file still runs (only decidable on its own host)."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False
    started = _proc_start(info["pid"])
    return started is not None and abs(started - float(info.get("proc_start", 0))) < 1.0


def describe(info: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"])) if "started" in info else "?"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {started}"


def _read(fd: int) -> dict:
    raw = os.pread(fd, 4096, 0)
    try:
        info = json.loads(raw) if raw.strip() else {}
    except ValueError:
        info = {}
    return info if isinstance(info, dict) else {}


def _in_use(run_dir: Path, info: dict) -> RmxError:
    return RmxError(f"{run_dir}: in use by another rmx-local run ({describe(info)})",
                    fix=f"wait for it to finish (or stop it: kill {info.get('pid', 'PID')}), or use another run_dir")


def clear_leftovers(run_dir: Path) -> int:
    """Remove the temp files and folders interrupted atomic writes left in the run folder; return how many."""
    found = [p for p in run_dir.rglob(".*") if p.name.endswith((".tmp", ".old")) and p.name != LOCK_NAME]
    for p in sorted(found, key=lambda p: len(p.parts), reverse=True):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return len(found)


def _acquire(path: Path, note: Callable[[str], None]) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, umask_mode())
        except OSError as e:
            raise write_error(path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read(fd)
            os.close(fd)
            raise _in_use(path.parent, info) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # the holder finished and removed the file while we opened it: try again
            os.close(fd)
            continue
        old = _read(fd)
        if old and old.get("pid") != os.getpid() and holder_alive(old):
            os.close(fd)
            raise _in_use(path.parent, old)
        if old:
            cleared = clear_leftovers(path.parent)
            note(f"run folder: taking over the lock of a run that did not finish ({describe(old)}, not running); "
                 f"cleared {cleared} temp file(s) it left")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "proc_start": _proc_start(os.getpid())}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise write_error(path, e) from None
        return fd


@contextlib.contextmanager
def run_lock(run_dir: str | Path, note: Callable[[str], None] = lambda s: None) -> Iterator[None]:
    """Hold RUN_DIR's lock for the block (creating RUN_DIR); re-entrant within this process."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(run_dir, e) from None
    path = (run_dir / LOCK_NAME).resolve()
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    fd = _acquire(path, note)
    _HELD[path] = 1
    try:
        yield
    finally:
        del _HELD[path]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
