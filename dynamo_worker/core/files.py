"""Small file-writing helpers shared by the launcher and the CLI."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def write_private_file(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically, readable only by this user (mode 0600).

    The bytes go to a fresh temp file in the same directory (O_EXCL|O_NOFOLLOW, so a planted
    file or symlink is never written through), are fsynced, then renamed over ``path``: a
    reader sees the old file or the whole new one, never a partial write, and the secret is
    never briefly world-readable. A symlink at ``path`` itself is replaced, not followed.
    """
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            # The umask may have stripped owner bits from O_CREAT's mode; set exactly 0600.
            os.fchmod(fd, 0o600)
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename is durable only once the directory entry is on disk; some filesystems refuse
    # fsync on a directory, and the file itself is already complete then.
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
