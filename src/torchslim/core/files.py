"""Atomic file output: readers never see a half-written file."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

from .errors import WriteError


def _cannot_write(path: Path, exc: OSError) -> WriteError:
    folder = path if path.is_dir() else path.parent
    return WriteError(f"cannot write {path}: {exc.strerror or exc}; choose an output folder you can write "
                           f"to, or fix the permissions of {folder}")


# Temporary outputs carry their owner (a short host tag and the pid) in their name, so that the leftovers of a
# killed process can be told from the outputs of one still writing, and removed by the next run.
STALE_AFTER_S = 3.0
_TMP_FILE = re.compile(r"^\..+\.(?P<host>[0-9a-f]{6})-(?P<pid>\d+)\.[0-9a-f]{12}\.tmp$")
_TMP_FOLDER = re.compile(r"^\.[a-z]+-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def owner_tag() -> str:
    """``<host>-<pid>``: names this process in temporary file and folder names."""
    return f"{_host_tag()}-{os.getpid()}"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (assumed so where that cannot be checked safely)."""
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, under another user
        return True
    return True


def remove_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of :func:`atomic_write` and folders of :func:`temp_folder` in ``folder`` that
    a killed process left: created on this host, by a process that is gone, untouched for ``STALE_AFTER_S``.
    Returns what was removed; never raises (a leftover that cannot be removed stays for the next run)."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    host, now = _host_tag(), time.time()
    for e in entries:
        match = (_TMP_FOLDER if e.is_dir(follow_symlinks=False) else _TMP_FILE).match(e.name)
        if match is None or match["host"] != host:
            continue  # another machine's leftover (shared folder): its pid means nothing here
        try:
            if now - e.stat(follow_symlinks=False).st_mtime < STALE_AFTER_S or process_alive(int(match["pid"])):
                continue
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
        except OSError:
            continue
        removed.append(Path(e.path))
    return removed


def writable_folder(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` (and its parents) if needed; WriteError (a CheckpointError) naming it when
    that fails."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    return path


def temp_folder(parent: str | os.PathLike, prefix: str) -> Path:
    """A new empty folder inside ``parent`` (created if needed), for outputs moved into place when complete.
    ``prefix`` is a dot, lowercase letters and a dash (``.publish-``); the owner is added to the name so that
    :func:`remove_stale` can clear the folder if this process is killed."""
    parent = writable_folder(parent)
    remove_stale(parent)
    try:
        return Path(tempfile.mkdtemp(dir=parent, prefix=f"{prefix}{owner_tag()}-"))
    except OSError as exc:
        raise _cannot_write(parent, exc) from None


def atomic_write(path: str | os.PathLike, data: bytes, *, overwrite: bool = True,
                 exists_error: type[Exception] = FileExistsError) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename, so that readers never see
    a half-written file. With ``overwrite`` False an existing file (even one created meanwhile) is left alone
    and ``exists_error`` is raised. A folder that cannot be written (permissions, read-only or full disk)
    raises WriteError (a CheckpointError) naming the path."""
    path = Path(path)
    writable_folder(path.parent)
    remove_stale(path.parent)
    tmp = path.parent / f".{path.name}.{owner_tag()}.{uuid.uuid4().hex[:12]}.tmp"
    refuse = f"refusing to overwrite existing file {path}; pass overwrite=True to replace it"
    try:
        # 0o666 lets the umask decide the permissions, as for a normal open().
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # unlike os.replace, refuses to clobber a file created meanwhile
            except FileExistsError:
                raise exists_error(refuse) from None
            except OSError:  # file systems without hard links
                if path.exists():
                    raise exists_error(refuse) from None
                os.replace(tmp, path)
    except exists_error:
        raise
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    with contextlib.suppress(OSError):  # make the rename itself durable; not possible on every platform
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return Path(path)
