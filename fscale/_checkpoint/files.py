"""The checkpoint's directories: resolving ``latest``, checking files, publishing
atomically, rotating ([Note: atomic save] in ``fscale/checkpoint.py``)."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import uuid
import warnings

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from fscale._checkpoint.checksummed import crc32

_LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_SUMS = re.compile(r"^__checksums_(\d+)\.json$")
_CHUNK = 64 << 20

# [Note: data-file checksums]
# DCP checks neither the bytes it writes nor those it reads: a flipped or zeroed
# block in the middle of a data file (a bad disk, a torn copy between machines)
# loads as wrong weights without a word. So each rank, after its files are written
# and fsynced and before the checkpoint is published, records the size of every
# data file it wrote and the CRC-32s of its pieces (taken while writing: one piece
# per item with fscale's writer, the whole file with DCP's own loop) in
# ``__checksums_<rank>.json`` (fsynced too). ``load`` checks that every file the
# index names has a record and its recorded size (no read), and the reader verifies
# the bytes of each item it reads against its piece's CRC in the same pass, before
# they are used (``ParallelReader``): the load reads the disk once. A file whose
# items are not pieces of their own is read and verified whole before its items.
# A mismatch names the file; so does a data file without a record (format 2 on: a
# checkpoint without records is refused). Older records (one ``crc32`` per file)
# are one piece.


def _crc32(path: str, offset: int = 0, length: int | None = None) -> int:
    crc = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        left = os.path.getsize(path) - offset if length is None else length
        while left > 0 and (chunk := f.read(min(_CHUNK, left))):
            crc = crc32(chunk, crc)
            left -= len(chunk)
    return crc


def write_checksums(where: str, rank: int, names: list[str], sums: dict) -> None:
    """Record the size and piece CRC-32s of this rank's data files ([Note: data-file
    checksums]), from ``sums`` (``{name: (pieces, size)}``, taken as they were written:
    [Note: checksums while writing] in ``checksummed.py``)."""
    names = sorted(set(names))
    missing = [n for n in names if n not in sums]
    if missing:
        raise OSError(f"fs.save: no checksum was taken while writing {missing[0]!r} in {where}.")
    sums = {n: {"size": sums[n][1], "pieces": [list(p) for p in sums[n][0]]} for n in names}
    path = os.path.join(where, f"__checksums_{rank}.json")
    with open(path, "w") as f:
        json.dump(sums, f)
        f.flush()
        os.fsync(f.fileno())


class Checksums:
    """The recorded pieces of a checkpoint's data files, for the reader to verify with.

    ``piece(name, offset, length)`` is the CRC-32 recorded for exactly that range (None
    if it is not a piece); ``verify(name, offset, data)`` raises naming the file when
    ``data`` does not match; ``verify_file(name)`` reads and checks every piece.
    """

    def __init__(self, where: str, pieces: dict[str, dict[tuple[int, int], int]]):
        self.where = where
        self.pieces = pieces

    def piece(self, name: str, offset: int, length: int) -> int | None:
        return self.pieces[name].get((offset, length))

    def verify(self, name: str, offset: int, data) -> None:
        self._check(name, offset, len(data), crc32(data))

    def verify_file(self, name: str) -> None:
        full = os.path.join(self.where, name)
        for offset, length in sorted(self.pieces[name]):
            self._check(name, offset, length, _crc32(full, offset, length))

    def _check(self, name: str, offset: int, length: int, got: int) -> None:
        want = self.piece(name, offset, length)
        if got != want:
            raise ValueError(
                f"checkpoint {self.where}: data file {name!r} does not match its checksum "
                f"(CRC-32 {got:#010x} of {length} bytes at offset {offset}; recorded "
                f"{want:#010x}): the file is corrupt. Load an earlier checkpoint."
            )


def _checksums(where: str, names: list[str]) -> Checksums:
    recorded: dict[str, dict] = {}
    for entry in os.listdir(where):
        if _SUMS.match(entry):
            try:
                with open(os.path.join(where, entry)) as f:
                    recorded.update(json.load(f))
            except (OSError, ValueError) as e:
                raise ValueError(
                    f"checkpoint {where}: its checksum record {entry!r} is unreadable ({e}); "
                    "the checkpoint is corrupt. Load an earlier one."
                ) from e
    if not recorded:
        raise ValueError(
            f"checkpoint {where}: no checksum records (__checksums_<rank>.json); it is "
            "incomplete, or was saved by an older fscale. Load an earlier one, or save it "
            "again with this version."
        )
    unrecorded = [n for n in names if n not in recorded]
    if unrecorded:
        raise ValueError(
            f"checkpoint {where}: data file {unrecorded[0]!r} has no checksum record; the "
            "checkpoint is incomplete or mixed with another. Load an earlier one."
        )
    pieces = {}
    for name in names:
        want = recorded[name]
        size = os.path.getsize(os.path.join(where, name))
        if "pieces" in want:
            table = {(int(o), int(n)): int(c) for o, n, c in want["pieces"]}
        else:  # a record of one CRC per file
            table = {(0, int(want["size"])): int(want["crc32"])}
        if size != want["size"] or sum(n for _, n in table) != size:
            raise ValueError(
                f"checkpoint {where}: data file {name!r} has {size} bytes, its checksum "
                f"record {want['size']}: the file is corrupt. Load an earlier checkpoint."
            )
        pieces[name] = table
    return Checksums(where, pieces)


def latest(path: str | os.PathLike) -> str | None:
    """The checkpoint ``load`` reads from ``path``: itself if it is one, else the run
    directory's ``latest``; when that pointer is missing or names a checkpoint that is
    gone (a crash before the first pointer was written, a deleted directory), the
    newest complete ``step-<n>`` (with a warning). None when there is none."""
    root = os.fspath(path)
    if _complete(root):
        return root
    pointer = os.path.join(root, _LATEST)
    name = _pointed(root)
    named = None if name is None else os.path.join(root, name)
    if named is not None and _complete(named):
        return named
    steps = [n for n in _step_dirs(root) if _complete(os.path.join(root, n))]
    if steps:
        found = os.path.join(root, steps[-1])
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


def _siblings(root: str) -> list[str]:
    """Names beside ``root`` that start with its name and a dot."""
    parent = os.path.dirname(os.path.abspath(root))
    base = os.path.basename(os.path.abspath(root)) + "."
    return [n for n in os.listdir(parent) if n.startswith(base)] if os.path.isdir(parent) else []


def _resolve(path) -> str:
    root = os.fspath(path)
    if not os.path.isdir(root):
        aside = sorted(n for n in _siblings(root) if ".old-" in n)
        hint = (
            f" A save over it was killed between its renames: the previous checkpoint is "
            f"{aside[-1]!r} beside it; rename it to {os.path.basename(root)!r} to load it."
            if aside
            else ""
        )
        raise FileNotFoundError(
            f"no checkpoint at {root!r} (no such directory); pass the directory fs.save "
            f"wrote.{hint}"
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
    if isinstance(first, ValueError) and "does not match its checksum" in str(first):
        return first
    return ValueError(
        f"checkpoint {where}: cannot read its data ({type(first).__name__}: {first}); the "
        "checkpoint is incomplete or corrupt. Load an earlier one."
    )


def _check_files(where: str, md) -> Checksums:
    """Every data file the index names exists, holds the bytes it points at and has a
    checksum record (returned, for the reader: [Note: data-file checksums])."""
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
    return _checksums(where, sorted(need))


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
    """Rename the finished temp directory to ``final`` (replacing an old one).

    [Note: replacing a checkpoint in one step]
    Over an existing ``final`` the two directories are swapped by one
    ``renameat2(RENAME_EXCHANGE)`` (Linux 3.15+, ext4, xfs, btrfs, tmpfs): a kill at any
    moment leaves a whole checkpoint under ``final``, the old one or the new one, and the
    old one is then removed from ``tmp``. Where the exchange is refused, the old one is
    renamed aside first (``<final>.old-<id>``: a kill between the two renames leaves
    ``final`` missing, and ``load`` names the aside copy).
    """
    _fsync_dir(tmp)
    parent = os.path.dirname(os.path.abspath(final))
    old = None
    if os.path.exists(final):
        if _exchange(tmp, final):
            _fsync_dir(parent)
            shutil.rmtree(tmp, ignore_errors=True)  # the old checkpoint, swapped out
            return
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc 2.28+ / not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: str, b: str) -> bool:
    """Swap two existing paths atomically; False where the system or the file system
    refuses ([Note: replacing a checkpoint in one step])."""
    if _RENAMEAT2 is None:
        return False
    return _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


_RUN_TEMP = re.compile(r"^(step-\d+\.tmp-|\.latest\.tmp-)[0-9a-f]+$")


def remove_stale_temps(final: str, run_dir: bool) -> list[str]:
    """Remove what killed saves left beside ``final``: ``<final>.tmp-<id>`` (in a run
    directory every ``step-<n>.tmp-<id>`` and ``.latest.tmp-<id>``), and
    ``<final>.old-<id>`` once ``final`` is whole. A save that dies leaves its temp
    directory; repeated kills would fill the disk. Called by rank 0 when a save starts,
    once this process has no save in flight (one writer per checkpoint, as ever);
    returns the names removed."""
    parent = os.path.dirname(os.path.abspath(final))
    base = os.path.basename(os.path.abspath(final))
    if not os.path.isdir(parent):
        return []
    removed = []
    for name in sorted(os.listdir(parent)):
        mine = name.startswith(base + ".tmp-") or (run_dir and _RUN_TEMP.match(name))
        if mine or (name.startswith(base + ".old-") and _complete(final)):
            path = os.path.join(parent, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
            removed.append(name)
    return removed


def _write_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, f".{_LATEST}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, _LATEST))
    _fsync_dir(root)


def _rotate(root: str, keep: int, written: str) -> None:
    """Remove the run's checkpoints beyond ``keep``: ``written`` (the one just saved,
    which ``latest`` names) stays, with the newest ``keep - 1`` others by step.

    By step alone, a run resumed from an older checkpoint would delete the one it just
    wrote (its step is below the abandoned ones'). A checkpoint that ``latest`` names
    when it is about to go (another saver of the run moved the pointer) stays too.
    """
    others = [name for name in _step_dirs(root) if name != written]
    for name in others[: max(len(others) - (keep - 1), 0)]:
        # Read the pointer again before each removal: a concurrent save may move it.
        if name != _pointed(root):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _step_dirs(root: str) -> list[str]:
    """The run's ``step-<n>`` directories, oldest step first."""
    steps = sorted(
        (int(m.group(1)), name)
        for name in (os.listdir(root) if os.path.isdir(root) else [])
        if (m := _STEP_DIR.match(name)) and os.path.isdir(os.path.join(root, name))
    )
    return [name for _, name in steps]


def _pointed(root: str) -> str | None:
    """The name ``latest`` holds now, or None without a readable pointer."""
    try:
        with open(os.path.join(root, _LATEST)) as f:
            return f.read().strip()
    except OSError:
        return None
