"""Smoke tests of the example gallery: each runs as a user would run it, in a subprocess."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fscale as fs
from fscale.metrics import read_jsonl
from tests.dist import run_world

ROOT = Path(__file__).resolve().parents[1]
TRAIN_GPT = ROOT / "examples" / "train_gpt.py"
TINY = ["--preset", "tiny", "--steps", "5", "--seq-len", "32"]

pytest.importorskip("matplotlib", reason="the examples plot: pip install -e '.[examples]'")
pytest.importorskip(
    "tensorboard", reason="train_gpt.py logs to TensorBoard: pip install -e '.[examples]'"
)


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


def _results(png: Path, resumed: bool = False) -> dict:
    assert png.is_file() and png.stat().st_size > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads(png.with_suffix(".json").read_text())
    assert len(metrics["train_loss"]) == 5
    for value in (*metrics["train_loss"], *metrics["val_loss"], metrics["tokens_per_s"]):
        assert math.isfinite(value)
    # The log written as it went (default --log-dir: <stem>_logs): the logged step's loss
    # is the global-batch mean the JSON reports, with lr, grad norm and tokens/s.
    log_dir = png.with_name(png.stem + "_logs")
    records = read_jsonl(log_dir)
    (last,) = [r for r in records if "loss" in r]  # --log-every 10 > 5 steps: the last only
    assert last["step"] == 5 and last["loss"] == metrics["train_loss"][-1]
    assert last["lr"] > 0 and last["grad_norm"] > 0 and last["tokens_per_s"] > 0
    logged_val = [r["val_loss"] for r in records if "val_loss" in r]
    # A resumed run logs from its checkpoint on; its JSON holds the whole curve.
    expected = metrics["val_loss"][-len(logged_val) :] if resumed else metrics["val_loss"]
    assert logged_val == expected
    events = [p for p in log_dir.iterdir() if p.name.startswith("events.out.tfevents")]
    assert len(events) == 1  # rank 0 only
    return metrics


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory) -> dict:
    png = tmp_path_factory.mktemp("train_gpt_1") / "loss.png"
    export = png.with_name("export")
    cmd = [sys.executable, str(TRAIN_GPT), *TINY, "--batch-size", "4", "--out", str(png)]
    proc = _run([*cmd, "--export", str(export)], timeout=120)
    assert "done in" in proc.stdout
    return {**_results(png), "export": export}


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
    _run([*cmd, *args, "--export", str(tmp_path / "export")], timeout=180)
    metrics = _results(png)
    assert metrics["world"] == 2
    assert metrics["global_batch"] == world_of_one["global_batch"] == 4
    # Same seed, same global batches, grads averaged over ranks: the same training run
    # up to the summation order of the all-reduce.
    assert metrics["train_loss"] == pytest.approx(world_of_one["train_loss"], rel=1e-4)
    assert metrics["val_loss"] == pytest.approx(world_of_one["val_loss"], rel=1e-4)
    # --export gathers the (ZeRO-3: sharded) weights: those of the world of one.
    from safetensors.torch import load_file

    mine = load_file(tmp_path / "export" / "model.safetensors")
    ref = load_file(world_of_one["export"] / "model.safetensors")
    assert mine.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(mine[k], ref[k], rtol=1e-3, atol=1e-5)


def test_train_gpt_export_is_served(world_of_one):
    """--export writes a directory fscale.serve loads (the GPTConfig as config.json)."""
    from fscale.serve import Engine, SamplingParams

    engine = Engine(world_of_one["export"])
    (out,) = engine.generate(["def "], SamplingParams(max_tokens=6, temperature=0.0))
    assert len(out.token_ids) == 6 and isinstance(out.text, str)


@pytest.mark.parametrize(
    "flags",
    [
        ["--compress", "onebit_adam", "--compress-warmup", "3", "--offload", "cpu"],
        ["--zero", "3", "--compress", "zeropp"],
    ],
    ids=["onebit_adam_offloaded", "zeropp"],
)
def test_train_gpt_compressed_under_torchrun(world_of_one, tmp_path, flags):
    """--compress on 2 ranks: the plan lists the compressed collectives, and training
    stays near the uncompressed run (1-bit Adam: the last 2 of 5 steps compressed)."""
    png = tmp_path / "loss.png"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = [str(TRAIN_GPT), *TINY, "--batch-size", "2", "--out", str(png), *flags]
    proc = _run([*cmd, *args], timeout=240)
    assert ("onebit_adam" if "onebit_adam" in flags else "zeropp") in proc.stdout
    metrics = _results(png)
    assert metrics["world"] == 2
    assert metrics["val_loss"][-1] == pytest.approx(world_of_one["val_loss"][-1], rel=0.05)


def test_train_gpt_help_prints():
    proc = _run([sys.executable, str(TRAIN_GPT), "--help"], timeout=120)
    assert "--compress" in proc.stdout and "% of steps" in proc.stdout


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


def test_train_gpt_with_compile(world_of_one, tmp_path):
    """--compile: the blocks run torch.compile'd (Inductor on CPU); the losses stay those of
    the eager run up to the fused kernels' rounding."""
    png = tmp_path / "loss.png"
    cmd = [sys.executable, str(TRAIN_GPT), *TINY, "--batch-size", "4", "--out", str(png)]
    proc = _run([*cmd, "--compile"], timeout=300)
    assert "compile_units" in proc.stdout
    metrics = _results(png)
    for key in ("train_loss", "val_loss"):
        got, want = torch.tensor(metrics[key]), torch.tensor(world_of_one[key])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


