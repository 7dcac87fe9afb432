"""The one optimisation loop: training from captions (`recipe.train`) and fine-tuning from the
app's labels (`finetune.finetune`) both step the model through `fit`.

What differs between them is only what a batch is and which losses it makes: each passes
`fit` an iterable of batches and a `loss_fn(batch) -> {"loss": ..., <other scalars>}`. What
is the same lives here once: AdamW over the two learning-rate groups, warm-up + cosine
schedule, gradient accumulation, clipping, autocast, running averages of the losses and the
progress bar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

BETAS, EPS, CLIP_NORM = (0.9, 0.98), 1e-6, 5.0


def param_groups(model, lr: float, lr_pretrained: float, weight_decay: float) -> list[dict]:
    """Pretrained weights (text model, fusion self-attention / FFN copied from it, a pretrained
    trunk's trainable stages) get the small learning rate; new layers the large one. No weight decay on biases / norms."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        pretrained = name.startswith("text.") or (
            name.startswith("vision.trunk.") and model.config.vision.trunk_weights is not None) or (
            name.startswith("fusion.layers.") and ".cross_" not in name and model.config.fusion.init_from_text_layers
            and model.config.text.weights is not None
        )
        no_decay = p.dim() < 2 or "norm" in name.lower() or name.endswith(".bias") or name in (
            "logit_scale", "vision.cls_token", "vision.pos_embed")
        groups.setdefault((pretrained, no_decay), []).append(p)
    return [{"params": ps, "lr": lr_pretrained if pre else lr, "base_lr": lr_pretrained if pre else lr,
             "weight_decay": 0.0 if nd else weight_decay} for (pre, nd), ps in groups.items()]


def make_optimizer(model, lr: float, lr_pretrained: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, lr, lr_pretrained, weight_decay), betas=BETAS, eps=EPS)


def lr_factor(step: int, total: int, warmup: int, floor: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 down to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Schedule:
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    max_steps: int = 0  # stop once the optimiser has taken this many steps (0: no limit)


@dataclass
class FitState:
    """Carried across `fit` calls (one per epoch in training): the optimiser step and the
    running (exponential, 0.9) averages of every scalar the loss function returned."""

    step: int = 0
    running: dict[str, float] = field(default_factory=dict)
    batches: int = 0  # batches seen in the last call
    stopped: bool = False  # max_steps reached


def fit(model, optimizer, batches: Iterable[Any], loss_fn: Callable[[Any], dict[str, torch.Tensor]],
        schedule: Schedule, state: FitState | None = None, *, device_type: str = "cpu",
        amp_dtype: torch.dtype | None = None, desc: str = "train", progress: bool = True, total: int | None = None,
        on_batch: Callable[[int, dict[str, torch.Tensor], FitState, Any], None] | None = None) -> FitState:
    """Step `model` once per `schedule.grad_accum` batches of `batches`; returns the state.

    loss_fn(batch) runs under autocast and returns a dict with "loss" (what is minimised)
    and any other 0-d tensors to average. on_batch(index, losses, state, bar) is called after
    each batch (for logs and progress events); the bar's postfix shows the running averages.
    The learning rate of each group is base_lr * lr_factor(step) at each optimiser step."""
    state = state or FitState()
    state.batches, state.stopped = 0, False
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(batches, desc=desc, disable=not progress, unit="batch", total=total)
    for b, batch in enumerate(bar):
        with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
            losses = loss_fn(batch)
        (losses["loss"] / schedule.grad_accum).backward()
        if (b + 1) % schedule.grad_accum == 0:
            f = lr_factor(state.step, schedule.total_steps, schedule.warmup_steps, schedule.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * f
            torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
        state.batches = b + 1
        for k, v in losses.items():
            if torch.is_tensor(v) and v.dim() == 0:
                x = float(v.detach())
                state.running[k] = 0.9 * state.running.get(k, x) + 0.1 * x
        if on_batch is not None:
            on_batch(b, losses, state, bar)
        else:
            bar.set_postfix({k: f"{v:.3f}" for k, v in state.running.items()})
        if schedule.max_steps and state.step >= schedule.max_steps:
            state.stopped = True
            break
    bar.close()
    return state
