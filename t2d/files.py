"""File and message helpers shared by train, export and serve; torch-free, so the server can import them.

One way to write a file (atomically) and one way to turn an exception into the one line a user sees.
"""

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never a part: a temp file
    `.<name>.<random>.tmp` in the same folder, flushed (and fsynced: a power cut must not leave an empty
    file behind the rename), then renamed over `path`. A failure leaves no temp file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make run folders and exports unreadable to others
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, value: Any) -> None:
    atomic_write(path, (json.dumps(value, indent=2) + "\n").encode())


def first_line(e: BaseException, limit: int = 0) -> str:
    """The first non-empty line of an exception's message (or its type's name), at most `limit` characters
    (0: all of it): error output is one line. A KeyError's message is the bare key: it says which key is missing."""
    text = str(e).strip()
    if isinstance(e, KeyError) and text:
        text = f"missing key {text}"
    line = text.splitlines()[0] if text else type(e).__name__
    return line[:limit] if limit else line
