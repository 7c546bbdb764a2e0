"""Writing a file atomically, for the tuning file and the checkpoints."""

from __future__ import annotations

import contextlib
import os
import secrets


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb"):
    """A file object to write ``path`` with: a hidden temporary file beside it
    (``.tmp-<name>.<random>.part``), flushed to disk and renamed over ``path`` when the block
    ends, removed when the block raises. A reader sees the old file or the new one, never half
    of one. The file gets the permissions ``open`` would give (0o666 less the umask; not the
    0o600 of ``tempfile.mkstemp``, which the rename would carry over). Text modes write UTF-8.
    """
    directory = os.path.dirname(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(directory, f".tmp-{os.path.basename(path)}.{secrets.token_hex(6)}.part")
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
