"""The int kernel's launch tuning on one L2-resident weight against weight copies
streamed from HBM ([Note: tuning on streamed weights] in fscale/kernels/_triton.py):
which launch each picks and every candidate's time per product, int4 (group 128) at
M = 1 on an 8B model's 4096-deep decode shapes, fp16 x.

Usage (one GPU)::

    python3 bench/int_tune_streamed.py --out bench/results/int-tune-streamed-nvidia-h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import provenance  # noqa: E402

from fscale.kernels import intq, intq_triton  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,6144x4096")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for streamed in ("0", "1"):
        os.environ["FSCALE_TUNE_STREAMED"] = streamed
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            intq_triton._TUNED.clear()
            intq_triton._TUNE_LOG.clear()
            p = intq.pack_int(torch.randn(n, k, device="cuda") * 0.02, bits=4, group_size=128)
            x = torch.randn(1, k, device="cuda", dtype=torch.float16)
            y = intq_triton.int_linear_triton(x, p)  # tunes
            ref = intq.int_linear_reference(x.float(), p).float()
            (times,) = intq_triton._TUNE_LOG.values()
            best_ms, best = min(times, key=lambda t: t[0])
            rows.append(
                dict(
                    N=n, K=k, streamed=streamed == "1", best=best, best_us=best_ms * 1e3,
                    rel_err=((y.float() - ref).norm() / ref.norm()).item(),
                    candidates_us=[[round(t * 1e3, 2), c] for t, c in times],
                )
            )  # fmt: skip
            print(f"{n}x{k} {'streamed' if streamed == '1' else 'L2':8s} best "
                  f"{best_ms * 1e3:6.2f} us {best}", flush=True)  # fmt: skip
    if args.out:
        Path(args.out).write_text(
            json.dumps({**provenance(torch.device("cuda")), "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
