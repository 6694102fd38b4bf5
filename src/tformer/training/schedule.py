"""Learning-rate schedules. `step` counts optimizer updates from 1 (step^-0.5 has no value at 0).

inverse_sqrt (paper section 5.3, eq. 3):
                              lr = scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)
peak:                         lr = peak * step / warmup           for step <= warmup
                              lr = peak * sqrt(warmup / step)     afterwards

In eq. 3 the second argument of min is the smaller one while step < warmup: the rate rises linearly,
by d_model^-0.5 * warmup^-1.5 per step; from step = warmup on the first is, and the rate decays with
the inverse square root of the step. The two meet at step = warmup, the maximum, d_model^-0.5 *
warmup^-0.5: the paper's base model (d_model 512, warmup_steps 4000) peaks at about 7.0e-4, the big
one (d_model 1024) at about 4.9e-4. `scale` (train.lr_scale) multiplies the whole curve.

The peak form is the same curve with its top stated directly instead of derived from d_model: eq. 3
is the peak form with peak = scale * d_model^-0.5 * warmup^-0.5. Without the ramp (train.warmup_ramp
= false, the "no warm-up" ablation) either rate holds its maximum from step 1 until step = warmup.
"""

from __future__ import annotations

import dataclasses
import math

from tformer.config import TrainConfig


def check_step(step: int, warmup: int) -> None:
    """Updates count from 1 (a plot's `range(n)` starts at 0, where the paper's formula divides by zero)."""
    if step < 1 or warmup < 1:
        raise ValueError(f"step and warmup count updates from 1; got step={step}, warmup={warmup}")


def inverse_sqrt_lr(step: int, *, d_model: int, warmup: int, scale: float = 1.0) -> float:
    check_step(step, warmup)
    return scale * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def peak_lr(step: int, *, peak: float, warmup: int) -> float:
    check_step(step, warmup)
    if step <= warmup:
        return peak * step / warmup
    return peak * math.sqrt(warmup / step)


def learning_rate(step: int, train: TrainConfig, *, d_model: int) -> float:
    """The configured schedule's learning rate for update number `step` (from 1)."""
    if not train.warmup_ramp:
        step = max(step, train.warmup_steps)  # the peak until the warm-up would have ended
    if train.schedule == "peak":
        return peak_lr(step, peak=train.peak_lr, warmup=train.warmup_steps)
    return inverse_sqrt_lr(step, d_model=d_model, warmup=train.warmup_steps, scale=train.lr_scale)


def warmup_advice(train: TrainConfig) -> str | None:
    """A warning when the run ends before its warm-up does, or as it ends: the learning rate then rises for
    the whole run and never reaches the maximum the schedule was chosen for, or reaches it only for the last
    update and never decays (a short run's max_steps with the paper's 4000 warm-up steps is the usual way
    to get there). A one-step run is not warned about with warmup_steps 1: its one update is at the peak."""
    steps, warmup = train.max_steps, train.warmup_steps
    if not train.warmup_ramp or steps == 0 or warmup < steps or warmup == steps == 1:
        return None
    if warmup == steps:
        relation, outcome = "equals", "reaches its maximum only at the last step"
    else:
        relation, outcome = "is above", "never reaches its maximum"
    return (
        f"warning: train.warmup_steps={warmup} {relation} train.max_steps={steps}: the learning rate rises for "
        f"the whole run and {outcome}; set train.warmup_steps to a fraction of max_steps (e.g. --set "
        f"train.warmup_steps={max(1, steps // 10)})"
    )


def stopped_in_warmup_advice(step: int, train: TrainConfig) -> str | None:
    """A warning when a run stopped inside its warm-up for another reason than max_steps (which
    `warmup_advice` warns about before training): a --max-time or --max-epochs budget, or early stopping,
    ended it while the learning rate was still rising. A 150-second run with the default 4000 warm-up
    steps stopped at step 216, at a twentieth of the rate, and translated every sentence to nothing."""
    warmup = train.warmup_steps
    if not train.warmup_ramp or step < 1 or step >= warmup or 0 < train.max_steps <= warmup:
        return None
    return (
        f"warning: the run stopped at step {step}, inside its warm-up (train.warmup_steps={warmup}): the learning "
        f"rate was still rising and never reached its maximum; give it the time to finish the warm-up, or set "
        f"train.warmup_steps to a fraction of the steps it trains (e.g. --set train.warmup_steps={max(1, step // 10)} "
        "for a run this long)"
    )


def unused_schedule_setting(train: TrainConfig) -> str | None:
    """A warning when the rate's size is set for the schedule the run does not use: `train.peak_lr` plays no
    part in "inverse_sqrt" (whose peak follows from d_model, warmup_steps and lr_scale), `train.lr_scale`
    none in "peak". Both have defaults, so without it `--set train.peak_lr=1e-3` under the default schedule,
    or `--set train.lr_scale=2` under a recipe's "peak" one, would train at the rate it meant to change."""
    defaults = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    if train.schedule == "inverse_sqrt" and train.peak_lr != defaults["peak_lr"]:
        return (
            f"warning: train.peak_lr={train.peak_lr:g} plays no part under train.schedule=inverse_sqrt, whose "
            "maximum is train.lr_scale * (d_model * train.warmup_steps)^-0.5; set train.schedule=peak to warm up "
            "to train.peak_lr instead"
        )
    if train.schedule == "peak" and train.lr_scale != defaults["lr_scale"]:
        return (
            f"warning: train.lr_scale={train.lr_scale:g} plays no part under train.schedule=peak, whose maximum is "
            f"train.peak_lr={train.peak_lr:g}; set train.peak_lr={train.peak_lr * train.lr_scale:g} to scale it"
        )
    return None
