"""Atomic file output: readers never see a half-written file."""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: bytes, *, overwrite: bool = True,
                 exists_error: type[Exception] = FileExistsError) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename, so that readers never see
    a half-written file. With ``overwrite`` False an existing file (even one created meanwhile) is left alone
    and ``exists_error`` is raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    refuse = f"refusing to overwrite existing file {path}; pass overwrite=True to replace it"
    # 0o666 lets the umask decide the permissions, as for a normal open().
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
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
