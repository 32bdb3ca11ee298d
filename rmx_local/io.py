"""Crash-safe files: atomic writes (temp file + fsync + rename) and append-only JSONL journals.

A kill -9 at any moment leaves either the old file or the new one, never a half-written one; a journal may
end in one torn line, which `read_jsonl` drops (that record is simply redone on resume). A failed write (disk
full, read-only folder) raises one `RmxError` naming the file and leaves the old file as it was; a journal
append that fails is cut back to the file's previous length.

Files and folders get the permissions a plain `open()` / `mkdir()` would give under the user's umask (e.g.
0644 / 0755), not the 0600 / 0700 of `tempfile`: exports and adapters are read by other programs (an Ollama
or llama.cpp server running as another user). Shortcut: the umask is read by setting and restoring it, which
is not thread-safe; nothing here writes files from several threads.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from rmx_local.errors import RmxError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_READ_ONLY = {errno.EACCES, errno.EPERM, errno.EROFS}


def write_error(path: str | Path, e: OSError) -> RmxError:
    """The one-line error for a failed write of `path`, with what to do about it."""
    reason = e.strerror or type(e).__name__
    if e.errno in _NO_SPACE:
        return RmxError(f"{path}: cannot write, no space left on device",
                        fix="free disk space (or move run_dir to another disk), then rerun the same command: "
                            "finished work is kept")
    if e.errno in _READ_ONLY:
        return RmxError(f"{path}: cannot write ({reason})",
                        fix="make the folder writable (chmod u+w) or choose another run_dir / --out")
    return RmxError(f"{path}: cannot write ({reason})", fix="check the disk and the folder, then rerun the same command")


def umask_mode(base: int = 0o666) -> int:
    """`base` (0o666 for files, 0o777 for folders) under the process umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return base & ~mask


def temp_path(path: str | Path) -> Path:
    """A new empty temp file beside `path` (same folder, so `os.replace` is atomic), with umask permissions."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, umask_mode())
        os.close(fd)
    except OSError as e:
        raise write_error(path, e) from None
    return Path(tmp)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RmxError(f"{path}: corrupt JSON ({e})", fix=f"delete {path} to redo the stage that wrote it") from None


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a folder in a temp sibling, then swap it into place (old contents replaced only on success)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        os.chmod(tmp, umask_mode(0o777))
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Journal:
    """Append-only JSONL file; each record is flushed and fsynced before `append` returns."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(self.path, e) from None

    def read(self) -> list[dict]:
        return read_jsonl(self.path, repair=True)

    def append(self, record: dict) -> None:
        line = (json.dumps(record) + "\n").encode()
        try:
            with open(self.path, "ab") as f:
                size = f.tell()
                try:
                    f.write(line)
                    f.flush()
                    os.fsync(f.fileno())
                except OSError:
                    with contextlib.suppress(OSError):
                        f.truncate(size)  # no half record left behind
                    raise
        except OSError as e:
            raise write_error(self.path, e) from None

    def rewrite(self, records: list[dict]) -> None:
        """Replace the journal's content atomically (e.g. to drop records a resumed stage will redo)."""
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: str | Path, repair: bool = False) -> list[dict]:
    """Read a JSONL file. With `repair`, a torn last line (from a kill mid-write) is cut off the file."""
    path = Path(path)
    if not path.exists():
        return []
    records, good_bytes = [], 0
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            good_bytes += len(line) + (1 if i < len(lines) - 1 else 0)
            continue
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if i >= len(lines) - 2 and repair:  # torn tail: drop it
                with open(path, "r+b") as f:
                    f.truncate(good_bytes)
                break
            raise RmxError(f"{path}:{i + 1}: corrupt JSON line",
                           fix=f"delete line {i + 1} of {path} (that record is redone), or the whole file to redo "
                               "that stage") from None
        good_bytes += len(line) + 1
    return records
