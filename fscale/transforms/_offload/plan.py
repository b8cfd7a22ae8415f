"""``fs.explain`` for ``offload``: bytes per tier, PCIe and disk traffic per step."""

from __future__ import annotations

from fscale.kernels import cpu_adam
from fscale.transforms._offload.config import (
    DISK_BYTES_PER_S,
    H2D_BYTES_PER_S,
    OffloadConfig,
    shares_masters,
)


def plan_offload(cfg: OffloadConfig, sharded: bool, mp, plan) -> None:
    n = plan.world if sharded else 1
    tier = cfg.tier
    optimizer = plan.memory.pop("optimizer", 0)
    master = plan.param_count * 4 // n
    grads = plan.param_bytes // n
    plan.memory[f"optimizer ({tier})"] = optimizer
    plan.memory[f"master ({tier})"] = 0 if shares_masters(cfg) else master
    if shares_masters(cfg):
        plan.notes.append(
            f"offload({tier}, params): the fp32 masters are the params' host shards "
            "([Note: shared masters]): the optimizer keeps only its state."
        )
    plan.notes.append(
        f"offload({tier}): the optimizer runs on the host, in sub-groups of <= "
        f"{cfg.subgroup_bytes:,} master bytes, inside the update stage above; AdamW there "
        f"resolves to {cpu_adam.NAME} (one pass, all host cores: fscale's C loop, or "
        "torch._fused_adamw_ where it is not built)."
    )
    if "params" in cfg.what:
        pcie = grads + plan_params(cfg, n, mp, plan)
        what = "grads out, param shards in at each gather; the update stays on the host"
    else:
        pcie = grads + plan.param_bytes // n
        what = "grads out, params back"
    plan.notes.append(
        f"offload({tier}): per step {pcie:,} bytes device<->host ({what}), "
        f"~{pcie / H2D_BYTES_PER_S * 1e3:.2f} ms at {H2D_BYTES_PER_S / 1e9:.0f} GB/s."
    )
    if tier == "cpu":
        kept = optimizer + plan.memory[f"master ({tier})"]
        plan.notes.append(
            f"offload(cpu): an asynchronous fs.save keeps these host buffers as its snapshot "
            f"and allocates a second set once, {kept:,} bytes, that the next update writes "
            "([Note: keeping the owner's buffers]); SaveIO(snapshot='host') copies instead."
        )
        # [Note: grad staging] (update.py): rotating buffers of the largest sub-group's grads (at
        # least one leaf, whose grads are in the param dtype: <= 4 bytes per fp32 byte).
        largest = max(cfg.subgroup_bytes, plan.largest_param_bytes // n)
        plan.memory["grads staging (cpu)"] = min(grads, (2 if cfg.overlap else 1) * largest)
        if cfg.stream and (sharded or plan.world == 1):
            plan.notes.append(
                "offload(cpu): grads stream to the host during backward: each sub-group is "
                "copied out, updated and copied back as soon as its grads are final "
                "([Note: streaming grads in backward])."
            )
        elif not cfg.delayed_update:
            plan.notes.append(
                "offload(cpu): grads go to the host after backward, group by group: streaming "
                "them in backward needs overlap=True and nothing after backward that changes "
                "them (no clip_norm, no fp16 loss scaling, fp32 reduce, no 1-bit compress_comm, "
                "ZeRO-3 or one rank)."
            )
        if cfg.delayed_update:
            plan.notes.append(
                "offload(cpu, delayed_update): the CPU update of step t overlaps step t+1's "
                "compute; params lag one update behind the grads."
            )
            if cfg.compute_dtype is not None and "params" not in cfg.what:
                staging = plan.param_count * cfg.compute_dtype.itemsize // n
                plan.memory["DPU staging (device)"] = staging
        return
    # Buffers are sized to the largest sub-group: at most buffer_mb, or all of it.
    pool = (3 if cfg.overlap else 1) * min(cfg.buffer_bytes, optimizer + master + grads)
    plan.memory["swap buffers (cpu)"] = pool
    disk = 2 * (optimizer + master)  # read and written once per step
    plan.notes.append(
        f"offload(nvme): {optimizer + master:,} bytes of swap files per rank under {cfg.path}; "
        f"per step {disk:,} bytes of disk I/O, ~{disk / DISK_BYTES_PER_S:.2f} s at "
        f"{DISK_BYTES_PER_S / 1e9:.1f} GB/s."
    )


def plan_params(cfg: OffloadConfig, n: int, mp, plan) -> int:
    """Stage-3 param shards moved to host memory (or a mapped file); returns H2D bytes/step."""
    tier = cfg.tier
    shards = plan.memory.pop("params", plan.param_bytes // n)
    plan.memory[f"params ({tier})"] = shards
    gather_size = plan.param_bytes / max(plan.param_count, 1)
    if mp is not None and mp.param_dtype.itemsize != gather_size:
        gather_size = mp.param_dtype.itemsize
        plan.memory[f"params compute copy ({tier})"] = plan.param_count * gather_size // n
    h2d = int(2 * plan.param_count * gather_size) // n  # forward gather + backward re-gather
    where = "host memory" if tier == "cpu" else f"a memory-mapped file under {cfg.path}"
    plan.notes.append(
        f"offload({tier}, params): ZeRO-3's param shards live in {where}, "
        f"{shards:,} bytes per rank moved off the device; each gather first copies the "
        f"unit's shard host->device (prefetched with its all-gather): {h2d:,} bytes H2D per "
        f"step, ~{h2d / H2D_BYTES_PER_S * 1e3:.2f} ms at {H2D_BYTES_PER_S / 1e9:.0f} GB/s. "
        "Device params: only the units in flight and their staging copies."
    )
    return h2d
