"""SIGKILL a real saving process at random points; the run always loads its last good step.

A child process trains a small MLP (world of one, CPU) and saves every step with
``fs.save(run, params, state, at=k, keep=2)``. Before each save it
prints ``saving k <checksum>`` and after it ``saved k <seconds the save took>``; the
checksum is a SHA-256 of the bytes of every param and every tensor of the state. The test
waits for the child's first save, then for its next ``saving`` line, sleeps
uniform(0, 1.25 x the first save's time) and SIGKILLs it, then, in the test process:

- ``fs.load(run, step, params)`` succeeds, and what it loads is exactly one of the two
  acceptable checkpoints: the child's last ``saved`` step, or the step it had
  announced with ``saving`` after that one (the kill landed after the save was
  published, before ``saved`` was printed); its checksum equals the one announced for
  that step, bit for bit;
- ``fs.latest`` never names a ``.tmp-`` directory, and the temp directories a kill
  left are overwritten with garbage before loading, so reading one would fail;
- a new child resumes in the same run directory from ``fs.latest`` (it prints the
  checksum it loaded, which must match) and trains on; every step's checksum is the
  same whichever child computed it (training and resume are exact), so a checkpoint
  that is re-written after a resume holds the same values.

Each child is forked from one process started with ``subprocess.Popen`` (the
"zygote": it imports fscale once, ~3 s, and forks a child per kill, which it reaps
when told), so 24 kills cost seconds, not 24 imports.
A kill is classed by what it left: a new ``.tmp-`` directory (inside the write), the
announced step renamed into place but ``latest`` not moved (between the renames), or
``latest`` naming it (rotating, or not yet printed); else it landed outside a save.
A kill between the renames makes the next child save that step again over the
published one (its old copy set aside as ``.old-``, spoiled too when a kill leaves it).
"""

from __future__ import annotations

import hashlib
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import fscale as fs
from fscale.state import TensorEntry, describe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ("plain", "bf16", "zero1", "plain")  # one run directory each
KILLS_PER_RUN = 6  # 24 kills in all
TIMEOUT = 60.0


# ----------------------------------------------------------------------------- child side


def _build(kind: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(128, 1024),
        torch.nn.GELU(),
        torch.nn.Linear(1024, 768),
        torch.nn.GELU(),
        torch.nn.Linear(768, 128),
    )  # ~1 M params: ~12 MB with AdamW's moments, so a save takes tens of ms
    params, apply = fs.functional(model)

    def loss_fn(p, batch):
        return torch.nn.functional.mse_loss(apply(p, batch["x"]), batch["y"])

    step = fs.train_step(loss_fn, fs.optim.adamw(1e-3, weight_decay=0.1), clip_norm=1.0)
    if kind == "bf16":
        step = fs.mixed_precision(step, "bf16")
    elif kind == "zero1":
        step = fs.shard_zero(step, 1)
    return step, params


def _batch(k: int) -> dict:
    g = torch.Generator().manual_seed(1000 + k)
    return {"x": torch.randn(4, 128, generator=g), "y": torch.randn(4, 128, generator=g)}


def _checksum(params, state) -> str:
    """SHA-256 of every param and state tensor's bytes, by name: equal only bit for bit
    (a float sum would depend on the reduction order of the process's threads)."""
    h = hashlib.sha256()
    tensors = [(f"params/{n}", t) for n, t in params.items()]
    tensors += [(p, e.tensor) for p, e in describe(state).items() if isinstance(e, TensorEntry)]
    for name, t in sorted(tensors, key=lambda x: x[0]):
        t = t.detach().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # one write: lines of child and zygote never mix


def _child(run: str, kind: str, zygote: int) -> None:
    torch.set_num_threads(1)
    step, params = _build(kind)
    if fs.latest(run) is not None:
        params, state = fs.load(run, step, params)
        start = int(os.path.basename(fs.latest(run)).split("-")[1])
        _say(f"resumed {start} {_checksum(params, state)}")
    else:
        params, state = step.init(params)
        start = 0
    for k in range(start + 1, start + 200):  # bounded: the test kills it long before
        if os.getppid() != zygote:
            return  # the zygote is gone: so is the test
        params, state, _ = step(params, state, _batch(k))
        _say(f"saving {k} {_checksum(params, state)}")
        t0 = time.perf_counter()
        fs.save(run, params, state, at=k, keep=2)
        _say(f"saved {k} {time.perf_counter() - t0!r}")


def _zygote() -> None:
    """Read ``go <run> <kind>`` / ``reap <pid>`` lines; fork a child for each ``go``."""
    me = os.getpid()
    _say("ready")
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "go":
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    _say(f"start {os.getpid()}")
                    _child(args[0], args[1], me)
                except BaseException as e:  # noqa: B036 - reported, then the child ends
                    _say(f"error {type(e).__name__}: {e}")
                    code = 1
                finally:
                    os._exit(code)
        elif cmd == "reap":
            _, status = os.waitpid(int(args[0]), 0)
            _say(f"reaped {args[0]} {status}")


# ----------------------------------------------------------------------------- test side


