"""The training loop: one process or many (torchrun/DDP), mixed precision, teacher forcing on, off or
scheduled, free-running validation every epoch, atomic checkpoints, resume, early stopping and a
wall-clock budget.

setup -> per epoch (train, validate, checkpoint) -> cleanup. Only rank 0 writes files.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

import capcli
from capcli import checkpoint
from capcli.config import Config, config_from_dict, save_config
from capcli.data.dataset import CaptionDataset, collate
from capcli.data.features import CachedFeatureDataset, build_cache, cache_path, collate_cached
from capcli.errors import UserError
from capcli.evaluate import autocast_dtype, evaluate_model
from capcli.metrics import topk_hits
from capcli.models.captioner import Captioner
from capcli.models.decoder import caption_loss

ProgressFn = Callable[..., None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def tf_ratio(cfg: Config, epoch: int) -> float:
    """Share of ground-truth inputs at ``epoch`` (0-based): 1 (on), 0 (off) or a linear schedule."""
    tf = cfg.train.teacher_forcing
    if tf is True:
        return 1.0
    if tf is False:
        return 0.0
    if cfg.train.epochs <= 1:
        return cfg.train.tf_start
    frac = epoch / (cfg.train.epochs - 1)
    return cfg.train.tf_start + frac * (cfg.train.tf_end - cfg.train.tf_start)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def new_run_dir(cfg: Config) -> Path:
    """runs/NAME, or runs/NAME-2, -3 ... when taken (unless run.overwrite)."""
    base = Path(cfg.run.dir) / cfg.run.name
    if cfg.run.overwrite or not base.exists():
        return base
    n = 2
    while (base.parent / f"{base.name}-{n}").exists():
        n += 1
    return base.parent / f"{base.name}-{n}"


def _all_reduce(values: list[float], d: Dist, device) -> list[float]:
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def train(cfg: Config, device: torch.device, *, resume: str | Path | None = None,
          progress: ProgressFn | None = None) -> dict:
    """Train ``cfg``; returns a summary dict (run dir, best score, epochs run, stop reason)."""
    emit = progress or (lambda *a, **k: None)
    d, device = setup_distributed(device)
    ckpt = None
    if resume is not None:
        run_dir = Path(resume)
        last = run_dir / "checkpoints" / "last.pt"
        if run_dir.is_file():
            last, run_dir = run_dir, run_dir.parent.parent
        if not last.is_file():
            raise UserError(f"cannot resume {resume}: no checkpoints/last.pt there")
        ckpt = checkpoint.load(last, map_location="cpu")
        cfg = config_from_dict(ckpt["config"])
    else:
        run_dir = new_run_dir(cfg)
    seed_everything(cfg.seed + d.rank)

    train_set = CaptionDataset(cfg.data.dir, cfg.data.train_split)
    val_set = CaptionDataset(cfg.data.dir, cfg.data.val_split, max_images=cfg.data.val_max_images)
    vocab = train_set.vocab
    k = train_set.captions_per_image
    images_per_batch = max(1, cfg.train.batch_size // k)
    max_length = cfg.train.max_length or train_set.max_length

    model = Captioner(cfg.model, len(vocab), pretrained=False if ckpt else None).to(device)
    optimizer = torch.optim.Adam(model.trainable_groups(cfg.train.lr, cfg.train.encoder_lr),
                                 weight_decay=cfg.train.weight_decay)
    amp_dtype = autocast_dtype(cfg.train.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, step, best, best_epoch, history = 0, 0, -1.0, -1, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
        best, best_epoch = float(ckpt["best_score"]), int(ckpt["best_epoch"])
        checkpoint.set_rng_state(ckpt["rng"])
    ddp_model = model
    if d.world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    # a frozen encoder gives the same features every epoch: compute them once (rank 0), reuse them
    cached = not cfg.model.finetune and cfg.train.cache_features
    train_data, collate_fn = train_set, collate
    if cached:
        path = cache_path(train_set, model.encoder)
        if d.main:
            emit("cache", split=cfg.data.train_split, images=len(train_set))
            build_cache(model.encoder, train_set, device, path, batch_size=max(images_per_batch, 32),
                        amp_dtype=amp_dtype, progress=lambda done, n: emit("cache_step", done=done, total=n))
        if d.world > 1:
            dist.barrier()
        train_data = CachedFeatureDataset(train_set, path)
        collate_fn = collate_cached
    sampler = DistributedSampler(train_data, d.world, d.rank, shuffle=True, seed=cfg.seed) if d.world > 1 else None
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train_data, batch_size=images_per_batch, shuffle=sampler is None, sampler=sampler,
                        num_workers=cfg.data.num_workers, collate_fn=collate_fn, drop_last=False,
                        pin_memory=device.type == "cuda", generator=generator,
                        persistent_workers=cfg.data.num_workers > 0)

    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    metrics_path = run_dir / "metrics.jsonl"
    data_info = {"image_size": train_set.image_size, "resize": train_set.manifest.get("resize", "squash"),
                 "max_length": train_set.max_length, "dir": str(cfg.data.dir)}

    def save(name: str, epoch: int) -> None:
        if not d.main:
            return
        checkpoint.save({
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "config": cfg.to_dict(),
            "vocab": vocab.itos,
            "data": data_info,
            "epoch": epoch,
            "step": step,
            "best_score": best,
            "best_epoch": best_epoch,
            "rng": checkpoint.rng_state(),
            "capcli_version": capcli.__version__,
            "torch_version": str(torch.__version__),
        }, run_dir / "checkpoints" / name)

    t_start = time.perf_counter()
    budget = cfg.train.max_minutes * 60 if cfg.train.max_minutes else math.inf
    stop_reason = "epochs"
    bad_epochs = 0
    epoch = start_epoch
    emit("start", run_dir=str(run_dir), epochs=cfg.train.epochs, start_epoch=start_epoch,
         steps_per_epoch=len(loader), device=str(device), world=d.world,
         train_images=len(train_set), val_images=len(val_set))
    for epoch in range(start_epoch, cfg.train.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        generator.manual_seed(cfg.seed * 1000 + epoch)  # epoch e sees the same order, resumed or not
        ratio = tf_ratio(cfg, epoch)
        ddp_model.train()
        emit("epoch_start", epoch=epoch, epochs=cfg.train.epochs, steps=len(loader), tf_ratio=ratio)
        # running sums stay on the device (loss x tokens, ce x tokens, top-5 hits, tokens) and are
        # read only when reported: no host sync on every step
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        pairs = 0
        t_epoch = time.perf_counter()
        out_of_time = False
        for i, batch in enumerate(loader):
            captions = batch["captions"].to(device, non_blocking=True)
            lengths = batch["lengths"].to(device, non_blocking=True)
            # trim padding beyond the longest caption of the batch (read on the CPU copy)
            longest = int(batch["lengths"].max())
            captions = captions[:, :, :longest]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                if cached:
                    logits, alphas = ddp_model(None, captions, ratio, regions=batch["regions"].to(device))
                else:
                    logits, alphas = ddp_model(batch["images"].to(device, non_blocking=True), captions, ratio)
            b, kk, length = captions.shape
            targets = captions.reshape(b * kk, length)[:, 1:]
            loss, ce, mask = caption_loss(logits, targets, alphas, lengths.reshape(-1), cfg.train.alpha_c)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.train.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_value_(model.parameters(), cfg.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            c, t = topk_hits(logits.detach().float(), targets, mask, k=5)
            sums += torch.stack([loss.detach() * t, ce.detach() * t, c, t]).double()
            pairs += b * kk
            if (i + 1) % cfg.train.log_every == 0 or i + 1 == len(loader):
                loss_sum, _, correct, total = sums.tolist()
                if not math.isfinite(loss_sum):
                    raise UserError(f"loss became {loss_sum} by epoch {epoch + 1} step {i + 1}; "
                                    "lower train.lr or use train.amp=off")
                elapsed = time.perf_counter() - t_epoch
                emit("step", epoch=epoch, step=i + 1, steps=len(loader), loss=loss_sum / max(total, 1),
                     top5=correct / max(total, 1), samples_per_s=pairs * d.world / max(elapsed, 1e-9))
            if time.perf_counter() - t_start > budget:
                out_of_time = True
                break
        train_seconds = time.perf_counter() - t_epoch
        loss_sum, ce_sum, correct, total, pairs = _all_reduce([*sums.tolist(), pairs], d, device)

        if out_of_time:  # an unfinished epoch: keep the weights, rerun the epoch on resume
            stop_reason = "max_minutes"
            save("last.pt", epoch)
            break

        record = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": loss_sum / max(total, 1),
            "train_ce": ce_sum / max(total, 1),
            "train_top5": correct / max(total, 1),
            "tf_ratio": ratio,
            "samples_per_s": pairs / max(train_seconds, 1e-9),
            "lr": optimizer.param_groups[0]["lr"],
            "encoder_lr": optimizer.param_groups[1]["lr"] if len(optimizer.param_groups) > 1 else 0.0,
            "train_seconds": round(train_seconds, 2),
        }
        if d.main:
            emit("validate", epoch=epoch, images=len(val_set))
            scores = evaluate_model(model, val_set, device, beam_size=cfg.train.val_beam,
                                    max_length=max_length, batch_size=max(images_per_batch, 16),
                                    alpha_c=cfg.train.alpha_c, amp_dtype=amp_dtype, meteor=False,
                                    progress=lambda done, n: emit("validate_step", done=done, total=n))
            record.update({
                "val_loss": scores["loss"], "val_top5": scores["top5"],
                **{f"val_{m}": scores[m] for m in ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l")},
                "val_beam": cfg.train.val_beam,
                "val_samples": [c["caption"] for c in scores["captions"][:3]],
            })
            improved = scores["bleu4"] > best
            if improved:
                best, best_epoch = scores["bleu4"], epoch + 1
            record["best_bleu4"] = best
            record["elapsed_s"] = round(time.perf_counter() - t_start, 2)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            save("last.pt", epoch + 1)
            if improved:
                save("best.pt", epoch + 1)
            bad_epochs = 0 if improved else bad_epochs + 1
        if d.world > 1:  # rank 0 validated: share its early-stopping state
            state = torch.tensor([float(bad_epochs), best], dtype=torch.float64, device=device)
            dist.broadcast(state, 0)
            bad_epochs, best = int(state[0]), float(state[1])
        history.append(record)
        emit("epoch_end", record=record)
        if cfg.train.patience and bad_epochs >= cfg.train.patience:
            stop_reason = "early_stopping"
            break
        if time.perf_counter() - t_start > budget:
            stop_reason = "max_minutes"
            break
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"run_dir": str(run_dir), "best_bleu4": best, "best_epoch": best_epoch,
            "epochs_run": len(history), "stop_reason": stop_reason, "history": history,
            "seconds": round(time.perf_counter() - t_start, 2)}
