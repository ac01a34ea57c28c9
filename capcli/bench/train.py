"""`capcli benchmark train`: training-step throughput of the trainer's own step
(:class:`capcli.training.objectives.TrainStep`), on random data."""

from __future__ import annotations

import torch

from capcli.bench.harness import (FIRST_WORD, PeakMemory, ProgressFn, feature_shape, model_config, random_captions,
                                  random_images, time_fn, with_oom_retry)
from capcli.errors import UserError
from capcli.models.captioner import CaptionModel
from capcli.models.encoder import check_encoder_names
from capcli.runtime import amp_name, autocast_dtype, free_memory
from capcli.training.objectives import TrainStep, XEObjective, make_adam

MODES = ("frozen", "finetune", "cached")


def bench_train(encoder: str, *, image_size: int = 224, batch: int = 32, mode: str = "finetune",
                steps: int = 10, warmup: int = 3, device: torch.device | str = "cpu", amp="auto",
                captions_per_image: int = 5, vocab: int = 1000, max_length: int = 20, grid: int = 7,
                grad_clip: float = 5.0, tf_ratio: float = 1.0, channels_last="auto",
                progress: ProgressFn | None = None) -> dict:
    """Throughput of training steps (forward, loss, backward, Adam step) on random data.

    ``batch`` counts caption-image pairs as ``train.batch_size`` does: each step encodes
    ``batch // captions_per_image`` images and decodes ``captions_per_image`` captions of up to
    ``max_length`` random words per image (lengths drawn as :func:`random_captions` draws them),
    with teacher forcing at ``tf_ratio``. The step is the trainer's: the ``xe`` objective, then
    ``TrainStep``.

    Modes: ``finetune`` trains encoder and decoder; ``frozen`` runs the encoder under no_grad and
    trains the decoder; ``cached`` trains the decoder on precomputed random features of the
    encoder's output shape (the cost of training on cached features of a frozen encoder, without
    reading them from disk).
    """
    device = torch.device(device)
    if mode not in MODES:
        raise UserError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    if captions_per_image < 1:
        raise UserError(f"captions_per_image must be at least 1, got {captions_per_image}")
    if batch < captions_per_image:
        raise UserError(f"batch {batch} counts caption-image pairs; it needs at least "
                        f"{captions_per_image} (one image with its {captions_per_image} captions)")
    if vocab <= FIRST_WORD:
        raise UserError(f"vocab {vocab} is too small: 4 ids are specials, so use at least {FIRST_WORD + 1}")
    if max_length < 1:
        raise UserError(f"max_length must be at least 1 word, got {max_length}")
    if not 0.0 <= tf_ratio <= 1.0:
        raise UserError(f"tf_ratio must be in [0, 1], got {tf_ratio}")
    amp_dtype = autocast_dtype(amp, device)
    check_encoder_names([encoder])

    def run(images: int) -> dict:
        mcfg = model_config(encoder, grid, finetune=mode == "finetune")
        mcfg.channels_last = channels_last
        model = CaptionModel(mcfg, vocab, pretrained=False)
        # cached: the encoder only gives the feature shape and never reaches the device
        feat_shape = feature_shape(model.encoder, image_size)
        cl = model.encoder.channels_last
        if mode == "cached":  # only the feature norm is used: keep the backbone off the device
            model.encoder.backbone = torch.nn.Identity()
        meter = PeakMemory(device).start()
        try:
            model.to(device).train()
            optimizer = make_adam(model.trainable_groups(lr=4e-4, encoder_lr=1e-4))
            scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
            step = TrainStep(XEObjective(model, alpha_c=1.0), optimizer, scaler, device, amp_dtype, grad_clip)
            captions, lengths = random_captions(images, captions_per_image, max_length, vocab, device)
            batch_data = {"captions": captions, "lengths": lengths}
            if mode == "cached":
                g = torch.Generator().manual_seed(0)
                batch_data["regions"] = torch.randn((images, *feat_shape), generator=g).to(device)
            else:
                batch_data["images"] = random_images(images, image_size, device)
            timing = time_fn(lambda: step(batch_data, tf_ratio), warmup, steps, device, progress,
                             phase=f"train {mode}")
            peak = meter.stop()
        finally:
            del model
            free_memory(device)
        pairs = images * captions_per_image
        return {"samples_per_s": pairs / timing["mean_s"], "images_per_s": images / timing["mean_s"],
                "step_ms": timing["median_s"] * 1e3, "step_ms_mean": timing["mean_s"] * 1e3,
                "peak_mem_mb": peak, "peak_mem_kind": meter.kind,
                "batch": pairs, "images_per_step": images, "channels_last": cl}

    out = with_oom_retry(run, batch // captions_per_image, device, f"train {encoder} ({mode})")
    return {"encoder": encoder, "mode": mode, **out, "batch_requested": batch,
            "captions_per_image": captions_per_image, "image_size": image_size, "steps": steps,
            "warmup": warmup, "vocab": vocab, "max_length": max_length, "grid": grid, "tf_ratio": tf_ratio,
            "amp": amp_name(amp_dtype), "device": str(device)}