class _Zygote:
    def __init__(self):
        code = f"import sys; sys.path.insert(0, {ROOT!r}); import tests.test_checkpoint_kill as t"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code + "; t._zygote()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.expect("ready")
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("eof")

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def next(self) -> list[str]:
        try:
            line = self.lines.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no line from the child in {TIMEOUT} s") from None
        if line.startswith(("error", "eof")):
            raise AssertionError(f"the child failed: {line}")
        return line.split()

    def expect(self, word: str) -> list[str]:
        got = self.next()
        assert got[0] == word, got
        return got

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the zygote and any child left
        except ProcessLookupError:
            pass
        self.proc.wait()


def _aside(run, kind: str) -> set[str]:
    """The ``step-<k>.tmp-<id>`` (a save's write) or ``.old-<id>`` (a checkpoint being
    replaced) directories of the run."""
    return {n for n in os.listdir(run) if re.fullmatch(rf"step-\d+\.{kind}-[0-9a-f]+", n)}


def _spoil(path) -> None:
    """Overwrite every file of a directory: a load that read it would fail."""
    for dirpath, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(dirpath, f), "wb") as fh:
                fh.write(b"not a checkpoint")


class _Reported:
    """What the children of one run directory said: the checksum announced for each
    step (the same from every child), the last step reported saved, and the step
    announced and not yet reported saved (``pending``)."""

    def __init__(self):
        self.announced: dict[int, str] = {}
        self.last_saved: int | None = None
        self.pending: int | None = None

    def take(self, got: list[str]) -> float | None:
        """Take a ``saving`` or ``saved`` line; a ``saved`` one returns the save's seconds."""
        k = int(got[1])
        if got[0] == "saving":
            assert self.announced.setdefault(k, got[2]) == got[2], (k, got[2], self.announced)
            self.pending = k
            return None
        assert got[0] == "saved" and k == self.pending, (got, self.pending)
        self.last_saved, self.pending = k, None
        return float(got[2])


def test_sigkill_at_random_points_of_saves_leaves_the_last_good_checkpoint(tmp_path):
    rng = random.Random(15)
    phases = dict.fromkeys(("writing", "published", "pointed", "outside"), 0)
    olds = 0
    t_start = time.perf_counter()
    zygote = _Zygote()
    try:
        for r, kind in enumerate(RUNS):
            run = tmp_path / f"run{r}-{kind}"
            run.mkdir()
            said = _Reported()
            for _ in range(KILLS_PER_RUN):
                tmps_before, olds_before = _aside(run, "tmp"), _aside(run, "old")
                zygote.send(f"go {run} {kind}")
                pid = int(zygote.expect("start")[1])
                said.pending = None
                got = zygote.next()
                if got[0] == "resumed":  # from the checkpoint the test loaded last
                    assert int(got[1]) == said.last_saved, (got, said.last_saved)
                    assert got[2] == said.announced[said.last_saved], got
                    got = zygote.next()
                # Two saves, the second one timed (a child's first save is slower) ...
                saves, save_s = 0, None
                while saves < 2:
                    if (t := said.take(got)) is not None:
                        saves, save_s = saves + 1, t
                    if saves < 2:
                        got = zygote.next()
                # ... then a kill at a random point of the next save, or just after it.
                said.take(zygote.expect("saving"))
                time.sleep(rng.uniform(0, 1.25 * save_s))
                os.kill(pid, signal.SIGKILL)
                zygote.send(f"reap {pid}")
                # Lines the child printed before it died, then the zygote's "reaped".
                while (got := zygote.next())[0] != "reaped":
                    said.take(got)
                assert int(got[1]) == pid and os.WIFSIGNALED(int(got[2])), got

                # What the kill left; temp and set-aside directories spoiled.
                new_tmps = _aside(run, "tmp") - tmps_before
                new_olds = _aside(run, "old") - olds_before
                olds += len(new_olds)
                for name in new_tmps | new_olds:
                    _spoil(run / name)
                where = fs.latest(run)
                assert where is not None and ".tmp-" not in where, where
                k = int(os.path.basename(where).split("-")[1])
                # Acceptable: the last step reported saved, or the one announced after
                # it when its save was published before the kill.
                assert k in (said.last_saved, said.pending), (k, said.last_saved, said.pending)
                if new_tmps:
                    phases["writing"] += 1  # inside DCP's write, before the rename
                elif k == said.pending:
                    phases["pointed"] += 1  # latest written; rotating, or not yet printed
                elif (
                    said.pending is not None
                    and (run / f"step-{said.pending}" / ".metadata").exists()
                ):
                    phases["published"] += 1  # renamed into place, latest not yet moved
                else:
                    phases["outside"] += 1  # before the write began, or after the print
                step, params = _build(kind)
                params, state = fs.load(run, step, params)
                assert _checksum(params, state) == said.announced[k], (k, kind)
                said.last_saved = k  # what the next child resumes from
    finally:
        zygote.close()
    elapsed = time.perf_counter() - t_start
    kills = sum(phases.values())
    print(f"{kills} kills in {elapsed:.1f} s: {phases}, {olds} .old- left")
    assert kills >= 20
    # The delays spread the kills over the saves: most land inside one.
    assert kills - phases["outside"] >= 6, phases


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s"]))
