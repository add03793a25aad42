"""Writing output files so that a failure or a cancel never leaves a partial file behind."""

from __future__ import annotations

import os
import uuid
from typing import Callable

from ..common.errors import InputError


def write_atomically(path: str, write: Callable[[str], None]) -> str:
    """Write through ``write(temporary_path)`` in the target folder, flush it to disk, then rename onto ``path``.

    The temporary name keeps the extension (it selects the file format) and is created by ``write``
    itself, so the file gets the usual permissions. Readers see the old file or the new one, never a
    partial one; on any failure the temporary file is removed and ``path`` is left as it was.
    Returns the absolute path written.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise InputError(f"The output folder {folder!r} does not exist; create it first.")
    if os.path.isdir(path):
        raise InputError(f"The output {path!r} is a folder; give a file name.")
    name = os.path.basename(path)
    extension = name[name.index("."):] if "." in name else ""
    temporary = os.path.join(folder, f".{name}.partial-{uuid.uuid4().hex}{extension}")
    try:
        write(temporary)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return path
