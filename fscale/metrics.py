"""``MetricsLogger``: scalar training metrics to TensorBoard and a JSONL file, as they come.

Each ``log(step, metrics)`` call appends one JSON line (``{"step": ..., "time": ...,
**scalars}``) to ``<log_dir>/metrics.jsonl`` and one scalar per key to TensorBoard's event
file, then flushes both and fsyncs the JSONL file: a run killed at any moment (SIGKILL,
OOM, a lost node) keeps every line logged before it, each complete and parseable.

[Note: one host sync per log call]
Metrics from a step are 0-d device tensors (reading one blocks until the GPU gets
there). ``log`` stacks every tensor value and copies them to the host in one transfer,
so a logged step costs one sync and an unlogged step costs none: log every N steps.

Only rank 0 writes by default (``all_ranks=True``: every rank, into ``rank<r>/``); other
ranks get a logger whose ``log`` does nothing, so the same code runs on every rank.

Usage::

    with fs.MetricsLogger("runs/gpt") as logger:
        for it in range(steps):
            params, state, metrics = step(params, state, batch)
            if it % 10 == 0:
                logger.log(it, {"loss": metrics["loss"], "lr": metrics["lr"]})
"""

from __future__ import annotations

import json
import numbers
import os
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import torch

from fscale.hw import comm

JSONL_NAME = "metrics.jsonl"

__all__ = ["MetricsLogger", "read_jsonl"]


class MetricsLogger:
    """Append scalar metrics to ``<log_dir>/metrics.jsonl`` and TensorBoard event files.

    Args:
      log_dir: directory for the files (created).
      tensorboard: write TensorBoard event files (needs the ``tensorboard`` package).
      jsonl: write ``metrics.jsonl``.
      all_ranks: every rank logs (into ``log_dir/rank<r>``); default rank 0 only.
      fsync: fsync the JSONL file after each line (a crash of the machine, not only of
        the process, keeps it too); the TensorBoard writer is flushed, never fsynced.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        jsonl: bool = True,
        all_ranks: bool = False,
        fsync: bool = True,
    ):
        self.enabled = all_ranks or comm.rank() == 0
        self.log_dir = pathlib.Path(log_dir)
        if all_ranks:
            self.log_dir = self.log_dir / f"rank{comm.rank()}"
        self.jsonl_path = self.log_dir / JSONL_NAME if jsonl else None
        self._fsync = fsync
        self._file = None
        self._writer = None
        if not self.enabled:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(
                    "MetricsLogger(tensorboard=True) needs the tensorboard package: "
                    "pip install tensorboard (or pass tensorboard=False)."
                ) from e
            self._writer = SummaryWriter(str(self.log_dir))
        if jsonl:
            # Line-buffered append: a resumed run adds to the same file.
            self._file = open(self.jsonl_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float] | None:
        """Write the scalars of ``metrics`` for ``step``; returns them as floats (rank 0).

        Values may be Python numbers, bools or one-element tensors; anything else (a
        string, a tensor of several elements, None) is skipped, so a step's whole
        metrics dict can be passed. Returns None on ranks that do not log.
        """
        if not self.enabled:
            return None
        if self._file is None and self._writer is None:
            raise ValueError("MetricsLogger.log after close(): make a new logger.")
        scalars = _to_floats(metrics)
        record = {"step": int(step), "time": time.time(), **scalars}
        if self._file is not None:
            # allow_nan: a NaN loss is the line you most need; JSON has no NaN, Python reads it.
            self._file.write(json.dumps(record, allow_nan=True) + "\n")
            self._file.flush()
            if self._fsync:
                os.fsync(self._file.fileno())
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(key, value, int(step), walltime=record["time"])
            self._writer.flush()
        return scalars

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MetricsLogger({str(self.log_dir)!r}, enabled={self.enabled})"


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (or a log dir holding one), in order.

    A final line without its newline (the process died while writing it) is dropped.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / JSONL_NAME
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete = lines[:-1]  # after the last "\n": empty, or a torn line
    return [json.loads(line) for line in complete if line]


def _to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"MetricsLogger.log expects a dict of scalars, got {type(metrics).__name__}."
        )
    out: dict[str, float | None] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"MetricsLogger.log: metric names must be str, got {key!r}.")
        if isinstance(value, torch.Tensor):
            if value.numel() == 1 and not value.is_complex():
                tensors[key] = value.detach().reshape(())
                out[key] = None  # keeps the caller's key order
        elif isinstance(value, numbers.Real):  # bool, int, float, numpy scalars
            out[key] = float(value)
    if tensors:
        # [Note: one host sync per log call]: one stack per device, one copy each.
        by_device: dict[torch.device, list[str]] = {}
        for key, t in tensors.items():
            by_device.setdefault(t.device, []).append(key)
        for keys in by_device.values():
            host = torch.stack([tensors[k].double() for k in keys]).cpu().tolist()
            out.update(zip(keys, host, strict=True))
    return out  # type: ignore[return-value]  every None was filled above
