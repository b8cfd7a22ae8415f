"""[Note: replacing a checkpoint in one step] (``fscale/_checkpoint/files.py``): a save over
an existing checkpoint directory swaps the two in one ``renameat2(RENAME_EXCHANGE)``, so a
crash at any point leaves a whole checkpoint under the path; where the exchange is refused
the old one goes aside and ``load`` names it; saves remove what killed saves left."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import fscale as fs
from fscale._checkpoint import files
from tests.test_checkpoint import (
    _batches,
    _build,
    _equal,
    _Killed,
    _train,
    _trained,
    crash_at_each_point,
    inject_crashes,
)

needs_exchange = pytest.mark.skipif(files._RENAMEAT2 is None, reason="no renameat2 here")


def _two_states():
    step, params, state = _trained()
    old = {k: v.clone() for k, v in params.items()}
    params, state = _train(step, params, state, _batches(0, 1, 1, seed=5))
    return old, params, state


@needs_exchange
def test_a_crash_at_any_point_of_a_save_over_a_path_leaves_a_whole_checkpoint(
    tmp_path, monkeypatch
):
    old, params, state = _two_states()
    base = tmp_path / "base"
    fs.save(base, old, state)
    targets = ((os, "fsync"), (os, "rename"), (shutil, "rmtree"), (files, "_exchange"))
    calls = inject_crashes(monkeypatch, (*targets, (torch, "save")))
    shutil.copytree(base, tmp_path / "count")
    fs.save(tmp_path / "count", params, state)
    assert calls["n"] >= 10, calls["n"]
    seen = set()
    for path in crash_at_each_point(calls, base, tmp_path, lambda p: fs.save(p, params, state)):
        loaded, _ = fs.load(path, *_build(()))  # never missing, never half
        which = "new" if torch.equal(loaded["head.weight"], params["head.weight"]) else "old"
        _equal(loaded, params if which == "new" else old)
        seen.add(which)
        assert not [n for n in os.listdir(tmp_path) if n.startswith(f"{path.name}.old-")]
    assert seen == {"old", "new"}


def test_without_the_exchange_a_crash_between_renames_is_named_by_load(tmp_path, monkeypatch):
    old, params, state = _two_states()
    path = tmp_path / "ckpt"
    fs.save(path, old, state)
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)  # e.g. a file system without
    real_rename = os.rename

    def killed_second(src, dst):
        if os.fspath(dst) == str(path):  # the new one into place: the old one is aside
            raise _Killed("between the renames")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", killed_second)
    with pytest.raises(_Killed):
        fs.save(path, params, state)
    monkeypatch.setattr(os, "rename", real_rename)
    (aside,) = [n for n in os.listdir(tmp_path) if n.startswith("ckpt.old-")]
    with pytest.raises(FileNotFoundError, match=f"previous checkpoint is '{aside}'.*rename it"):
        fs.load(path, *_build(()))
    os.rename(tmp_path / aside, path)  # what the message says
    loaded, _ = fs.load(path, *_build(()))
    _equal(loaded, old)
    # The next save over it replaces it (by renames again) and leaves nothing beside it.
    fs.save(path, params, state)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_saves_remove_what_killed_saves_left(tmp_path):
    old, params, state = _two_states()
    run, plain = tmp_path / "run", tmp_path / "plain"
    fs.save(run, old, state, at=1)
    fs.save(plain, old, state)
    # Left by killed saves: temp directories of this and other steps, a pointer's temp
    # file, a plain checkpoint's temp and aside copies; and things that are not theirs.
    for name in ("step-2.tmp-9f3a", "step-7.tmp-0be1", "step-3.tmp-notes"):
        os.makedirs(run / name)
    (run / ".latest.tmp-77aa").write_text("step-1")
    (run / "notes.txt").write_text("mine")
    for name in ("plain.tmp-5e5e", "plain.old-1234abcd", "plainer.tmp-5e5e"):
        os.makedirs(tmp_path / name)
    fs.save(run, params, state, at=2)
    fs.save(plain, params, state)
    assert sorted(os.listdir(run)) == [
        "latest",
        "notes.txt",
        "step-1",
        "step-2",
        "step-3.tmp-notes",
    ]
    assert sorted(os.listdir(tmp_path)) == ["plain", "plainer.tmp-5e5e", "run"]
    loaded, _ = fs.load(run, *_build(()))
    _equal(loaded, params)
