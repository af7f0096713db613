"""Write beside, then swap in: a reader of PATH sees the old version or the new one, whole.

`staging_path` gives the place beside PATH where the new version is written (a leftover of an
interrupted write there is removed first); `swap_in` puts it in place. A file is replaced by one
atomic rename. A directory cannot be renamed over a non-empty one, so replacing one takes two
renames: PATH -> PATH.old, then PATH.writing -> PATH; PATH.old is deleted after. A crash between
the two renames leaves the old version only at PATH.old: readers go through `existing_version`,
which falls back to it, and the next `swap_in` to PATH deletes it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil

STAGING_SUFFIX = ".writing"
RETIRED_SUFFIX = ".old"


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def staging_path(path: str, *, directory: bool = False) -> str:
    """PATH.writing, emptied (and created, with ``directory``): where to write PATH's new
    version."""
    staging = path + STAGING_SUFFIX
    _remove(staging)
    if directory:
        os.makedirs(staging)
    return staging


def swap_in(staging: str, path: str) -> None:
    """Moves the complete new version ``staging`` to ``path``, replacing what is there."""
    retired = path + RETIRED_SUFFIX
    if os.path.isdir(staging) and os.path.isdir(path):
        _remove(retired)
        os.rename(path, retired)  # until the next rename, the old version is only at PATH.old
    os.replace(staging, path)
    _remove(retired)  # also one a crash between the renames of an earlier swap left


def existing_version(path: str) -> str:
    """``path``, or PATH.old where a crash inside `swap_in` left the old version only there."""
    retired = os.path.normpath(path) + RETIRED_SUFFIX
    if not os.path.exists(path) and os.path.isdir(retired):
        return retired
    return path


@contextlib.contextmanager
def replacing(path: str, *, directory: bool = False):
    """``with replacing(path) as staging:`` write the new version to ``staging``; it replaces
    ``path`` when the block completes, and is discarded if the block raises."""
    staging = staging_path(path, directory=directory)
    try:
        yield staging
    except BaseException:
        _remove(staging)
        raise
    swap_in(staging, path)


def write_json(path: str, value) -> None:
    """``value`` as indented JSON in the file ``path``, replaced whole."""
    with replacing(path) as staging, open(staging, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
