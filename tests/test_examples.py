"""Smoke tests of the example gallery: each runs as a user would run it, in a subprocess."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_GPT = ROOT / "examples" / "train_gpt.py"
TINY = ["--preset", "tiny", "--steps", "5", "--seq-len", "32"]

pytest.importorskip("matplotlib", reason="the examples plot: pip install -e '.[examples]'")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # This checkout's fscale, whatever is installed; and never a world inherited from
    # a launcher running pytest itself.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MPLBACKEND", "Agg")
    return env


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def _results(png: Path) -> dict:
    assert png.is_file() and png.stat().st_size > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads(png.with_suffix(".json").read_text())
    assert len(metrics["train_loss"]) == 5
    for value in (*metrics["train_loss"], *metrics["val_loss"], metrics["tokens_per_s"]):
        assert math.isfinite(value)
    return metrics


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory) -> dict:
    png = tmp_path_factory.mktemp("train_gpt_1") / "loss.png"
    cmd = [sys.executable, str(TRAIN_GPT), *TINY, "--batch-size", "4", "--out", str(png)]
    proc = _run(cmd, timeout=120)
    assert "done in" in proc.stdout
    return _results(png)


def test_train_gpt_world_of_one(world_of_one):
    assert world_of_one["world"] == 1
    # Byte-level start: close to ln(256) = 5.55 before any step, falling after 5.
    assert world_of_one["first_train_loss"] == pytest.approx(math.log(256), abs=0.5)
    assert world_of_one["val_loss"][-1] < world_of_one["val_loss"][0]


@pytest.mark.parametrize("zero", [[], ["--zero", "3"]], ids=["ddp", "zero3"])
def test_train_gpt_under_torchrun_matches_world_of_one(world_of_one, tmp_path, zero):
    png = tmp_path / "loss.png"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    # Per-rank batch 2 x 2 ranks: the same global batch of 4 as the world of one.
    args = [str(TRAIN_GPT), *TINY, "--batch-size", "2", "--out", str(png), *zero]
    _run([*cmd, *args], timeout=180)
    metrics = _results(png)
    assert metrics["world"] == 2
    assert metrics["global_batch"] == world_of_one["global_batch"] == 4
    # Same seed, same global batches, grads averaged over ranks: the same training run
    # up to the summation order of the all-reduce.
    assert metrics["train_loss"] == pytest.approx(world_of_one["train_loss"], rel=1e-4)
    assert metrics["val_loss"] == pytest.approx(world_of_one["val_loss"], rel=1e-4)


def test_train_gpt_with_delayed_offload_update(world_of_one, tmp_path):
    """--offload cpu --delayed-update: the first loss is the plain run's (same params),
    and training still lowers the loss with each update landing a step late."""
    png = tmp_path / "loss.png"
    cmd = [sys.executable, str(TRAIN_GPT), *TINY, "--batch-size", "4", "--out", str(png)]
    _run([*cmd, "--offload", "cpu", "--delayed-update"], timeout=180)
    metrics = _results(png)
    assert metrics["train_loss"][0] == pytest.approx(world_of_one["train_loss"][0], rel=1e-6)
    assert metrics["train_loss"][1:] != pytest.approx(world_of_one["train_loss"][1:], rel=1e-6)
    assert metrics["val_loss"][-1] < metrics["val_loss"][0]


def test_train_gpt_with_checkpoint_activations(world_of_one, tmp_path):
    """--checkpoint-activations selective: recomputing in backward changes no number."""
    png = tmp_path / "loss.png"
    cmd = [sys.executable, str(TRAIN_GPT), *TINY, "--batch-size", "4", "--out", str(png)]
    proc = _run([*cmd, "--checkpoint-activations", "selective"], timeout=180)
    assert "checkpoint_activations(policy='selective')" in proc.stdout
    metrics = _results(png)
    assert metrics["train_loss"] == world_of_one["train_loss"]
    assert metrics["val_loss"] == world_of_one["val_loss"]
