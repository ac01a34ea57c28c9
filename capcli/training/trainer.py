"""The training recipe: ``Trainer(cfg, device).fit()``.

setup (data, model, objective, optimizer, schedules, restore) -> per epoch ``train_epoch`` (steps,
with ``validate`` every ``train.val_every``) -> ``save_checkpoint`` -> cleanup. One process or
many (torchrun/DDP); only rank 0 validates and writes files (:mod:`.runlog`). A time budget or a
signal ends a run early, validated and saved (:mod:`.stopping`).

Resume is exact: a checkpoint holds the weights, optimizer, schedules, RNG states and where in the
epoch it was taken; the data order of an epoch depends only on the seed and the epoch
(:class:`capcli.data.sampler.EpochSampler`), so a resumed run (even from the middle of an epoch)
repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from capcli.config import Config, best_metric, config_from_dict, parse_scst_after, parse_val_every
from capcli.data.dataset import CaptionDataset, collate, trim_padding
from capcli.data.features import CachedFeatureDataset, build_cache, cache_dir, cache_file, collate_cached
from capcli.data.sampler import EpochSampler
from capcli.decode import DecodeOptions
from capcli.errors import UserError
from capcli.evaluate import evaluate_model
from capcli.models.captioner import CaptionModel
from capcli.runtime import (all_reduce_sum, autocast_dtype, barrier, broadcast_from_main, cleanup_distributed,
                            is_out_of_memory, resolve_num_workers, rng_state, seed_everything, set_rng_state,
                            setup_distributed)
from capcli.store import checkpoint
from capcli.training.memory import largest_fitting_batch
from capcli.training.objectives import TrainStep, build_objective, make_adam
from capcli.training.runlog import RunLog, new_run_dir, summary_writer_class
from capcli.training.schedules import LRSchedule, tf_ratio
from capcli.training.stopping import Budget, StopSignals
from capcli.version import __version__

ProgressFn = Callable[..., None]
VAL_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l")


class Trainer:
    """Train ``cfg`` on ``device``; ``resume`` (a run dir or checkpoint) continues a run instead.

    ``progress(event, **info)`` receives: start, cache, cache_step, stage, epoch_start, step,
    validate, validate_step, epoch_end (a metrics record), stop.
    """

    def __init__(self, cfg: Config | None, device: torch.device, *, resume: str | Path | None = None,
                 progress: ProgressFn | None = None):
        start = time.perf_counter()  # the budget counts from here
        self.emit = progress or (lambda *a, **k: None)
        self.d, self.device = setup_distributed(device)
        self.ckpt = None
        if resume is not None:
            self.run_dir, last = self._resume_paths(Path(resume))
            self.ckpt = checkpoint.load(last, map_location="cpu")
            cfg = config_from_dict(self.ckpt["config"])
        else:
            self.run_dir = new_run_dir(cfg)
        self.cfg = cfg
        self.budget = Budget(cfg.train.max_minutes, start)
        self.signals = StopSignals()
        self.metric = best_metric(cfg)
        self.log: RunLog | None = None
        self.history: list[dict] = []

    @staticmethod
    def _resume_paths(path: Path) -> tuple[Path, Path]:
        if path.is_file():
            return path.parent.parent, path
        last = path / "checkpoints" / "last.pt"
        if not last.is_file():
            raise UserError(f"cannot resume {path}: no checkpoints/last.pt there")
        return path, last

    # ------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg, d = self.cfg, self.d
        if cfg.log.tensorboard:
            summary_writer_class()  # a missing package fails on every rank, before any work
        seed_everything(cfg.seed)  # the same initial weights on every rank (and feature-cache name)
        self._setup_data()
        self._setup_model()
        seed_everything(cfg.seed + d.rank)  # different dropout on each rank
        self._restore_counters()
        # the stage the checkpoint was in (the switch to fine-tuning happens as an epoch starts)
        self.frozen_stage = self.ckpt.get("frozen_stage", self._frozen_at(self.epoch)) if self.ckpt else \
            self._frozen_at(self.epoch)
        if self.frozen_stage and cfg.model.finetune:  # finetune_after: the first epochs are frozen
            self.model.encoder.set_trainable(False)
        self._setup_optimizer()
        self._restore_states()
        self.use_cache = self.frozen_stage and cfg.train.cache_features
        if self.use_cache and not self._build_caches():
            return
        self._setup_loader()
        self._wrap()
        if d.main:
            self.log = RunLog(self.run_dir, cfg, resumed_step=self.step if self.ckpt is not None else None)
        barrier(d)

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.train_set = CaptionDataset(cfg.data.dir, cfg.data.train_split)
        self.val_set = CaptionDataset(cfg.data.dir, cfg.data.val_split, max_images=cfg.data.val_max_images)
        self.vocab = self.train_set.vocab
        k = self.train_set.captions_per_image
        self.images_per_batch = max(1, cfg.train.batch_size // k)
        self.max_length = cfg.train.max_length or self.train_set.max_length
        self.num_workers = resolve_num_workers(cfg.data.num_workers, self.d)
        per_rank = math.ceil(len(self.train_set) / self.d.world)  # EpochSampler pads to an even split
        self.steps_per_epoch = math.ceil(per_rank / self.images_per_batch)
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.data_info = {"image_size": self.train_set.image_size,
                          "resize": self.train_set.manifest.get("resize", "squash"),
                          "max_length": self.train_set.max_length, "dir": str(cfg.data.dir)}

    def _setup_model(self) -> None:
        cfg = self.cfg
        init = self._init_weights() if cfg.train.init_from and self.ckpt is None else None
        from_file = self.ckpt is not None or init is not None  # weights come from a checkpoint
        self.model = CaptionModel(cfg.model, len(self.vocab), pretrained=False if from_file else None)
        if init is not None:
            self.model.load_state_dict(init["model"])
        self.model.to(self.device)
        if self.ckpt is None:  # a new run: its grid must fit the feature map (a resumed one did)
            self.model.encoder.check_grid(self.train_set.image_size)
        # train.scst_after: cross-entropy first, then self-critical; a checkpoint knows which stage it is in
        self.scst_after = parse_scst_after(cfg.train.scst_after)
        self.stage = self.ckpt.get("stage", cfg.train.objective) if self.ckpt else cfg.train.objective
        self.plateaued = bool(self.ckpt.get("plateaued", False)) if self.ckpt else False  # scst_after=auto
        self.objective = self._build_objective()
        self.amp_dtype = autocast_dtype(cfg.train.amp, self.device)

    def _build_objective(self):
        t = self.cfg.train
        return build_objective(t, self.stage, self.model, self.train_set,
                               max_length=min(self.max_length, t.scst_max_length or self.max_length)).to(self.device)

    # what a model's weights depend on: taken from an init_from checkpoint, so that they fit
    ARCH_KEYS = ("encoder", "grid", "feature_norm", "image_size", "emb_dim", "att_dim", "dec_dim")

    def _init_weights(self) -> dict:
        """``train.init_from``: a trained captioner's checkpoint. Its architecture keys replace this
        run's (how to train it, e.g. ``model.finetune``, stays this run's); its vocabulary must be
        the dataset's."""
        ck = checkpoint.load(self.cfg.train.init_from, map_location="cpu")
        if list(ck["vocab"]) != list(self.vocab.itos):
            raise UserError(f"train.init_from={self.cfg.train.init_from}: its vocabulary ({len(ck['vocab'])} words) "
                            f"is not the one of {self.cfg.data.dir} ({len(self.vocab)} words); start from a run "
                            "trained on this dataset")
        for key in self.ARCH_KEYS:
            if key in ck["config"]["model"]:
                setattr(self.cfg.model, key, ck["config"]["model"][key])
        return ck

    def _setup_optimizer(self) -> None:
        """Adam over what trains, and the learning-rate schedule of the current stage: the whole run,
        or with ``train.scst_after`` the cross-entropy steps, then a fresh Adam at ``scst_lr``,
        warmed up over ``scst_warmup_steps`` and held there, for the self-critical ones."""
        t = self.cfg.train
        second = self.stage == "scst" and self.scst_after[0] != "never"
        lr = t.scst_lr if second else t.lr
        self.optimizer = make_adam(self.model.trainable_groups(lr, t.encoder_lr * lr / t.lr), t.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        if second:
            # the self-critical stage holds scst_lr after its warm-up: a policy gradient this short
            # gains late (docs/performance.md, "Self-critical training on a CPU budget"), and a
            # decay over it took away what it would have gained
            self.schedule = LRSchedule(t, self.optimizer, self.total_steps - self.step, kind="none",
                                       warmup=t.scst_warmup_steps, start_step=self.step)
        else:
            kind, after = self.scst_after
            steps = int(after) * self.steps_per_epoch if kind == "epochs" else self.total_steps
            self.schedule = LRSchedule(t, self.optimizer, steps)

    def _plan_seconds(self) -> None:
        """With a time budget, the seconds the current stage's schedule spans from now: to the switch
        to self-critical training (at its share of the budget), else to the end of the budget less
        the final validation and checkpoint."""
        if not self.budget.limited:
            return
        kind, after = self.scst_after
        if self.stage == "xe" and kind in ("share", "auto"):
            end = self.budget.seconds * (after if kind == "share" else self.cfg.train.scst_auto_share)
        elif self.stage == "xe" and kind == "epochs":
            end = self.budget.seconds  # the epochs decide; the budget only when it ends first
        else:
            end = self.budget.seconds - self.budget.val_seconds - 2 * self.budget.save_seconds
        self.schedule.seconds = max(end - self.budget.elapsed(), 1.0)
        self.schedule.used = 0.0

    def _restore_counters(self) -> None:
        """Fresh counters, or where the checkpoint stopped."""
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.best, self.best_epoch, self.bad_validations = -math.inf, 0, 0
        self.epoch_sums = torch.zeros(len(self.objective.sum_names), dtype=torch.float64, device=self.device)
        self.epoch_samples, self.epoch_seconds = 0, 0.0
        self.bad_steps = 0  # NaN/inf losses in a row
        self.validated_step = -1  # the step of the last validation
        self.skipped_steps = int(self.ckpt.get("skipped_steps", 0)) if self.ckpt else 0
        ck = self.ckpt
        if ck is not None:
            self.epoch, self.step = int(ck["epoch"]), int(ck["step"])
            self.batch_in_epoch = int(ck.get("batch_in_epoch", 0))
            best = ck.get("best_score")
            self.best = -math.inf if best is None or best < -1e300 else float(best)
            self.best_epoch = ck.get("best_epoch", 0)
            self.bad_validations = int(ck.get("bad_validations", 0))
            if self.batch_in_epoch:  # the partial epoch's running numbers
                self.epoch_sums = torch.tensor(ck["epoch_sums"], dtype=torch.float64, device=self.device)
                self.epoch_samples, self.epoch_seconds = int(ck["epoch_samples"]), float(ck["epoch_seconds"])
        self.start_epoch = self.epoch

    def _restore_states(self) -> None:
        """Weights, optimizer, schedules and RNG states from the checkpoint (exact resume)."""
        ck = self.ckpt
        if ck is None:
            return
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        if ck.get("lr_schedule"):
            self.schedule.load_state_dict(ck["lr_schedule"])
        set_rng_state(ck["rng"])

    def _frozen_at(self, epoch: int) -> bool:
        return not self.cfg.model.finetune or epoch < self.cfg.train.finetune_after

    def _build_caches(self) -> bool:
        """Encode the train and val images once (rank 0). False when the budget ran out first."""
        folder = cache_dir(self.cfg.data.dir, self.model.encoder)
        self.train_cache = cache_file(folder, self.train_set, self.amp_dtype)
        self.val_cache = cache_file(folder, self.val_set, self.amp_dtype)
        complete = True
        if self.d.main:
            deadline = self.budget.deadline()
            for split, ds, path in (("train", self.train_set, self.train_cache), ("val", self.val_set, self.val_cache)):
                if path.is_file():
                    continue
                self.emit("cache", split=ds.split, images=len(ds))
                complete = build_cache(self.model.encoder, ds, self.device, path,
                                       batch_size=max(self.images_per_batch, 32), amp_dtype=self.amp_dtype,
                                       deadline=deadline,
                                       progress=lambda done, n: self.emit("cache_step", done=done, total=n))
                if not complete:
                    break
        complete = bool(broadcast_from_main([float(complete)], self.d, self.device)[0])
        if not complete:
            self.stop_reason = "max_minutes"
            self.emit("stop", reason="max_minutes", message=(
                "the time budget ran out while caching encoder features; rerun to continue the cache "
                f"where it stopped ({self.train_cache.parent})"))
        return complete

    def _setup_loader(self) -> None:
        data = CachedFeatureDataset(self.train_set, self.train_cache) if self.use_cache else self.train_set
        self.sampler = EpochSampler(len(self.train_set), self.cfg.seed, self.d.rank, self.d.world)
        self.loader = DataLoader(
            data, batch_size=self.images_per_batch, sampler=self.sampler, num_workers=self.num_workers,
            collate_fn=collate_cached if self.use_cache else collate, pin_memory=self.device.type == "cuda",
            # its own generator: making iterators never draws from the global RNG (exact resume)
            generator=torch.Generator(), persistent_workers=self.num_workers > 0)

    def _wrap(self) -> None:
        """The objective, in DDP when several processes train; and the step that drives it."""
        task = self.objective
        if self.d.world > 1:
            task = torch.nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.task = task
        self.train_step = TrainStep(task, self.optimizer, self.scaler, self.device, self.amp_dtype,
                                    self.cfg.train.grad_clip, world=self.d.world)

    def _unfreeze(self) -> None:
        """End of ``finetune_after``: train the encoder's configured stages at ``encoder_lr``, from images."""
        m, t = self.cfg.model, self.cfg.train
        self.model.encoder.set_trainable(True, m.finetune_stages)
        enc = [p for p in self.model.encoder.backbone.parameters() if p.requires_grad]
        group = {"params": enc, "lr": t.encoder_lr, "name": "encoder"}
        self.optimizer.add_param_group(group)
        self.schedule.add_group(self.optimizer.param_groups[-1])
        self.frozen_stage = self.use_cache = False
        self._setup_loader()
        self._wrap()
        self.emit("stage", epoch=self.epoch, message=f"epoch {self.epoch + 1}: fine-tuning the encoder "
                  f"({'all stages' if not m.finetune_stages else f'last {m.finetune_stages} stage(s)'}) "
                  f"at lr {t.encoder_lr:g}")

    # ------------------------------------------------------------------------------------ loop

    def fit(self) -> dict:
        self.stop_reason = "epochs"
        self.setup()
        if self.stop_reason != "epochs":  # the budget ended in the cache pass
            return self._finish()
        cfg = self.cfg
        self._set_val_every()
        self.budget.val_seconds = self._probe_validation() if self.budget.limited else 0.0
        if self.ckpt is None:  # a resumed run continues the seconds its schedule had planned
            self._plan_seconds()
        self.emit("start", run_dir=str(self.run_dir), epochs=cfg.train.epochs, start_epoch=self.epoch,
                  steps_per_epoch=self.steps_per_epoch, device=str(self.device), world=self.d.world,
                  train_images=len(self.train_set), val_images=len(self.val_set),
                  workers=self.num_workers, cached=self.use_cache)
        self.wall_last = self.budget.clock()  # the learning-rate schedule's clock (:meth:`LRSchedule.tick`)
        with self.signals:
            while self.epoch < cfg.train.epochs and self.stop_reason == "epochs":
                if self.frozen_stage and cfg.model.finetune and not self._frozen_at(self.epoch):
                    self._unfreeze()
                if self._scst_due():
                    self._switch_to_scst()
                self.train_epoch()
        return self._finish()

    def _set_val_every(self) -> None:
        """How often the current stage validates: ``train.val_every``, or in the self-critical stage
        (or with ``objective=scst``) ``train.scst_val_every`` when set (a short stage whose gains come within
        a few hundred steps: best.pt should not wait for the end of an epoch to see them)."""
        t = self.cfg.train
        every = t.scst_val_every if self.stage == "scst" and t.scst_val_every is not None else t.val_every
        self.val_n, self.val_unit = parse_val_every(every)

    def _scst_due(self) -> bool:
        """Whether the cross-entropy stage ends now (``train.scst_after``); rank 0 decides for all."""
        if self.stage != "xe":
            return False
        kind, after = self.scst_after
        if kind == "never":
            return False
        if kind == "epochs":
            return self.epoch >= after  # the same on every rank
        share = after if kind == "share" else self.cfg.train.scst_auto_share
        due = self.budget.limited and self.budget.elapsed() >= share * self.budget.seconds
        due = due or (kind == "auto" and self.plateaued)
        if self.d.world > 1:
            due = bool(broadcast_from_main([float(due)], self.d, self.device)[0])
        return due

    def _switch_to_scst(self, ratio: float = 1.0) -> None:
        """Cross-entropy -> self-critical training, inside the run: the cross-entropy weights are
        validated and saved (unless they just were); the best of them start the new stage (the
        last ones unless a validation since the best was worse); a fresh Adam at ``scst_lr`` with
        its own warm-up and schedule; the policy-gradient objective."""
        t = self.cfg.train
        if self.step > self.validated_step:
            self._end_of_stretch(ratio, validate=True)
        best = self.run_dir / "checkpoints" / "best.pt"
        barrier(self.d)
        kept = "best" if self.bad_validations and best.is_file() else "last"
        if kept == "best":
            self.model.load_state_dict(checkpoint.load(best, map_location="cpu")["model"])
        self.stage = "scst"
        self._set_val_every()
        self.objective = self._build_objective()
        self._setup_optimizer()
        self._plan_seconds()
        self._wrap()
        self.epoch_sums = torch.zeros(len(self.objective.sum_names), dtype=torch.float64, device=self.device)
        self.epoch_samples, self.epoch_seconds = 0, 0.0
        self.bad_validations, self.plateaued = 0, False
        self.model.train()
        when = f"{self.budget.elapsed() / 60:.1f} min" if self.budget.limited else f"epoch {self.epoch + 1}"
        self.emit("stage", epoch=self.epoch, message=(
            f"{when} (step {self.step}): self-critical training from the {kept} cross-entropy weights, "
            f"lr {t.scst_lr:g} (warm-up {t.scst_warmup_steps} steps), {t.scst_samples} samples per image, "
            f"reward CIDEr-D"))

    def _finish(self) -> dict:
        if self.log is not None:
            self.log.close()
        cleanup_distributed(self.d)
        best = self.best if math.isfinite(self.best) else None
        return {"run_dir": str(self.run_dir), "best_metric": self.metric, "best_score": best,
                "best_epoch": self.best_epoch, "epochs_run": self.epoch - self.start_epoch,
                "stop_reason": self.stop_reason, "history": self.history, "seconds": round(self.budget.elapsed(), 2)}

    def train_epoch(self) -> None:
        """The rest of the current epoch (all of it unless resumed midway), validating on schedule;
        stops early for the budget, a signal or early stopping (``self.stop_reason``)."""
        cfg = self.cfg
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch * self.images_per_batch)
        self.model.train()
        ratio = tf_ratio(cfg.train, self.step, self.total_steps)
        self.emit("epoch_start", epoch=self.epoch, epochs=cfg.train.epochs, steps=self.steps_per_epoch,
                  done=self.batch_in_epoch, tf_ratio=ratio)
        clock = self.budget.clock
        t_last = clock()
        for batch in self.loader:
            stop = self._stop_now()
            if stop == "signal":  # pre-emption: save where we are, quickly, and go
                self.stop_reason = stop
                self.save_checkpoint("last.pt")
                self.emit("stop", reason=stop, message=f"stopped by {self.signals.received} at step {self.step}; "
                          f"last.pt saved: `capcli train --resume {self.run_dir}` continues it")
                return
            if stop == "max_minutes":  # one more step would eat into the final validation's time
                self.stop_reason = stop
                if self.step > self.validated_step:  # else the weights were validated and saved already
                    self._end_of_stretch(ratio, validate=True)
                return
            if self.scst_after[0] in ("share", "auto") and (self.d.world == 1 or self.batch_in_epoch % cfg.train.log_every == 0) \
                    and self._scst_due():
                self._switch_to_scst(ratio)
                t_last = clock()
            ratio = tf_ratio(cfg.train, self.step, self.total_steps)
            self.schedule.step(self.step)
            out = self._guarded_step(batch, ratio)
            if out["skipped"]:  # a NaN/inf loss: nothing changed; counted, and enough in a row stop the run
                self.bad_steps += 1
                self.skipped_steps += 1
                if self.bad_steps >= cfg.train.max_bad_steps:
                    self._stop_on_bad_steps(out)
            else:
                self.bad_steps = 0
                self.epoch_sums += out["sums"]
                self.epoch_samples += out["samples"]
            self.step += 1
            self.batch_in_epoch += 1
            now = clock()
            self.schedule.tick(now - self.wall_last)  # wall time, validations included: what a budget counts
            self.wall_last = now
            self.budget.step_seconds = now - t_last  # the last step: what one more would take
            self.epoch_seconds += now - t_last
            t_last = now
            if self.batch_in_epoch % cfg.train.log_every == 0 or self.batch_in_epoch == self.steps_per_epoch:
                self._report_step(ratio)
            if self.val_unit == "steps" and self.step % self.val_n == 0 and self.batch_in_epoch < self.steps_per_epoch:
                self._end_of_stretch(ratio, validate=True)
                if self.stop_reason != "epochs":  # early stopping
                    return
                self.model.train()
                t_last = clock()
        # the epoch is complete: validate on schedule, at the end, or when the budget says stop
        self.epoch += 1
        self.batch_in_epoch = 0
        stop = self._stop_now(force_sync=True) if self.epoch < cfg.train.epochs else None
        validate = stop != "signal" and (self.epoch >= cfg.train.epochs or stop == "max_minutes" or (
            self.val_unit == "epochs" and self.epoch % self.val_n == 0) or (
            self.val_unit == "steps" and self.step % self.val_n == 0))
        self._end_of_stretch(ratio, validate=validate, epoch_done=True)
        if stop is not None and self.stop_reason == "epochs":
            self.stop_reason = stop

    def _guarded_step(self, batch: dict, ratio: float) -> dict:
        """The training step; out of memory becomes a one-line error with a batch size that fits."""
        try:
            return self.train_step(self._to_device(batch), ratio)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not is_out_of_memory(exc):
                raise
        self.optimizer.zero_grad(set_to_none=True)
        fits = largest_fitting_batch(self.task, batch, self._to_device, ratio, self.amp_dtype, self.device)
        k = self.train_set.captions_per_image
        where = f"on {torch.cuda.get_device_name(self.device)}" if self.device.type == "cuda" else "in host memory"
        hint = (f"train.batch_size={fits * k} ({fits} images) fits {where}: rerun with it"
                if fits else "not even one image fits: use a smaller encoder, model.image_size or model.finetune=false")
        raise UserError(f"out of memory at train.batch_size={self.cfg.train.batch_size} "
                        f"({self.images_per_batch} images a step) {where}; {hint}"
                        + (f" (or `capcli train --resume {self.run_dir}` after editing its config.yaml)"
                           if (self.run_dir / "checkpoints" / "last.pt").is_file() else ""))

    def _stop_on_bad_steps(self, out: dict) -> None:
        t = self.cfg.train
        last = self.run_dir / "checkpoints" / "last.pt"
        keep = f"; the last good checkpoint stays: {last}" if last.is_file() else ""
        causes = []
        if self.amp_dtype == torch.float16:
            causes.append("fp16 overflowing: use train.amp=bf16 or off")
        causes.append(f"a learning rate too high for this model: lower train.lr (now {t.lr:g})"
                      + (f" or train.encoder_lr (now {t.encoder_lr:g})" if not self.frozen_stage else ""))
        raise UserError(f"the loss was NaN/inf for {self.bad_steps} steps in a row (step {self.step + 1}, epoch "
                        f"{self.epoch + 1}; each was skipped); likely {' or '.join(causes)}{keep}")

    def _to_device(self, batch: dict) -> dict:
        batch = trim_padding(batch)
        out = {"captions": batch["captions"].to(self.device, non_blocking=True),
               "lengths": batch["lengths"].to(self.device, non_blocking=True), "index": batch["index"]}
        for key in ("images", "regions"):
            if key in batch:
                out[key] = batch[key].to(self.device, non_blocking=True)
        return out

    def _report_step(self, ratio: float) -> None:
        s = self.epoch_sums.tolist()
        if not math.isfinite(s[0]):
            raise UserError(f"loss became {s[0]} at step {self.step} (epoch {self.epoch + 1}); "
                            "lower train.lr or use train.amp=off")
        self.emit("step", epoch=self.epoch, step=self.batch_in_epoch, steps=self.steps_per_epoch,
                  **self.objective.summary(s), tf_ratio=ratio,
                  samples_per_s=self.epoch_samples * self.d.world / max(self.epoch_seconds, 1e-9))

    def _stop_now(self, force_sync: bool = False) -> str | None:
        """"signal" (SIGTERM/SIGINT came), "max_minutes" (the budget would be passed), or None.
        With several processes rank 0 decides for all, every ``log_every`` steps (a broadcast)."""
        steps = 1 if self.d.world == 1 else self.cfg.train.log_every  # until the next check
        reason = "signal" if self.signals.received else "max_minutes" if self.budget.out_of_time(steps) else None
        if self.d.world == 1:
            return reason
        if not force_sync and self.batch_in_epoch % self.cfg.train.log_every:
            return None
        codes = [None, "signal", "max_minutes"]
        return codes[int(broadcast_from_main([float(codes.index(reason))], self.d, self.device)[0])]

    def _end_of_stretch(self, ratio: float, *, validate: bool, epoch_done: bool = False) -> None:
        """Write a metrics record (validated or not) and checkpoints; decide early stopping."""
        cfg, d = self.cfg, self.d
        sums = all_reduce_sum(self.epoch_sums.tolist(), d, self.device)
        samples = all_reduce_sum([float(self.epoch_samples)], d, self.device)[0]
        fraction = self.batch_in_epoch / self.steps_per_epoch
        record = {"epoch": self.epoch if epoch_done else round(self.epoch + fraction, 4), "step": self.step,
                  "objective": self.stage,
                  **{f"train_{k}": v for k, v in self.objective.summary(sums).items()},
                  "tf_ratio": ratio, "samples_per_s": samples / max(self.epoch_seconds, 1e-9),
                  "lr": self.optimizer.param_groups[0]["lr"],
                  "encoder_lr": next((g["lr"] for g in self.optimizer.param_groups if g.get("name") == "encoder"), 0.0),
                  "train_seconds": round(self.epoch_seconds, 2), "skipped_steps": self.skipped_steps}
        improved = False
        if validate:
            self.validated_step = self.step
        if validate and d.main:
            scores = self.validate()
            record.update({f"val_{k}": scores[k] for k in ("loss", "top5", *VAL_KEYS)})
            record.update({"val_beam": cfg.train.val_beam, "val_samples": [c["caption"] for c in scores["captions"][:3]]})
            improved = scores[self.metric] > self.best
            if not improved and self.stage == "xe" and self.scst_after[0] == "auto":
                self.plateaued = True
            if improved:
                self.best, self.best_epoch = scores[self.metric], record["epoch"]
        if validate:
            improved = bool(broadcast_from_main([float(improved)], d, self.device)[0])
            self.bad_validations = 0 if improved else self.bad_validations + 1
            if self.schedule.validated(improved):
                self.emit("lr_cut", lrs=[g["lr"] for g in self.optimizer.param_groups])
        if math.isfinite(self.best):
            record[f"best_{self.metric}"] = self.best
        record["elapsed_s"] = round(self.budget.elapsed(), 2)
        if epoch_done:
            self.epoch_sums.zero_()
            self.epoch_samples, self.epoch_seconds = 0, 0.0
        if d.main:
            self.log.append(record)
            t0 = self.budget.clock()
            self.save_checkpoint("last.pt")
            if improved:
                self.save_checkpoint("best.pt")
            self.budget.save_seconds = max(self.budget.save_seconds, self.budget.clock() - t0)
        self.history.append(record)
        self.emit("epoch_end", record=record)
        # early stopping ends the last stage only: before scst_after's switch a plateau switches
        if validate and cfg.train.patience and self.bad_validations >= cfg.train.patience and not (
                self.stage == "xe" and self.scst_after[0] != "never"):
            self.stop_reason = "early_stopping"

    # ------------------------------------------------------------------------------------ validation

    def validate(self) -> dict:
        """Free-running decoding of the val split (rank 0): every caption score, plus the
        teacher-forced loss and top-5. Timed, to keep back enough of a budget for the next one."""
        t0 = self.budget.clock()
        self.emit("validate", epoch=self.epoch, images=len(self.val_set))
        scores = evaluate_model(
            self.model, self.val_set, self.device, self._val_options(), batch_size=max(self.images_per_batch, 16),
            alpha_c=self.cfg.train.alpha_c, meteor=False, features=self.val_cache if self.use_cache else None,
            progress=lambda done, n: self.emit("validate_step", done=done, total=n))
        self.budget.val_seconds = self.budget.clock() - t0
        return scores

    def _val_options(self) -> DecodeOptions:
        return DecodeOptions(beam_size=self.cfg.train.val_beam, max_length=self.max_length, amp_dtype=self.amp_dtype)

    def _probe_validation(self) -> float:
        """Seconds a validation will take, before the first one: decode one batch and scale up."""
        if not self.d.main:
            return 0.0
        n = min(len(self.val_set), max(self.images_per_batch, 16))
        probe = CaptionDataset(self.cfg.data.dir, self.cfg.data.val_split, max_images=n)
        t0 = self.budget.clock()
        evaluate_model(self.model, probe, self.device, self._val_options(), batch_size=n, meteor=False,
                       features=self.val_cache if self.use_cache else None, score=False)
        self.model.train()
        return (self.budget.clock() - t0) * len(self.val_set) / max(n, 1) * 1.2 + 1.0

    # ------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, name: str) -> None:
        """Everything an exact resume needs, written atomically (rank 0)."""
        if not self.d.main:
            return
        checkpoint.save({
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "lr_schedule": self.schedule.state_dict(),
            "config": self.cfg.to_dict(),
            "vocab": self.vocab.itos,
            "data": self.data_info,
            "epoch": self.epoch,  # completed epochs
            "batch_in_epoch": self.batch_in_epoch,  # steps of the current epoch already done
            "frozen_stage": self.frozen_stage,  # encoder still frozen (train.finetune_after)
            "stage": self.stage,  # xe or scst (train.scst_after switches)
            "plateaued": self.plateaued,  # scst_after=auto: switch at the next step
            "epoch_sums": self.epoch_sums.tolist(),
            "epoch_samples": self.epoch_samples,
            "epoch_seconds": self.epoch_seconds,
            "step": self.step,
            "best_metric": self.metric,
            "best_score": self.best if math.isfinite(self.best) else None,
            "best_epoch": self.best_epoch,
            "bad_validations": self.bad_validations,
            "skipped_steps": self.skipped_steps,
            "rng": rng_state(),
            "capcli_version": __version__,
            "torch_version": str(torch.__version__),
        }, self.run_dir / "checkpoints" / name)


def train(cfg: Config | None, device: torch.device, *, resume: str | Path | None = None,
          progress: ProgressFn | None = None) -> dict:
    """Train ``cfg`` (or resume a run); returns a summary dict (run dir, best score, stop reason)."""
    return Trainer(cfg, device, resume=resume, progress=progress).fit()
