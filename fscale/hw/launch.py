"""Joining a distributed job: ``init_distributed`` with a timeout a user sets.

Under ``torchrun`` (``RANK`` and ``WORLD_SIZE`` set) it joins the job's process
group -- NCCL on CUDA (bound to ``LOCAL_RANK``'s GPU), gloo on CPU -- with a
collective timeout: ``timeout_s``, else ``$FSCALE_PG_TIMEOUT_S``, else
``DEFAULT_TIMEOUT_S``. Without a launcher it is a world of one and joins nothing.

Usage::

    from torch.distributed.elastic.multiprocessing.errors import record

    @record                                   # torchrun's summary shows this rank's traceback
    def main():
        rank, world, device = fs.init_distributed("cuda", timeout_s=300)

[Note: how a failed rank ends the job]
A rank that raises, or is killed (SIGKILL, the OOM killer), leaves the others inside
a collective that will never complete. Under torchrun the job still ends at once,
on every rank, with an error naming the failed one: the elastic agent watches its
workers, and when one exits non-zero it stops the rest (SIGTERM, then SIGKILL) and
exits non-zero itself, printing the failed rank, its exit code or signal and, when
the entry point is wrapped in ``@record``, its traceback. Without the agent (ranks
started by other means) a killed peer closes its sockets, which gloo reports on the
next collective; a rank that stops calling collectives without exiting (a hang, a
rank stuck in a loop) is caught by the timeout only -- hence a default far below
torch's 30 minutes, and one a user can set (a long checkpoint load on rank 0 while
others wait needs more). NCCL's watchdog tears the process down when a collective
exceeds the timeout (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default).
"""

from __future__ import annotations

import datetime
import math
import os
from typing import NamedTuple

import torch
import torch.distributed as dist

#: Collective timeout when neither ``timeout_s`` nor ``$FSCALE_PG_TIMEOUT_S`` is given.
DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "FSCALE_PG_TIMEOUT_S"


class Joined(NamedTuple):
    rank: int
    world: int
    device: torch.device


def timeout_seconds(timeout_s: float | None = None) -> float:
    """The collective timeout in seconds: the argument, ``$FSCALE_PG_TIMEOUT_S``, the default."""
    source = "timeout_s"
    if timeout_s is None and os.environ.get(TIMEOUT_ENV):
        source, timeout_s = f"${TIMEOUT_ENV}", os.environ[TIMEOUT_ENV]
    if timeout_s is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(timeout_s)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0 or isinstance(timeout_s, bool):
        raise ValueError(
            f"{source} must be a positive number of seconds, got {timeout_s!r}; e.g. "
            f"{TIMEOUT_ENV}=300 or init_distributed(timeout_s=300)."
        )
    return value


def init_distributed(device: str = "cpu", *, timeout_s: float | None = None) -> Joined:
    """Join the torchrun job (or stay a world of one); returns ``(rank, world, device)``.

    Args:
      device: ``"cuda"`` (NCCL, this process's GPU is ``LOCAL_RANK``) or ``"cpu"`` (gloo).
      timeout_s: how long a collective may wait for the other ranks before it raises;
        default ``$FSCALE_PG_TIMEOUT_S`` or ``DEFAULT_TIMEOUT_S`` (10 minutes).
    """
    if device not in ("cuda", "cpu"):
        raise ValueError(f"init_distributed: device must be 'cuda' or 'cpu', got {device!r}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "init_distributed('cuda'): torch.cuda.is_available() is False; run on a GPU "
            "machine or pass device='cpu'."
        )
    timeout = datetime.timedelta(seconds=timeout_seconds(timeout_s))
    if not ("WORLD_SIZE" in os.environ and "RANK" in os.environ):
        index = torch.cuda.current_device() if device == "cuda" else None
        return Joined(
            0, 1, torch.device(device, index) if index is not None else torch.device(device)
        )
    if dist.is_initialized():
        raise RuntimeError(
            "init_distributed: the default process group already exists; call "
            "init_distributed once, before anything else joins the job."
        )
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        here = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=here, timeout=timeout)
    else:
        here = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return Joined(dist.get_rank(), dist.get_world_size(), here)