def test_train_gpt_log_survives_sigkill(tmp_path):
    """--log-dir lines are on disk as they are logged: a killed run keeps them all."""
    log_dir = tmp_path / "logs"
    cmd = [sys.executable, str(TRAIN_GPT), *TINY[:2], "--steps", "100000", "--seq-len", "32"]
    cmd += ["--batch-size", "2", "--out", str(tmp_path / "loss.png"), "--log-dir", str(log_dir)]
    # stderr to a file: tqdm's bar would fill a pipe nobody reads and stall the child.
    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        child = subprocess.Popen([*cmd, "--log-every", "1"], cwd=ROOT, env=_env(),
                                 stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            path = log_dir / "metrics.jsonl"
            if path.exists() and sum("loss" in r for r in read_jsonl(path)) >= 5:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"no 5 logged steps in 120 s: {err.read_text()[-2000:]}")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    train = [r for r in read_jsonl(log_dir) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))
    assert all(math.isfinite(r["loss"]) and r["lr"] >= 0 for r in train)  # warmup from 0
    assert not (tmp_path / "loss.json").exists()  # the end-of-run JSON never came


def test_train_gpt_resume_is_exact_and_reshards(world_of_one, tmp_path):
    """Stop after step 3 (its checkpoint is the newest left), --resume: the same run as
    the uninterrupted one, bit for bit; and resumed under torchrun with ZeRO-3 on 2 ranks
    from the world of one's checkpoint, the same up to the all-reduce's summation order."""
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, str(TRAIN_GPT), *TINY, "--batch-size", "4", "--save-dir", str(ckpt)]
    _run([*cmd, "--out", str(tmp_path / "a" / "loss.png"), "--save-every", "3"], timeout=180)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-3", "step-5"]
    shutil.rmtree(ckpt / "step-5")  # as if killed after step 3: latest falls back to step-3
    copy = tmp_path / "ckpt_copy"
    shutil.copytree(ckpt, copy)

    proc = _run([*cmd, "--out", str(tmp_path / "b" / "loss.png"), "--resume"], timeout=180)
    assert "resuming from" in proc.stdout and "step-3" in proc.stdout
    resumed = _results(tmp_path / "b" / "loss.png", resumed=True)
    assert resumed["train_loss"] == world_of_one["train_loss"]
    assert resumed["val_loss"] == world_of_one["val_loss"]

    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = [str(TRAIN_GPT), *TINY, "--batch-size", "2", "--zero", "3", "--save-dir", str(copy)]
    _run([*run, *args, "--out", str(tmp_path / "c" / "loss.png"), "--resume"], timeout=240)
    sharded = _results(tmp_path / "c" / "loss.png", resumed=True)
    assert sharded["world"] == 2
    assert sharded["train_loss"][:3] == world_of_one["train_loss"][:3]  # from the checkpoint
    assert sharded["train_loss"] == pytest.approx(world_of_one["train_loss"], rel=1e-4)
    assert sharded["val_loss"] == pytest.approx(world_of_one["val_loss"], rel=1e-4)


