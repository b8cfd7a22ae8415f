"""fs.MetricsLogger: JSONL lines and TensorBoard scalars, readable as soon as logged."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fscale as fs
from fscale.metrics import read_jsonl
from tests.dist import run_world

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="MetricsLogger's event files: pip install -e '.[test]'",
)
ROOT = Path(__file__).resolve().parents[1]


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_each_log_call_is_readable_before_close(tmp_path):
    logger = fs.MetricsLogger(tmp_path)
    for step in range(1, 4):
        metrics = {
            "loss": torch.tensor(2.5 / step),  # 0-d tensor
            "grad_norm": torch.tensor([0.5 * step]),  # one element
            "lr": 1e-3 * step,
            "skipped_steps": step - 1,
            "nonfinite": False,
            "comm_bytes": {"all_reduce": 10},  # not a scalar: skipped
            "name": "gpt",
            "activations": torch.ones(3),
        }
        got = logger.log(step, metrics)
        assert got == {
            "loss": pytest.approx(2.5 / step),
            "grad_norm": 0.5 * step,
            "lr": pytest.approx(1e-3 * step),
            "skipped_steps": step - 1,
            "nonfinite": 0.0,
        }
        # Read from another handle while the logger is open: the line is there, whole.
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == step
        record = json.loads(lines[-1])
        assert record["step"] == step and record["loss"] == pytest.approx(2.5 / step)
        assert list(record) == ["step", "time", *got]
        # And TensorBoard's reader sees the scalars already.
        scalars = _scalars(tmp_path)
        assert scalars["loss"][-1] == (step, pytest.approx(2.5 / step))
        assert [s for s, _ in scalars["lr"]] == list(range(1, step + 1))
    logger.close()
    logger.close()  # idempotent
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="after close"):
        logger.log(4, {"loss": 1.0})


def test_nan_is_logged_and_reads_back(tmp_path):
    with fs.MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"loss": torch.tensor(float("nan")), "lr": float("inf")})
    (record,) = read_jsonl(tmp_path)
    assert math.isnan(record["loss"]) and record["lr"] == math.inf
    assert not any(p.name.startswith("events") for p in tmp_path.iterdir())


def test_jsonl_off_and_appending_resumed_runs(tmp_path):
    with fs.MetricsLogger(tmp_path, jsonl=False) as logger:
        logger.log(0, {"loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()
    assert _scalars(tmp_path)["loss"] == [(0, 1.0)]
    for start in (0, 2):  # a resumed run appends to the same file
        with fs.MetricsLogger(tmp_path, tensorboard=False) as logger:
            for step in range(start, start + 2):
                logger.log(step, {"loss": float(step)})
    assert [r["step"] for r in read_jsonl(tmp_path)] == [0, 1, 2, 3]


def test_read_jsonl_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_jsonl(path) == [{"step": 1, "loss": 2.0}]


def test_bad_metrics_are_refused(tmp_path):
    with fs.MetricsLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(TypeError, match="dict of scalars"):
            logger.log(0, [1.0])
        with pytest.raises(TypeError, match="names must be str"):
            logger.log(0, {1: 1.0})


_CHILD = textwrap.dedent(
    """
    import sys, time, torch
    import fscale as fs
    logger = fs.MetricsLogger(sys.argv[1])
    step = 0
    while True:
        logger.log(step, {"loss": torch.tensor(1.0 / (step + 1)), "step_sq": step * step})
        print(step, flush=True)
        step += 1
        time.sleep(0.01)
    """
)


def test_sigkill_keeps_every_logged_line(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        for _ in range(20):  # each printed step was logged before it was printed
            last = int(child.stdout.readline())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    records = read_jsonl(tmp_path)
    assert len(records) >= last + 1
    assert [r["step"] for r in records] == list(range(len(records)))
    assert all(r["step_sq"] == r["step"] ** 2 for r in records)
    assert [s for s, _ in _scalars(tmp_path)["loss"]][: last + 1] == list(range(last + 1))


def _world_log(rank, world, log_dir):
    with fs.MetricsLogger(log_dir) as logger:
        first = logger.log(0, {"loss": torch.tensor(float(rank))})
    with fs.MetricsLogger(log_dir + "_all", all_ranks=True, tensorboard=False) as logger:
        logger.log(0, {"rank": rank})
    return first


def test_rank_zero_only_by_default(tmp_path):
    log_dir = str(tmp_path / "run")
    assert run_world(_world_log, 2, log_dir) == [{"loss": 0.0}, None]
    assert [r["loss"] for r in read_jsonl(log_dir)] == [0.0]
    for rank in range(2):
        assert read_jsonl(f"{log_dir}_all/rank{rank}")[0]["rank"] == rank
