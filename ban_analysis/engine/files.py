"""Files that are never half-written, and the lock of a folder in use.

Every file is written to a temporary name and renamed into place, so a kill at any moment leaves
either the old file or the new one; a write that fails (a full disk) removes its temporary file
and raises :class:`RunFolderError` naming the file. :func:`folder_lock` keeps a second process
out of a run or study folder. Split from ``runs.py`` (the run folder built on these); the names
are importable from there as before.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["RunFolderError", "atomic_save_npy", "atomic_save_npz", "atomic_write_bytes", "atomic_write_json",
           "folder_lock", "now", "read_json", "sha256_file", "write_error"]


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked (other config, corrupt checkpoint, ...)."""


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_error(path: Path, err: OSError) -> RunFolderError:
    """The one-line error for a file that could not be written (the CLI exits 2 with it)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "no space left on device (disk full?); free space"
    else:
        why = f"{err.strerror or type(err).__name__}; fix that"
    return RunFolderError(f"could not write {path}: {why} and rerun the same command to resume")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place (fsync'd first).

    Any OSError (ENOSPC, EDQUOT, EIO, ...) removes the temporary file and becomes a
    :class:`RunFolderError`; the file at ``path`` is then the old one, if there was one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise write_error(path, err) from None


@contextlib.contextmanager
def folder_lock(lock_path: Path, folder: Path):
    """Hold the lock of ``folder`` (a run or study folder) while the block runs.

    ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``lock_path``, which then holds this process's pid. A
    second process is refused at once with a :class:`RunFolderError` naming the folder and the
    holder's pid. The kernel drops the lock when its process ends, however it ends, so a lock
    file left by a killed process never blocks the rerun. On release the lock file is removed,
    and so are ``folder`` and its parents if this call created them and they are still empty (a
    run that failed before it started leaves no folder behind).
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    folder, lock_path = Path(folder), Path(lock_path)
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    for attempt in range(10):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # another process removed an empty folder just now
            continue
        except OSError as err:
            raise write_error(lock_path, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise RunFolderError(f"{folder} is in use by another ban-analysis process (pid {holder}); "
                                 "wait for it or use another --out folder") from None
        except OSError as err:  # a file system without locks
            os.close(fd)
            raise RunFolderError(f"could not lock {lock_path}: {err.strerror}") from None
        try:  # the holder before us may have removed the file after we opened it: then lock the new one
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise RunFolderError(f"could not lock {lock_path}: it keeps being replaced by another process")
    try:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as err:
            raise write_error(lock_path, err) from None
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()  # before the unlock: a waiter that gets the old file retries
            for path in created:  # only folders this call made, and only while empty
                path.rmdir()
        os.close(fd)


def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """An uncompressed ``.npz`` of ``arrays`` (name -> array), written atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunFolderError(f"{path} is missing") from None
    except json.JSONDecodeError as err:
        raise RunFolderError(f"{path} is not valid JSON ({err})") from None
