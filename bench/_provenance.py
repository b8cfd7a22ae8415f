"""Where a benchmark result came from: device, date, versions, command (every JSON has it).

Usage (from a script in bench/, whose folder is on sys.path)::

    from _provenance import provenance
    result = {"bench": "adamw_kernel", **provenance(device), ...}
"""

from __future__ import annotations

import datetime
import platform
import sys
from pathlib import Path

import torch


def provenance(device: torch.device, command: str | None = None) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "command": command or " ".join([Path(sys.executable).name, *sys.argv]),
    }
