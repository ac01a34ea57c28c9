"""The Python API: a trained captioner in one line, the same engine as `capcli caption` and
`capcli evaluate`.

    from capcli import Captioner
    cap = Captioner.load("runs/coco")           # run dir, checkpoint file, model folder, "hf-hub:user/name"
    cap.caption(["a.jpg", pil_image, uint8_tensor], beam=3)       # -> list of captions
    cap.caption_with_attention("a.jpg")         # words + one attention grid per word

Preprocessing is the model's own: the image size and resize policy it was trained with (stored
with it) and the backbone's mean/std (inside the encoder), the same path as `prepare`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from capcli.config import Config, config_from_dict
from capcli.data.vocab import Vocab
from capcli.decode import BLOCK_NGRAMS, DecodeOptions, default_batch_size, generate
from capcli.errors import UserError
from capcli.models.captioner import CaptionModel
from capcli.runtime import autocast_dtype, resolve_device
from capcli.store.folder import read_model
from capcli.version import __version__

ImageLike = Any  # a path (str | Path), a PIL image, a uint8 array/tensor (H, W, 3) or (3, H, W)


def load_model(source: str | Path, device: torch.device | str = "cpu") -> tuple[CaptionModel, Vocab, Config, dict]:
    """(model in eval mode on ``device``, vocab, config, state) from any MODEL source (see
    :func:`capcli.store.folder.read_model`), with a one-line UserError for a model this capcli
    cannot build."""
    state = read_model(source)
    made_by = state.get("capcli_version", "?")
    versions = f"made by capcli {made_by}, this is capcli {__version__}"
    try:
        cfg = config_from_dict(state["config"])
        vocab = Vocab(state["vocab"])
        model = CaptionModel(cfg.model, len(vocab), pretrained=False)  # weights come from the state dict
    except UserError as exc:  # a config, vocabulary or encoder this capcli does not know: say whose it is
        raise UserError(f"model {source} ({versions}): {str(exc).rstrip('.')}; use capcli {made_by} for it, "
                        "or retrain") from exc
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:  # weights that do not fit the model this capcli builds
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise UserError(f"model {source} does not fit the model this capcli builds ({versions}; {first[:160]}); "
                        f"use capcli {made_by} for it, or retrain") from exc
    model.to(device).eval()
    return model, vocab, cfg, state


def to_uint8_image(image: ImageLike, size: int, resize: str = "squash") -> np.ndarray:
    """Any supported image input -> uint8 (3, size, size), through the one preprocessing path."""
    from PIL import Image

    from capcli.data.images import load_image, prepare_image

    if isinstance(image, (str, Path)):
        return load_image(image, size, resize)
    if isinstance(image, Image.Image):
        return prepare_image(image, size, resize)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise UserError(f"image arrays must be uint8 (0-255), got {image.dtype}; scale and convert first")
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = image.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
            raise UserError(f"image array of shape {tuple(image.shape)}: give (H, W, 3), (3, H, W) or (H, W)")
        return prepare_image(Image.fromarray(image), size, resize)
    raise UserError(f"cannot caption a {type(image).__name__}: give a path, a PIL image or a uint8 array/tensor")


@dataclass
class Captioner:
    """A trained captioner ready to caption: the model, its vocabulary and its preprocessing."""

    model: CaptionModel
    vocab: Vocab
    config: Config
    image_size: int
    resize: str = "squash"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: torch.dtype | None = None
    max_length: int = 50
    source: str = ""
    data: dict = field(default_factory=dict)  # the training data facts the model carries (image size, dir, ...)
    training_data: dict | None = None  # the training set's manifest facts, where known (see describe)
    scores: list = field(default_factory=list)  # its `capcli evaluate` scores, where recorded
    capcli_version: str = "?"

    @classmethod
    def load(cls, source: str | Path, device: str | torch.device = "auto", amp: str | None = None, *,
             backend: str = "torch", int8: bool = False) -> "Captioner":
        """From a run dir, a checkpoint file, a model folder (`capcli export`) or ``hf-hub:user/name``.
        ``amp`` (auto | off | bf16 | fp16) sets the precision; by default the model's ``train.amp``
        (auto: bf16 or fp16 on CUDA, float32 on a CPU).

        ``backend="onnxruntime"`` runs the ONNX graphs of a folder exported with ``--format onnx``
        (on the CPU; ``int8=True``: its int8 decoder) under the same decoding code as torch."""
        if backend not in ("torch", "onnxruntime"):
            raise UserError(f"backend {backend!r}: use torch or onnxruntime")
        if int8 and backend != "onnxruntime":
            raise UserError("int8 runs the quantised ONNX decoder: use it with backend onnxruntime")
        if backend == "onnxruntime":
            return cls._load_onnx(source, device, amp, int8)
        device = device if isinstance(device, torch.device) else resolve_device(device)
        amp_dtype = autocast_dtype(amp, device) if amp is not None else None  # a bad value fails before the model is read
        model, vocab, cfg, state = load_model(source, device)
        if amp is None:  # the model's own precision
            amp_dtype = autocast_dtype(cfg.train.amp, device)
        return cls._from_state(model, vocab, cfg, state, device, amp_dtype, source)

    @classmethod
    def _from_state(cls, model, vocab: Vocab, cfg: Config, state: dict, device: torch.device,
                    amp_dtype: torch.dtype | None, source) -> "Captioner":
        """A Captioner of a loaded model (either backend) and the state dict it was read from."""
        data = state["data"]
        size = int(data.get("image_size") or cfg.model.image_size or 224)
        return cls(model, vocab, cfg, size, data.get("resize", "squash"), device, amp_dtype,
                   int(data.get("max_length") or 50), str(source), dict(data), state.get("training_data"),
                   list(state.get("scores") or []), str(state.get("capcli_version", "?")))

    @classmethod
    def _load_onnx(cls, source, device, amp, int8: bool) -> "Captioner":
        from capcli.store.onnx import OnnxCaptionModel, require
        from capcli.store.folder import folder_of, read_folder

        require("onnxruntime")
        if str(device) not in ("auto", "cpu"):
            raise UserError("the onnxruntime backend runs on the CPU here; use --device cpu (or the torch backend)")
        if amp not in (None, "auto", "off"):
            raise UserError(f"--amp {amp}: the onnxruntime backend runs float32 (or --int8); drop --amp")
        folder = folder_of(source, ("*.onnx",))
        state = read_folder(folder, weights=False)
        cfg = config_from_dict(state["config"])
        vocab = Vocab(state["vocab"])
        model = OnnxCaptionModel(folder, state["meta"], len(vocab), int8=int8)
        return cls._from_state(model, vocab, cfg, state, torch.device("cpu"), None, source)

    @property
    def backend(self) -> str:
        """torch or onnxruntime: what runs the model."""
        return getattr(self.model, "backend", "torch")

    def describe(self) -> dict:
        """What this model is, as a model card says it: ``source``, ``encoder`` (its timm name,
        ``pretrained``, ``frozen``, ``grid``), ``image_size``, ``resize``, ``vocab_size``,
        ``max_length``, ``decoder`` sizes, ``parameters``, ``data_dir``, ``training_data`` (the
        manifest's facts: source, splits, ...; None where it was not available) and ``scores``
        (one dict per ``capcli evaluate`` of the run: split, beam_size, bleu1..4, cider, ...)."""
        m = self.config.model
        counts = getattr(self.model, "parameter_counts", None)
        if counts:  # an ONNX model: the counts its folder recorded
            total, encoder = int(counts.get("total", 0)), int(counts.get("encoder", 0))
        else:
            total = sum(p.numel() for p in self.model.parameters())
            encoder = sum(p.numel() for p in self.model.encoder.parameters())
        return {"source": self.source, "capcli_version": self.capcli_version, "backend": self.backend,
                "encoder": {"name": m.encoder, "pretrained": m.pretrained not in (False, None, "false"),
                            "frozen": not m.finetune, "grid": m.grid},
                "image_size": self.image_size, "resize": self.resize, "vocab_size": len(self.vocab),
                "max_length": self.max_length,
                "decoder": {"emb_dim": m.emb_dim, "att_dim": m.att_dim, "dec_dim": m.dec_dim},
                "parameters": {"total": total, "encoder": encoder, "decoder": total - encoder},
                "data_dir": self.data.get("dir") or (self.training_data or {}).get("dir"),
                "training_data": self.training_data, "scores": list(self.scores)}

    def decode_options(self, *, beam: int = 3, max_length: int | None = None, block_ngrams: int | None = None,
                       sample: dict | None = None, seed: int | None = None, allow_unk: bool = False,
                       dangling: Sequence[str] | None = None) -> DecodeOptions:
        """The :class:`~capcli.decode.DecodeOptions` of a call, with this model's defaults (its
        longest caption, its precision). ``sample`` (``{"temperature": T, "top_k": K}``) draws
        captions instead of beam search; ``block_ngrams`` (None: :data:`capcli.decode.BLOCK_NGRAMS`)
        never repeats an n-gram; ``allow_unk`` lets <unk> appear; ``dangling`` replaces
        the words a caption may not end on (:data:`capcli.decode.DANGLING_EN`; ``()`` = none)."""
        drawn = {"sample": True, **sample} if sample is not None else {}
        block_ngrams = BLOCK_NGRAMS if block_ngrams is None else block_ngrams
        words = {} if dangling is None else {"dangling": tuple(dangling)}
        return DecodeOptions(beam_size=beam, max_length=max_length or self.max_length, block_ngrams=block_ngrams,
                             seed=seed, amp_dtype=self.amp_dtype, allow_unk=allow_unk, **words, **drawn)

    def preprocess(self, images: Iterable[ImageLike]) -> torch.Tensor:
        """uint8 (B, 3, S, S) on the model's device, as the model was trained to see them."""
        arrays = [to_uint8_image(im, self.image_size, self.resize) for im in images]
        return torch.from_numpy(np.stack(arrays)).to(self.device)

    @torch.inference_mode()
    def caption(self, images: ImageLike | Sequence[ImageLike], *, beam: int = 3, max_length: int | None = None,
                block_ngrams: int | None = None, batch_size: int | None = None, sample: dict | None = None,
                seed: int | None = None, allow_unk: bool = False,
                dangling: Sequence[str] | None = None) -> list[str] | str:
        """Captions of ``images`` (a list gives a list; one image gives one string). ``sample``
        (``{"temperature": T, "top_k": K}``) draws captions instead of beam search (``seed``: the
        same captions each time). The other settings: :meth:`decode_options`."""
        options = self.decode_options(beam=beam, max_length=max_length, block_ngrams=block_ngrams, sample=sample,
                                      seed=seed, allow_unk=allow_unk, dangling=dangling)
        batch_size = batch_size or default_batch_size(self.device)
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        out: list[str] = []
        generator = options.generator(self.device)
        with self.model.derived_weights():
            for i in range(0, len(items), batch_size):
                texts, _ = generate(self.model, self.vocab, self.preprocess(items[i:i + batch_size]), options,
                                    generator=generator)
                out.extend(texts)
        return out[0] if single else out

    @torch.inference_mode()
    def caption_with_attention(self, image: ImageLike, *, beam: int = 3, max_length: int | None = None,
                               block_ngrams: int | None = None, allow_unk: bool = False,
                               dangling: Sequence[str] | None = None) -> dict:
        """``caption``, ``words``, ``attention`` (one weight map per word and the <end>: (T, g, g)
        for a square g x g grid, else (T, P)) and ``image`` (the uint8 (3, S, S) the model saw)."""
        options = self.decode_options(beam=beam, max_length=max_length, block_ngrams=block_ngrams,
                                      allow_unk=allow_unk, dangling=dangling)
        pixels = self.preprocess([image])
        texts, result = generate(self.model, self.vocab, pixels, options, return_alphas=True)
        words = [self.vocab.itos[t] for t in result.tokens[0]]
        alphas = result.alphas[0, : len(words) + 1].float().cpu().numpy()
        g = int(round(alphas.shape[-1] ** 0.5))
        if g * g == alphas.shape[-1]:
            alphas = alphas.reshape(len(alphas), g, g)
        return {"caption": texts[0], "words": words, "attention": alphas, "image": pixels[0].cpu().numpy()}
