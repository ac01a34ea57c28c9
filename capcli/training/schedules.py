"""Schedules applied per step: the teacher-forcing ratio and the learning rates.

Teacher forcing (``train.teacher_forcing``, ``train.tf_schedule``): the probability that a decoder
step reads the ground-truth word rather than its own argmax.

- ``constant``: ``teacher_forcing`` itself (true = 1, false = 0, or a ratio in [0, 1]);
- ``linear``: from ``tf_start`` at the first step to ``tf_end`` at the last (``teacher_forcing:
  scheduled`` is this schedule);
- ``inverse_sigmoid``: Bengio et al. 2015 (scheduled sampling), ``k / (k + exp(step / k))``,
  rescaled to start at ``tf_start`` and approach ``tf_end``; ``tf_k = 0`` picks the k whose
  ratio is midway at the middle of the run.

Learning rates (``train.lr_schedule``), each parameter group keeping its own initial rate
(decoder ``train.lr``, encoder ``train.encoder_lr``):

- ``none``: constant;
- ``plateau``: x ``lr_factor`` (0.8) each time ``lr_patience`` (8) validations in a row brought no
  better ``best_metric`` (the rule of the paper's code);
- ``cosine``: from the initial rate down to ``min_lr_ratio`` of it over the run;
- ``linear``: the same, along a straight line;
- every schedule starts with a linear warm-up over ``warmup_steps`` steps (0 = none).

"Over the run" is over its steps, or, with a time budget (``train.max_minutes``), over the time
the run has if that ends first: the trainer tells the schedule the seconds it spans and how many
have passed (:meth:`LRSchedule.tick`), so that the rate reaches its floor as the budget ends, not
at an epoch the budget never reaches. A run in stages (``train.scst_after``) gives each stage its
own schedule over its own steps and seconds. Time-based progress depends on the machine's speed,
so a run resumed under a budget continues its schedule from the seconds it had used, not bit for
bit.
"""

from __future__ import annotations

import math

import torch

from capcli.config import TrainConfig


def tf_schedule_name(t: TrainConfig) -> str:
    return "linear" if t.teacher_forcing == "scheduled" and t.tf_schedule == "constant" else t.tf_schedule


def _auto_k(total_steps: int) -> float:
    """The k whose normalised inverse sigmoid is 0.5 at ``total_steps / 2``: ``k ln(k + 2) = s``."""
    target = max(total_steps, 2) / 2
    lo, hi = 1.0, max(2.0, target)
    for _ in range(100):  # k ln(k + 2) grows monotonically in k: bisection
        mid = (lo + hi) / 2
        if mid * math.log(mid + 2) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def tf_ratio(t: TrainConfig, step: int, total_steps: int) -> float:
    """The teacher-forcing ratio at ``step`` (0-based) of a run of ``total_steps`` steps."""
    schedule = tf_schedule_name(t)
    if schedule == "constant":
        tf = t.teacher_forcing
        return 1.0 if tf is True else 0.0 if tf is False else float(tf)
    if schedule == "linear":
        frac = min(1.0, step / max(total_steps - 1, 1))
        return t.tf_start + frac * (t.tf_end - t.tf_start)
    k = t.tf_k or _auto_k(total_steps)
    decay = (k + 1) / (k + math.exp(min(step / k, 700.0)))  # k/(k+e^(s/k)) over its value at s = 0
    return t.tf_end + (t.tf_start - t.tf_end) * decay


class LRSchedule:
    """Sets every parameter group's rate from its ``initial_lr`` at each step; see the module doc.

    Its state (the plateau scale and count) goes into checkpoints, so a resumed run continues the
    same schedule.
    """

    def __init__(self, t: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int, *,
                 kind: str | None = None, warmup: int | None = None, start_step: int = 0, seconds: float = 0.0):
        self.kind = t.lr_schedule if kind is None else kind
        self.warmup = t.warmup_steps if warmup is None else warmup
        self.min_ratio = t.min_lr_ratio
        self.factor, self.patience = t.lr_factor, t.lr_patience
        self.start = start_step  # the run's step at which this schedule begins (a stage's first)
        self.total_steps = max(total_steps, 1)  # the steps it spans
        self.seconds = seconds  # the wall-clock seconds it spans (0 = by steps alone)
        self.used = 0.0  # seconds passed since it began (:meth:`tick`)
        self.optimizer = optimizer
        self.scale = 1.0  # plateau: product of the cuts so far
        self.bad = 0  # plateau: validations since the last improvement
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def add_group(self, group: dict) -> None:
        """A group joining mid-run (the encoder, after ``finetune_after``)."""
        group.setdefault("initial_lr", group["lr"])

    def tick(self, seconds: float) -> None:
        """``seconds`` more of this schedule's time have passed."""
        self.used += seconds

    def progress(self, step: int) -> float:
        """How far the decay is, in [0, 1]: by steps after the warm-up, or by time when that is further."""
        done = min(1.0, max(0, step - self.start - self.warmup) / max(self.total_steps - self.warmup, 1))
        if self.seconds > 0:
            done = max(done, min(1.0, self.used / self.seconds))
        return done

    def factor_at(self, step: int) -> float:
        f = self.scale
        local = step - self.start
        if self.warmup and local < self.warmup:
            f *= (local + 1) / self.warmup
        if self.kind in ("cosine", "linear"):
            p = self.progress(step)
            shape = 0.5 * (1 + math.cos(math.pi * p)) if self.kind == "cosine" else 1.0 - p
            f *= self.min_ratio + (1 - self.min_ratio) * shape
        return f

    def step(self, step: int) -> None:
        """Set the rates for training step ``step`` (0-based), before it runs."""
        f = self.factor_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * f

    def validated(self, improved: bool) -> bool:
        """After a validation: count it for the plateau rule; True when the rates were just cut."""
        if self.kind != "plateau":
            return False
        self.bad = 0 if improved else self.bad + 1
        if self.bad and self.bad % self.patience == 0:
            self.scale *= self.factor
            return True
        return False

    def state_dict(self) -> dict:
        return {"scale": self.scale, "bad": self.bad, "start": self.start, "total_steps": self.total_steps,
                "warmup": self.warmup, "seconds": self.seconds, "used": self.used}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.bad = float(state["scale"]), int(state["bad"])
        self.start = int(state.get("start", self.start))
        self.total_steps = int(state.get("total_steps", self.total_steps))
        self.warmup = int(state.get("warmup", self.warmup))
        self.seconds, self.used = float(state.get("seconds", self.seconds)), float(state.get("used", 0.0))
