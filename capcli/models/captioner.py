"""The captioner: an encoder (a timm backbone pooled to regions) and the attention LSTM decoder,
built from the ``model`` section of a config. Saved and loaded as state dicts, never as pickled
modules."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from capcli.config import ModelConfig
from capcli.models.decoder import Decoder
from capcli.models.encoder import Encoder


class CaptionModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, pretrained: bool | str | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.encoder, cfg.pretrained if pretrained is None else pretrained,
                               grid=cfg.grid, finetune=cfg.finetune,
                               finetune_stages=cfg.finetune_stages, image_size=cfg.image_size,
                               feature_norm=cfg.feature_norm, channels_last=cfg.channels_last)
        self.decoder = Decoder(vocab_size, self.encoder.out_dim, cfg.emb_dim, cfg.att_dim,
                               cfg.dec_dim, cfg.dropout)

    @contextlib.contextmanager
    def derived_weights(self):
        """A block in which no weight changes (an evaluation, a captioning run): what the fast
        paths derive from the weights (the decoder's word-gate table, the encoder's
        BatchNorm-folded copy) is made once for all its batches."""
        with self.encoder.derived_weights(), self.decoder.derived_weights():
            yield self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def features(self, images: torch.Tensor | None = None, regions: torch.Tensor | None = None) -> torch.Tensor:
        """Region features (B, P, C) the decoder attends to: from images (B, 3, S, S), or from
        ``regions`` (B, P, C), a frozen encoder's cached backbone output (the feature norm, which
        learns with the decoder, is applied here)."""
        if regions is not None:
            return self.encoder.feature_norm(regions.float())
        return self.encode(images)

    def forward(self, images: torch.Tensor | None, captions: torch.Tensor, tf_ratio: float = 1.0,
                regions: torch.Tensor | None = None):
        """images (B, 3, S, S) with captions (B, K, T+1): each image is encoded once, its features
        shared by its K captions. Returns logits (B*K, T, V) and alphas (B*K, T, P).

        ``regions`` (B, P, C): cached backbone features of a frozen encoder, used instead of images.
        """
        return self.decode_captions(self.features(images, regions), captions, tf_ratio)

    def decode_captions(self, feats: torch.Tensor, captions: torch.Tensor, tf_ratio: float = 1.0,
                        lengths: torch.Tensor | None = None):
        """Logits (B*K, T, V) and alphas (B*K, T, P) for captions (B, K, T+1) of B images.
        ``lengths`` (B, K), counting <start> and <end>: each caption runs only its own steps (see
        :meth:`Decoder.forward`)."""
        b, k, length = captions.shape
        proj = self.decoder.attention.project(feats)
        feats = feats.repeat_interleave(k, dim=0)
        proj = proj.repeat_interleave(k, dim=0)
        return self.decoder(feats, captions.reshape(b * k, length), tf_ratio, enc_proj=proj,
                            lengths=None if lengths is None else lengths.reshape(-1))

    def trainable_groups(self, lr: float, encoder_lr: float) -> list[dict]:
        # the feature norm sits between the two and learns with the decoder, even when frozen
        head = list(self.decoder.parameters()) + list(self.encoder.feature_norm.parameters())
        groups = [{"params": head, "lr": lr, "name": "decoder"}]
        enc = [p for p in self.encoder.backbone.parameters() if p.requires_grad]
        if enc:
            groups.append({"params": enc, "lr": encoder_lr, "name": "encoder"})
        return groups
