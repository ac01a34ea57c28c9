"""The training recipe: a trainer (setup, train_epoch, validate, save_checkpoint, fit), pluggable
objectives, schedules (teacher forcing, learning rates) and the runtime (DDP, autocast, seeds)."""

from capcli.training.trainer import Trainer, train

__all__ = ["Trainer", "train"]
