"""``keep=`` rotation of a run directory: the checkpoint just written always stays.

- After a rollback (resume from an older step, save a step below the abandoned
  ones), ``keep=1`` keeps the new checkpoint, and ``latest`` still names it.
- ``keep=k`` keeps the new checkpoint plus the newest ``k - 1`` others by step.
- A checkpoint that ``latest`` names when a removal comes (a concurrent saver moved
  the pointer) is never removed.
"""

from __future__ import annotations

import os
import shutil
import warnings

import torch

import fscale as fs
from fscale._checkpoint import files
from tests.helpers import mlp, regression_batches, regression_loss


def _step():
    params, apply = fs.functional(mlp([3, 4, 2]))
    return fs.train_step(regression_loss(apply), fs.optim.sgd(lr=0.1)), params


def _trained():
    step, params = _step()
    params, state = step.init(params)
    for batch in regression_batches(1, 2, 3, 2):
        params, state, _ = step(params, state, batch)
    return step, params, state


def _run_dir(root, steps, latest):
    """A fake run directory: a complete ``step-<n>`` per step, ``latest`` naming one."""
    for n in steps:
        os.makedirs(root / f"step-{n}")
        (root / f"step-{n}" / ".metadata").write_bytes(b"")
    (root / "latest").write_text(f"step-{latest}\n")


def _steps_left(root):
    return sorted(int(n.split("-")[1]) for n in os.listdir(root) if n.startswith("step-"))


def test_rotation_after_a_rollback_keeps_the_checkpoint_just_written(tmp_path):
    step, params, state = _trained()
    fs.save(tmp_path, params, state, at=200)
    fs.save(tmp_path, params, state, at=300)
    fresh, full = _step()
    params, state = fs.load(tmp_path / "step-200", fresh, full)
    fs.save(tmp_path, params, state, at=210, keep=1)
    assert _steps_left(tmp_path) == [210]
    assert (tmp_path / "latest").read_text().strip() == "step-210"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to another step
        assert fs.latest(tmp_path) == str(tmp_path / "step-210")
    loaded, _ = fs.load(tmp_path, *_step())
    for name, value in params.items():
        assert torch.equal(loaded[name], value), name


def test_rotation_keeps_the_new_checkpoint_and_the_newest_others(tmp_path):
    _run_dir(tmp_path, [100, 200, 300, 400, 210], latest=210)
    files._rotate(str(tmp_path), 3, "step-210")
    assert _steps_left(tmp_path) == [210, 300, 400]


def test_rotation_in_order_keeps_the_newest(tmp_path):
    _run_dir(tmp_path, [1, 2, 3, 4, 5], latest=5)
    files._rotate(str(tmp_path), 3, "step-5")
    assert _steps_left(tmp_path) == [3, 4, 5]


def test_rotation_spares_what_a_concurrent_latest_names(tmp_path):
    _run_dir(tmp_path, [1, 2, 3, 9], latest=1)  # another saver pointed latest at step-1
    files._rotate(str(tmp_path), 1, "step-9")
    assert _steps_left(tmp_path) == [1, 9]


def test_rotation_rereads_latest_before_each_removal(tmp_path, monkeypatch):
    _run_dir(tmp_path, [1, 2, 3, 9], latest=9)
    rmtree = shutil.rmtree

    def moving_the_pointer(path, *args, **kwargs):
        # A concurrent save publishes step-3 while rotation removes step-1.
        (tmp_path / "latest").write_text("step-3\n")
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", moving_the_pointer)
    files._rotate(str(tmp_path), 1, "step-9")
    assert _steps_left(tmp_path) == [3, 9]
