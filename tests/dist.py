"""Run a function in a gloo world of N CPU processes: the multi-rank test harness.

Usage::

    def _check(rank, world_size, n):          # module level: it is pickled by name
        return comm.all_reduce(torch.full((n,), float(rank)))

    results = run_world(_check, 2, 3)          # [rank 0's result, rank 1's result]

[Note: how ranks start]
Ranks are fresh processes from a ``forkserver`` that has imported torch once: a
``spawn`` child re-imports torch (2-3 s on this 2-core box, 5-10 s under load, per
world), a forkserver child starts in ~0.1 s. The server is a clean single-threaded
process, so forking it is as safe as spawn (never fork the test process itself: it
holds threads and torch state). ``FSCALE_TEST_START_METHOD=spawn`` restores spawn.
Because the server was started once, each rank re-applies the caller's current
``sys.path`` and environment (``monkeypatch.setenv`` reaches the ranks) before
unpickling ``fn``. Ranks meet through a FileStore in a private temporary directory,
so parallel pytest-xdist workers never race for a port, and results come back as
pickle files there (a torch queue would pass tensors as shared memory that dies
with the child).
"""

from __future__ import annotations

import datetime
import os
import pickle
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# After the first rank fails, how long the others get to report their own errors
# before they are killed (they are usually blocked in a collective with the dead rank).
_GRACE_S = 1.0
_PRELOAD = ("torch", "torch.distributed", "numpy", "optree", "triton", "pytest", "hypothesis")


class WorldError(RuntimeError):
    """Ranks raised or died; ``ranks`` lists them, the message holds their tracebacks."""

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ranks = ranks


def run_world(fn: Callable, world_size: int, *args, timeout: float = 120, **kwargs) -> list:
    """Call ``fn(rank, world_size, *args, **kwargs)`` on every rank of a gloo world.

    Args:
      fn: a module-level function: it is pickled by qualified name, so lambdas,
        closures and nested functions cannot cross into another process. Its return
        value must be picklable (tensors are fine).
      world_size: number of processes.
      timeout: seconds for the whole world, start-up included. Ranks still running
        then are killed and ``TimeoutError`` names them.

    Returns:
      The ranks' results, ordered by rank.

    Raises:
      WorldError: a rank raised or died; the message names it and holds its traceback
        (the first rank to fail comes first: later ones usually fail because of it).
      TimeoutError: some ranks did not finish within ``timeout`` seconds.
    """
    if world_size < 1:
        raise ValueError(f"run_world: world_size must be >= 1, got {world_size}.")
    try:
        job = pickle.dumps((fn, args, kwargs))
    except Exception as e:
        raise TypeError(
            f"run_world: cannot pickle {fn!r} or its arguments ({e}); fn must be a "
            "module-level function and its arguments picklable."
        ) from e
    ctx = _context()
    killed = []
    with tempfile.TemporaryDirectory(prefix="fscale-world-", ignore_cleanup_errors=True) as tmp:
        setup = (list(sys.path), dict(os.environ))
        procs = [  # daemon: should the caller die, multiprocessing kills the ranks at exit
            ctx.Process(
                target=_rank_main, args=(job, setup, rank, world_size, tmp, timeout), daemon=True
            )
            for rank in range(world_size)
        ]
        started = []
        try:
            for p in procs:
                p.start()
                started.append(p)
            _wait_for(procs, tmp, time.monotonic() + timeout)
        finally:
            for rank, p in enumerate(started):  # no rank outlives the call, whatever happened
                if p.is_alive():
                    p.kill()
                    killed.append(rank)
                p.join()
        outcomes = [_read(tmp, rank) for rank in range(world_size)]
    failures = []  # (when, rank, text)
    for r, outcome in enumerate(outcomes):
        if outcome is not None and outcome[0] == "error":
            failures.append((outcome[2], r, f"rank {r} raised:\n{outcome[1]}"))
        elif outcome is None and r not in killed:
            code = procs[r].exitcode
            failures.append((0, r, f"rank {r} died with exit code {code} and reported nothing."))
    unfinished = [r for r in killed if outcomes[r] is None]
    if failures:
        failures.sort()
        note = f"\n(ranks {unfinished} were still running and were killed)" if unfinished else ""
        text = "\n\n".join(t for _, _, t in failures) + note
        raise WorldError(text, sorted(r for _, r, _ in failures))
    if unfinished:
        raise TimeoutError(
            f"run_world({getattr(fn, '__qualname__', fn)}, {world_size}): ranks {unfinished} "
            f"did not finish within {timeout} s and were killed (a hang: look for a collective "
            "that only some ranks reached)."
        )
    return [outcome[1] for outcome in outcomes]


def _context():
    method = os.environ.get("FSCALE_TEST_START_METHOD", "forkserver")
    if method not in mp.get_all_start_methods():
        method = "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":  # preloads are read once, when the server starts
        # Heavy imports the caller already survived (so the server will too: it dies on
        # any error but ImportError); a rank then pays only for the test module itself.
        ctx.set_forkserver_preload([m for m in _PRELOAD if m in sys.modules])
    return ctx


def _wait_for(procs: list, tmp: str, deadline: float) -> None:
    """Block until every rank exits, one fails (plus a grace period) or the deadline passes."""
    failed_at = None
    while True:
        alive = [r for r, p in enumerate(procs) if p.is_alive()]
        now = time.monotonic()
        if not alive or now >= deadline:
            return
        if failed_at is None and any(
            p.exitcode not in (None, 0) or os.path.exists(_path(tmp, r, "error"))
            for r, p in enumerate(procs)
        ):
            failed_at = now
        if failed_at is not None and now - failed_at > _GRACE_S:
            return  # the survivors are killed by the caller; the failure is the story
        wait([procs[r].sentinel for r in alive], timeout=min(0.1, deadline - now))


def _rank_main(job: bytes, setup, rank: int, world_size: int, tmp: str, timeout: float) -> None:
    sys.path[:], env = setup
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(1)  # N ranks on a 2-core box otherwise oversubscribe badly
    try:
        fn, args, kwargs = pickle.loads(job)
        dist.init_process_group(
            "gloo",
            init_method=f"file://{os.path.join(tmp, 'store')}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        result = fn(rank, world_size, *args, **kwargs)
        _write(tmp, rank, "ok", pickle.dumps(("ok", result)))
    except BaseException:
        _write(tmp, rank, "error", pickle.dumps(("error", traceback.format_exc())))
        os._exit(1)  # no teardown: peers blocked on us fail fast instead of hanging
    try:
        # gloo: a rank that tears down while a peer is still connecting its mesh breaks
        # that peer's init ("Connection closed by peer"); meet once more first.
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        pass  # our result is already written; a peer's failure is reported by that peer


def _path(tmp: str, rank: int, kind: str) -> str:
    return os.path.join(tmp, f"rank{rank}.{kind}")


def _write(tmp: str, rank: int, kind: str, data: bytes) -> None:
    partial = _path(tmp, rank, "partial")  # write then rename: never read half a file
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, _path(tmp, rank, kind))


def _read(tmp: str, rank: int):
    """``(kind, body, mtime_ns)`` of what the rank reported, or None."""
    for kind in ("error", "ok"):
        path = _path(tmp, rank, kind)
        if os.path.exists(path):
            with open(path, "rb") as f:
                return (*pickle.load(f), os.stat(path).st_mtime_ns)
    return None
