"""Atomic file output: readers never see a half-written file."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import uuid
from pathlib import Path

from .errors import WriteError


def _cannot_write(path: Path, exc: OSError) -> WriteError:
    folder = path if path.is_dir() else path.parent
    return WriteError(f"cannot write {path}: {exc.strerror or exc}; choose an output folder you can write "
                           f"to, or fix the permissions of {folder}")


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
    """A new empty folder inside ``parent`` (created if needed), for outputs moved into place when complete."""
    parent = writable_folder(parent)
    try:
        return Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
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
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
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
