"""Writing output files and results folders so that a failure or a cancel never leaves a partial one behind.

A file is written under a hidden temporary name beside it (``write_atomically``); a folder is filled in a hidden
staging sibling, ``.NAME.partial-XXXXXXXX`` (``publish_folder``), renamed onto its name once complete.
"""

from __future__ import annotations

import glob
import os
import shutil
import uuid
from contextlib import contextmanager
from typing import Callable, Iterator

from ..common.errors import InputError

#: What marks a staging name: ``.NAME`` + STAGING + a random suffix.
STAGING = ".partial-"


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


def check_output_folder(folder: str) -> str:
    """Absolute path of an output folder that does not exist yet, or is empty, in an existing folder."""
    folder = os.path.abspath(os.fspath(folder))
    parent = os.path.dirname(folder)
    if not os.path.isdir(parent):
        raise InputError(f"The folder {parent!r} that should hold the output folder does not exist; create it "
                         "first.")
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise InputError(f"The output folder {folder!r} already exists and is not an empty folder; choose a new "
                         "folder (it is created) or remove the old results.")
    return folder


@contextmanager
def publish_folder(folder: str) -> Iterator[str]:
    """Fill a results folder atomically: ``with publish_folder(folder) as staging:`` write into ``staging``.

    ``folder`` must not exist, or be an empty folder, in an existing folder (``check_output_folder``). ``staging``
    is a new hidden sibling, ``.NAME.partial-XXXXXXXX``; when the block ends normally it is renamed onto ``folder``
    (an empty ``folder`` is replaced), so the folder appears only when complete; when the block raises, the
    staging folder is removed with everything in it and the exception goes on. Code that writes into a folder
    being published writes its files there directly (it must not publish a folder of its own inside it).
    """
    folder = check_output_folder(folder)
    staging = os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}{STAGING}{uuid.uuid4().hex[:8]}")
    os.mkdir(staging)
    try:
        yield staging
        if os.path.isdir(folder):
            os.rmdir(folder)
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_staging(folder: str) -> None:
    """Remove the staging folders of ``folder`` left behind by publications that were killed (none may be
    running)."""
    folder = os.path.abspath(os.fspath(folder))
    pattern = f".{glob.escape(os.path.basename(folder))}{STAGING}*"
    for staging in glob.glob(os.path.join(glob.escape(os.path.dirname(folder)), pattern)):
        shutil.rmtree(staging, ignore_errors=True)
