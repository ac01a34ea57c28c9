"""`capcli benchmark encoders`: size, cost and speed of timm encoders side by side."""

from __future__ import annotations

import torch

from capcli.bench.harness import (PeakMemory, ProgressFn, backbone_params_m, encoder_gflops, feature_shape,
                                  random_images, time_fn, with_oom_retry)
from capcli.bench.train import bench_train
from capcli.errors import UserError
from capcli.models.encoder import Encoder, check_encoder_names
from capcli.runtime import amp_name, autocast, autocast_dtype, free_memory

CPU_ENCODERS = ("convnext_atto", "convnext_femto", "convnext_pico")
GPU_ENCODERS = ("convnext_tiny", "convnext_small", "convnext_base")  # the paper's sizes
ROW_KEYS = ("encoder", "params_m", "gflops", "images_per_s", "train_samples_per_s", "peak_mem_mb")


def bench_encoder(name: str, *, image_size: int = 224, batch: int = 32, device: torch.device | str = "cpu",
                  amp="auto", grid: int = 7, steps: int = 10, warmup: int = 3, train_batch: int | None = None,
                  captions_per_image: int = 5, progress: ProgressFn | None = None) -> dict:
    """One row of ``capcli benchmark encoders``: size, cost and speed of one timm encoder.

    Keys: ``encoder``, ``params_m`` (backbone parameters, millions), ``gflops`` (per image, see
    :func:`encoder_gflops`: multiply-add = 2 FLOPs), ``images_per_s`` (encoder inference,
    ``batch`` images at a time, inference_mode), ``train_samples_per_s`` (caption-image pairs per
    second of a full finetuning step, encoder + decoder, 5 random captions of 16 words per image,
    vocab 1000: see :func:`bench_train`), ``peak_mem_mb`` (the larger of the inference and training
    peaks), then the settings. ``train_batch`` counts pairs; default ``batch * captions_per_image``
    (the same ``batch`` images as inference, each with its captions).
    """
    device = torch.device(device)
    if batch < 1:
        raise UserError(f"batch must be at least 1, got {batch}")
    amp_dtype = autocast_dtype(amp, device)
    check_encoder_names([name])
    train_batch = train_batch or batch * captions_per_image

    # size and FLOPs on the CPU, once, with the model the inference run uses
    enc = Encoder(name, pretrained=False, grid=grid, finetune=False, image_size=None).eval()
    feat_shape = list(feature_shape(enc, image_size))
    params_m = backbone_params_m(enc)
    gflops = encoder_gflops(enc, image_size)

    def infer(n: int) -> dict:
        meter = PeakMemory(device).start()
        try:
            enc.to(device)
            images = random_images(n, image_size, device)

            @torch.inference_mode()
            def forward() -> None:
                with autocast(device, amp_dtype):
                    enc(images)

            timing = time_fn(forward, warmup, steps, device, progress, phase="inference")
            peak = meter.stop()
        finally:
            enc.to("cpu")
            free_memory(device)
        return {"images_per_s": n / timing["mean_s"], "infer_ms": timing["median_s"] * 1e3,
                "infer_peak_mem_mb": peak, "peak_mem_kind": meter.kind, "batch": n}

    inference = with_oom_retry(infer, batch, device, f"encoder {name} (inference)")
    enc = None  # the inference copy is no longer needed: free it before the training run
    free_memory(device)
    train = bench_train(name, image_size=image_size, batch=train_batch, mode="finetune", steps=steps,
                        warmup=warmup, device=device, amp=amp, captions_per_image=captions_per_image,
                        vocab=1000, max_length=16, grid=grid, progress=progress)
    peaks = [p for p in (inference["infer_peak_mem_mb"], train["peak_mem_mb"]) if p is not None]
    return {
        "encoder": name,
        "params_m": params_m,
        "gflops": gflops,
        "images_per_s": inference["images_per_s"],
        "train_samples_per_s": train["samples_per_s"],
        "peak_mem_mb": max(peaks) if peaks else None,
        "peak_mem_kind": inference["peak_mem_kind"],
        "infer_ms": inference["infer_ms"],
        "infer_peak_mem_mb": inference["infer_peak_mem_mb"],
        "train_step_ms": train["step_ms"],
        "train_peak_mem_mb": train["peak_mem_mb"],
        "feature_shape": feat_shape,
        "image_size": image_size,
        "batch": inference["batch"],
        "train_batch": train["batch"],
        "oom_retries": inference["oom_retries"] + train["oom_retries"],
        "steps": steps,
        "warmup": warmup,
        "amp": amp_name(amp_dtype),
        "device": str(device),
    }


