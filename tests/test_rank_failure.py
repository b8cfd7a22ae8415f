"""A failed rank ends the whole job at once, with an error naming it (issue 15).

Real ``torchrun`` jobs of two gloo ranks train a ZeRO-1 step; at step 2 rank 1 raises,
is SIGKILLed, or hangs. Each job must end on every rank well before the collective
timeout would (or, for the hang, at that timeout), exit non-zero, and say which rank
failed and why ([Note: how a failed rank ends the job] in ``fscale/hw/launch.py``).
Also: the timeout's resolution order and its bad values.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fscale.hw import launch

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    import torch
    from torch.distributed.elastic.multiprocessing.errors import record
    import fscale as fs

    @record
    def main():
        mode, timeout = sys.argv[1], float(sys.argv[2])
        rank, world, device = fs.init_distributed("cpu", timeout_s=timeout)
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        params, apply = fs.functional(model)
        step = fs.train_step(lambda p, b: apply(p, b).pow(2).mean(), fs.optim.adamw(1e-2))
        step = fs.shard_zero(step, 1)
        params, state = step.init(params)
        for i in range(4):
            if i == 2 and rank == 1:
                if mode == "raise":
                    raise RuntimeError("rank 1 failed on purpose at step 2")
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if mode == "hang":
                    time.sleep(300)
            params, state, _ = step(params, state, torch.randn(8, 4))
        print(f"rank {rank} finished", flush=True)

    main()
    """
)


def _job(tmp_path: Path, mode: str, timeout_s: float) -> tuple[int, str, float]:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--monitor-interval", "0.2",
        str(script), mode, str(timeout_s),
    ]  # fmt: skip
    t0 = time.monotonic()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    return out.returncode, out.stdout + out.stderr, time.monotonic() - t0


@pytest.mark.parametrize(
    "mode, names",
    [
        ("raise", ["rank      : 1", "RuntimeError: rank 1 failed on purpose at step 2"]),
        ("kill", ["rank      : 1", "Signal 9 (SIGKILL)"]),
    ],
)
def test_a_failed_rank_ends_the_job_at_once_naming_it(tmp_path, mode, names):
    code, text, seconds = _job(tmp_path, mode, timeout_s=600)
    assert code != 0, text
    assert "rank 0 finished" not in text and "rank 1 finished" not in text
    for name in names:
        assert name in text, text
    # Ended by torchrun's agent, not by the 600 s collective timeout (start-up included).
    assert seconds < 120, (seconds, text)


def test_a_hung_rank_ends_the_job_at_the_timeout(tmp_path):
    code, text, seconds = _job(tmp_path, "hang", timeout_s=4)
    assert code != 0, text
    assert "rank 0 finished" not in text
    assert "rank      : 0" in text, text  # the waiting rank raised; the agent stopped rank 1
    assert seconds < 120, (seconds, text)  # the hang would last 300 s


def test_timeout_resolution_and_bad_values(monkeypatch):
    monkeypatch.delenv(launch.TIMEOUT_ENV, raising=False)
    assert launch.timeout_seconds() == launch.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(launch.TIMEOUT_ENV, "42")
    assert launch.timeout_seconds() == 42.0
    assert launch.timeout_seconds(7) == 7.0  # the argument wins
    for bad in (0, -1, float("nan"), float("inf"), "soon", True):
        with pytest.raises(ValueError, match="must be a positive number of seconds"):
            launch.timeout_seconds(bad)
    monkeypatch.setenv(launch.TIMEOUT_ENV, "ten")
    with pytest.raises(ValueError, match=r"\$FSCALE_PG_TIMEOUT_S must be a positive number"):
        launch.timeout_seconds()
    with pytest.raises(ValueError, match="device must be 'cuda' or 'cpu'"):
        launch.init_distributed("tpu")
