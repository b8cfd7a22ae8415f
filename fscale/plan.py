"""The plan records ``fs.explain`` prints and transforms adjust.

``Plan`` is an analytic estimate of one step for given params: the stack, which
function implements each stage, the collectives one step issues (bytes per rank),
the kernels, and memory per rank. Each transform adjusts it through its
``Transform.plan`` hook; it lives below the step and the transforms so that neither
``fscale/explain.py`` nor a transform reaches into the other.

Usage::

    plan.collectives.append(Collective("all_gather", nbytes, "apply", tag="zero.params"))
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Collective:
    op: str
    bytes: int  # payload handed to the collective by one rank, per step
    stage: str
    calls: int = 1
    tag: str | None = None  # the tagged collective ("zero.params", ...), when known


@dataclass
class Plan:
    world: int
    transforms: list[str]
    stages: dict[str, str]
    collectives: list[Collective] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)  # bytes per rank, by tier/kind
    kernels: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    param_count: int = 0
    param_bytes: int = 0  # full (unsharded) params
    largest_param_bytes: int = 0  # the largest single leaf, full
    mesh: str = ""  # the step's mesh, e.g. "Mesh(dp=2, ep=2, tp=2)"

    #: How many ways model-parallel transforms split each leaf so far (by param name).
    leaf_parts: dict = field(default_factory=dict)

    def split_leaves(self, leaves: dict) -> None:
        """``{param name: (full bytes, parts)}``: a model-parallel transform keeps
        ``1/parts`` of each on every rank (on top of earlier splits of the same leaf).
        Params, grads, the optimizer state (in proportion) and the grad reduction
        shrink; later transforms (shard_zero) then split what is left."""
        saved = 0
        for name, (full, parts) in leaves.items():
            before = self.leaf_parts.get(name, 1)
            saved += full // before - full // (before * parts)
            self.leaf_parts[name] = before * parts
        frac = saved / self.param_bytes if self.param_bytes else 0.0
        self.param_bytes -= saved
        for kind in ("params", "grads"):
            if kind in self.memory:
                self.memory[kind] -= saved
        if "optimizer" in self.memory:
            self.memory["optimizer"] -= int(self.memory["optimizer"] * frac)
        for c in self.collectives:
            if c.tag == "dp.grads":
                c.bytes -= int(c.bytes * frac)
