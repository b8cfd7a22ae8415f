"""Pure optimizers, optax style: ``GradientTransformation(init, update[, update_params])``.

Usage::

    import fscale as fs
    tx = fs.optim.chain(
        fs.optim.clip_by_global_norm(1.0),
        fs.optim.adamw(fs.optim.warmup_cosine(6e-4, 2000, 600_000), weight_decay=0.1,
                       mask=fs.optim.decay_mask_default),
    )
"""

from fscale.optim.adam import AdamState, adam, adamw
from fscale.optim.base import (
    GradientTransformation,
    OptState,
    Params,
    Updates,
    apply_gradients,
    apply_updates,
    chain,
    identity,
    zeros_like_tree,
)
from fscale.optim.lamb import lamb
from fscale.optim.lion import LionState, lion
from fscale.optim.masks import decay_mask_default
from fscale.optim.schedules import (
    Schedule,
    constant,
    cosine_decay,
    linear_warmup,
    value_at,
    warmup_cosine,
)
from fscale.optim.sgd import SGDState, sgd
from fscale.optim.transforms import (
    ClipByGlobalNormState,
    ScheduleState,
    add_decayed_weights,
    clip_by_global_norm,
    global_norm,
    masked,
    scale,
    scale_by_learning_rate,
)

__all__ = [
    "AdamState",
    "ClipByGlobalNormState",
    "GradientTransformation",
    "LionState",
    "OptState",
    "Params",
    "SGDState",
    "Schedule",
    "ScheduleState",
    "Updates",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_gradients",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "constant",
    "cosine_decay",
    "decay_mask_default",
    "global_norm",
    "identity",
    "lamb",
    "linear_warmup",
    "lion",
    "masked",
    "scale",
    "scale_by_learning_rate",
    "sgd",
    "value_at",
    "warmup_cosine",
    "zeros_like_tree",
]
