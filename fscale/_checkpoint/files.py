"""The checkpoint's directories: resolving ``latest``, checking files, publishing
atomically, rotating ([Note: atomic save] in ``fscale/checkpoint.py``)."""

from __future__ import annotations

import os
import re
import shutil
import uuid
import warnings

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

_LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def latest(path: str | os.PathLike) -> str | None:
    """The checkpoint ``load`` reads from ``path``: itself if it is one, else the run
    directory's ``latest``; when that pointer is missing or names a checkpoint that is
    gone (a crash before the first pointer was written, a deleted directory), the
    newest complete ``step-<n>`` (with a warning). None when there is none."""
    root = os.fspath(path)
    if _complete(root):
        return root
    pointer = os.path.join(root, _LATEST)
    named = None
    if os.path.isfile(pointer):
        with open(pointer) as f:
            named = os.path.join(root, f.read().strip())
        if _complete(named):
            return named
    steps = sorted(
        (int(m.group(1)), name)
        for name in (os.listdir(root) if os.path.isdir(root) else [])
        if (m := _STEP_DIR.match(name)) and _complete(os.path.join(root, name))
    )
    if steps:
        found = os.path.join(root, steps[-1][1])
        if named is not None:
            warnings.warn(
                f"{pointer} names {named}, which is gone or incomplete; using {found}, the "
                "newest complete checkpoint of the run.",
                stacklevel=2,
            )
        return found
    return named


def _complete(where: str) -> bool:
    return os.path.isfile(os.path.join(where, ".metadata"))


def _resolve(path) -> str:
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"no checkpoint at {root!r} (no such directory); pass the directory fs.save wrote."
        )
    where = latest(root)
    if where is None:
        raise FileNotFoundError(
            f"{root!r} holds no checkpoint: no .metadata (DCP's index, written last) and no "
            "'latest' pointer; the save did not finish. Pass an earlier checkpoint."
        )
    if not os.path.isfile(os.path.join(where, ".metadata")):
        raise FileNotFoundError(
            f"{root!r}/latest points at {where!r}, which has no .metadata; the checkpoint is "
            "gone or incomplete. Load another step-<n> directory of the run."
        )
    return where


def _unreadable(where: str, e: CheckpointException) -> ValueError:
    first = next(iter(e.failures.values()), e)
    first = first[0] if isinstance(first, tuple) else first
    return ValueError(
        f"checkpoint {where}: cannot read its data ({type(first).__name__}: {first}); the "
        "checkpoint is incomplete or corrupt. Load an earlier one."
    )


def _check_files(where: str, md) -> None:
    """Every data file the index names exists and holds the bytes it points at."""
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        end = info.offset + info.length
        need[info.relative_path] = max(need.get(info.relative_path, 0), end)
    for name, end in sorted(need.items()):
        full = os.path.join(where, name)
        if not os.path.isfile(full):
            raise ValueError(
                f"checkpoint {where}: its data file {name!r} is missing; the checkpoint is "
                "incomplete. Load an earlier one."
            )
        size = os.path.getsize(full)
        if size < end:
            raise ValueError(
                f"checkpoint {where}: its data file {name!r} has {size} bytes, the index "
                f"needs {end}; the file is truncated. Load an earlier one."
            )


def _read_metadata(where: str):
    try:
        return dcp.FileSystemReader(where).read_metadata()
    except Exception as e:
        raise ValueError(
            f"checkpoint {where}: cannot read its .metadata ({type(e).__name__}: {e}); the file "
            "is corrupt. Load an earlier checkpoint."
        ) from e


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: str, final: str) -> None:
    """Rename the finished temp directory to ``final`` (replacing an old one)."""
    _fsync_dir(tmp)
    parent = os.path.dirname(os.path.abspath(final))
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, f".{_LATEST}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, _LATEST))
    _fsync_dir(root)


def _rotate(root: str, keep: int) -> None:
    steps = sorted(
        (int(m.group(1)), name)
        for name in os.listdir(root)
        if (m := _STEP_DIR.match(name)) and os.path.isdir(os.path.join(root, name))
    )
    for _, name in steps[:-keep]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