def _train_gpt():
    spec = importlib.util.spec_from_file_location("train_gpt", TRAIN_GPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rng_saved_and_restored(rank: int, world: int, ckpt: str) -> dict:
    """A rank-dependent draw, a save with the example's RNG extra, more draws, then the
    example's restore: for this rank, and for a rank beyond the saved world."""
    train_gpt, cpu = _train_gpt(), torch.device("cpu")
    params, apply = fs.functional(torch.nn.Linear(2, 2))
    step = fs.train_step(lambda p, b: apply(p, b).sum(), fs.optim.sgd(lr=0.1))
    params, state = step.init(params)
    torch.manual_seed(0)
    torch.rand(1 + rank)  # a rank-dependent draw: the ranks' states differ
    saved = torch.get_rng_state()
    fs.save(ckpt, params, state, at=3, extra={"step": 3, **train_gpt.rng_states(cpu)})
    torch.rand(5)  # drawn after the save: the resume must not see it
    own = train_gpt.restore_rng_states(ckpt, rank, cpu, seed=0, step=3)
    restored = torch.get_rng_state()
    beyond = train_gpt.restore_rng_states(ckpt, world + rank, cpu, seed=0, step=3)
    return dict(saved=saved, restored=restored, own=own, beyond=beyond, new=torch.get_rng_state())


def test_train_gpt_restores_each_ranks_own_rng_state(tmp_path):
    """Each of 2 ranks gets back the CPU RNG state it had at the save (they differ);
    ranks 2 and 3, beyond the saved world, are seeded by fallback_seed(seed, step, rank)."""
    got = run_world(_rng_saved_and_restored, 2, str(tmp_path / "ckpt"))
    assert not torch.equal(got[0]["saved"], got[1]["saved"])
    for rank, r in enumerate(got):
        assert r["own"], rank
        assert torch.equal(r["restored"], r["saved"]), f"rank {rank} lost its RNG state"
    train_gpt = _train_gpt()
    for rank, r in zip((2, 3), got, strict=True):
        assert r["beyond"] is False
        seeded = torch.Generator().manual_seed(train_gpt.fallback_seed(0, 3, rank))
        assert torch.equal(r["new"], seeded.get_state())
    assert not torch.equal(got[0]["new"], got[1]["new"])


def _logged(png: Path) -> tuple[dict, list[dict]]:
    """The run's JSON and its per-step training records (``--log-every 1``)."""
    metrics = json.loads(png.with_suffix(".json").read_text())
    records = read_jsonl(png.with_name(png.stem + "_logs"))
    return metrics, [r for r in records if "loss" in r]


def test_train_gpt_with_curriculum_and_random_ltd(tmp_path):
    """--curriculum 16 --random-ltd 16: the length grows 16 -> 64 over the first 30% of
    steps, the middle blocks keep 16 -> 64 tokens over the run; tokens count the cut batch."""
    png = tmp_path / "loss.png"
    cmd = [sys.executable, str(TRAIN_GPT), "--preset", "small", "--steps", "10", "--seq-len", "64"]
    cmd += ["--batch-size", "4", "--log-every", "1", "--out", str(png)]
    proc = _run([*cmd, "--curriculum", "16", "--random-ltd", "16"], timeout=180)
    assert "curriculum(" in proc.stdout and "random_ltd(" in proc.stdout  # the stack line
    metrics, steps = _logged(png)
    seqlen = [int(r["seqlen"]) for r in steps]
    keep = [int(r["random_ltd_keep"]) for r in steps]
    assert seqlen == [16, 32, 48, 64, 64, 64, 64, 64, 64, 64]  # seqlen_warmup over 3 steps
    assert keep[0] == 16 and keep[-1] == 64 and keep == sorted(keep)
    assert all(k <= s for k, s in zip(keep, seqlen, strict=True))
    assert any(k < s for k, s in zip(keep, seqlen, strict=True))  # some tokens were dropped
    assert metrics["curriculum"] == 16 and metrics["random_ltd"] == 16
    assert metrics["tokens"] == 4 * sum(seqlen)  # the tokens fed, not 10 x 4 x 64
    assert all(math.isfinite(v) for v in metrics["val_loss"])
    assert metrics["val_loss"][-1] < metrics["val_loss"][0]


def test_train_gpt_random_ltd_needs_middle_blocks(tmp_path):
    cmd = [sys.executable, str(TRAIN_GPT), *TINY, "--random-ltd", "8", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--preset small" in proc.stderr


def test_train_gpt_with_offload_activations(tmp_path):
    """--offload-activations, alone (policy none) and over --checkpoint-activations
    selective: activations go to the host and back, and no number changes."""
    cmd = [sys.executable, str(TRAIN_GPT), "--preset", "small", "--steps", "3"]
    cmd += ["--batch-size", "16", "--log-every", "1"]  # 16 x 128 x 512 fp32: 4 MiB MLP input
    runs = {}
    for name, extra in {
        "plain": [],
        "offload": ["--offload-activations"],
        "selective": ["--offload-activations", "--checkpoint-activations", "selective"],
    }.items():
        png = tmp_path / name / "loss.png"
        _run([*cmd, "--out", str(png), *extra], timeout=180)
        runs[name] = _logged(png)
    plain = runs.pop("plain")
    assert "activation_offload_bytes" not in plain[1][0]
    for metrics, steps in runs.values():
        assert metrics["offload_activations"] is True
        assert all(r["activation_offload_bytes"] > 0 for r in steps)
        assert metrics["train_loss"] == plain[0]["train_loss"]
        assert metrics["val_loss"] == plain[0]["val_loss"]


def test_train_gpt_moe_expert_and_tensor_parallel_matches_world_of_one(tmp_path):
    """--experts 4 --ep 2 --tp 2 on 4 ranks (2 data ranks x batch 2) takes the steps of
    the world of one with the same global batch in 2 micro-batches (a rank routes its
    own tokens, as a micro-batch does); the plan shows the mesh and both transforms."""
    moe = ["--experts", "4", "--top-k", "2"]
    one = tmp_path / "one.png"
    cmd = [sys.executable, str(TRAIN_GPT), *TINY, *moe, "--batch-size", "4", "--accumulate", "2"]
    _run([*cmd, "--out", str(one)], timeout=180)
    png = tmp_path / "loss.png"
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
    args = [str(TRAIN_GPT), *TINY, *moe, "--ep", "2", "--tp", "2", "--batch-size", "2"]
    proc = _run([*run, *args, "--out", str(png)], timeout=240)
    assert "Mesh(dp=1, ep=2, tp=2)" in proc.stdout
    assert "expert_parallel(dim='ep'" in proc.stdout and "tensor_parallel(dim='tp'" in proc.stdout
    metrics, reference = _results(png), _results(one)
    assert metrics["world"] == 4 and metrics["global_batch"] == reference["global_batch"] == 4
    assert metrics["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-3)
    assert metrics["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-3)
