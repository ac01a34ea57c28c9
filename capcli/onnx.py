"""Exporting ONNX model folders: the captioner as three ONNX graphs, which the onnxruntime backend
(:mod:`capcli.store.onnx`) runs under capcli's own decoding (beam search, sampling, n-gram
blocking: one algorithm, two backends).

``capcli export RUN DIR --format onnx`` writes, beside the model folder's safetensors files:

- ``encoder.onnx``: ``images`` uint8 (B, 3, S, S) RGB, already resized to S x S as the folder's
  ``preprocessing`` says -> ``features`` float32 (B, P, C), the regions the decoder attends over
  (scaling to [0, 1], the backbone's mean/std, the backbone, the grid pooling and the feature norm
  are inside);
- ``decoder_init.onnx``: ``features`` (B, P, C) -> ``h``, ``c`` (B, H), the LSTM's first state, and
  ``proj`` (B, P, A), the regions' attention projection (computed once per image);
- ``decoder_step.onnx``: ``tokens`` int64 (N,), ``h``, ``c`` (N, H), ``features`` (B, P, C),
  ``proj`` (B, P, A) -> ``logp`` (N, V) word log-probabilities, the new ``h``, ``c`` and ``alpha``
  (N, P), the attention weights. N is a multiple of B: rows i*k .. i*k+k-1 belong to image i (the
  k beams of a beam search share their image's features; k = 1 for one caption per image).

Their names, shapes, opset and an export id (stamped in each graph's metadata, so files from two
exports are never mixed) are in config.json under ``onnx``; ``--quantize int8`` adds dynamically
quantised int8 copies (``*.int8.onnx``) of the decoder graphs. The encoder stays float32: its
convolutions, dynamically quantised, ran several times slower (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from capcli.errors import UserError
from capcli.store.onnx import FILES, ID_KEY, INT8_FILES, MIN_OPSET, graph_opset, require

OPSET = 20  # 17 or newer is required; 20 has Gelu as one op, which ConvNeXt's encoder needs to run fast (docs/performance.md)


# --- the graphs: the model's computation written for export (no fast paths, one step a call) ---


class EncoderGraph(nn.Module):
    """uint8 images (B, 3, S, S) -> region features (B, P, C): ``Encoder.forward`` without its
    fast paths (onnxruntime folds BatchNorm and fuses the rest itself)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        x = images.float() / 255.0
        if enc.image_size and x.shape[-1] != enc.image_size:
            x = F.interpolate(x, size=(enc.image_size, enc.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        x = (x - enc.mean) / enc.std
        return enc.feature_norm(enc._pooled(enc.backbone.forward_features(x)))


class DecoderInitGraph(nn.Module):
    """features (B, P, C) -> h, c (B, H) and the attention projection (B, P, A)."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, features: torch.Tensor):
        h, c = self.decoder.init_state(features)
        return h, c, self.decoder.attention.project(features)


class DecoderStepGraph(nn.Module):
    """One step of ``Decoder.step`` then ``Decoder.logits`` as log-probabilities, with k = N / B
    rows of h per image (beams share their image's features and projection).

    Written as the fused inference step computes it (:mod:`capcli.models.fast.inference`): the
    three products of h (attention query, context gate, LSTM hidden-to-gates) are one product;
    the word's part of the LSTM input is a row of a (V, 4H) table (its embedding through the
    LSTM's input weights) where that table is small (:data:`TABLE_BYTES`), else its own product."""

    TABLE_BYTES = 32 << 20  # a larger table (a big vocabulary) would outweigh the product it saves

    def __init__(self, decoder):
        super().__init__()
        d = decoder
        emb = d.embedding.embedding_dim
        att, lstm = d.attention, d.lstm
        self.att_dim, self.enc_dim, self.gates = att.dec_att.out_features, d.enc_dim, 4 * d.dec_dim
        with torch.no_grad():
            self.register_buffer("w_h", torch.cat([att.dec_att.weight, d.f_beta.weight, lstm.weight_hh]).t().contiguous())
            self.register_buffer("b_h", torch.cat([att.dec_att.bias, d.f_beta.bias, lstm.bias_ih + lstm.bias_hh]))
            self.use_table = d.vocab_size * self.gates * 4 <= self.TABLE_BYTES
            if self.use_table:
                self.register_buffer("table", d.embedding.weight @ lstm.weight_ih[:, :emb].t())
            else:
                self.embedding = d.embedding
                self.register_buffer("w_emb", lstm.weight_ih[:, :emb].t().contiguous())
            self.register_buffer("w_ctx", lstm.weight_ih[:, emb:].t().contiguous())
            self.register_buffer("w_full", att.full_att.weight.t().contiguous())  # (A, 1)
            self.register_buffer("b_full", att.full_att.bias.clone())
        self.fc = d.fc

    def forward(self, tokens, h, c, features, proj):
        images, regions, att = proj.shape
        z = h @ self.w_h + self.b_h
        query, gate_in, z_gates = z.split([self.att_dim, self.enc_dim, self.gates], dim=1)
        pre = torch.relu(proj.unsqueeze(1) + query.view(images, -1, 1, att))  # (B, k, P, A)
        scores = (pre @ self.w_full).view(-1, regions) + self.b_full  # (N, P)
        alpha = torch.softmax(scores, dim=1)
        context = torch.bmm(alpha.view(images, -1, regions), features).view(h.shape[0], -1)
        context = torch.sigmoid(gate_in) * context
        words = self.table[tokens] if self.use_table else self.embedding(tokens) @ self.w_emb
        gates = z_gates + words + context @ self.w_ctx
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return torch.log_softmax(self.fc(h), dim=1), h, c, alpha


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            dynamic: tuple, opset: int) -> None:
    import warnings

    # the exporter's own notes (deprecations, shape renames) are not the user's business
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=inputs,
                                    output_names=outputs, dynamic_shapes=dynamic, optimize=True,
                                    verbose=False)
        program.save(str(path))


def _stamp(path: Path, export_id: str, opset: int) -> None:
    """Check the graph (onnx.checker), its opset, and write the export id into its metadata."""
    onnx = require("onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    got = graph_opset(model)
    if got < opset:
        raise UserError(f"{path.name} was written at opset {got}, not {opset}; upgrade torch and onnxscript")
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = ID_KEY, export_id
    onnx.save(model, str(path))


def _io(session) -> dict:
    def spec(args):
        return [{"name": a.name, "dtype": a.type.replace("tensor(", "").rstrip(")").replace("float", "float32")
                 .replace("float3264", "float64"), "shape": [d if isinstance(d, int) else str(d) for d in a.shape]}
                for a in args]
    return {"inputs": spec(session.get_inputs()), "outputs": spec(session.get_outputs())}


def export_graphs(model, image_size: int, folder: Path, *, quantize: str | None = None, opset: int = OPSET,
                  progress: Callable[[str], None] | None = None) -> dict:
    """Write the three graphs of ``model`` (a CaptionModel, eval mode, on the CPU) into ``folder``
    and return config.json's ``onnx`` section. ``quantize="int8"`` adds int8 decoder graphs."""
    if opset < MIN_OPSET:
        raise UserError(f"opset {opset}: capcli exports at opset {MIN_OPSET} or newer")
    require("onnx")
    require("onnxscript")
    ort = require("onnxruntime")
    progress = progress or (lambda line: None)
    model = model.float().eval()
    dec = model.decoder
    b, k = 2, 3  # example sizes: the batch and rows-per-image dims are dynamic
    batch, rows = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("rows", min=1, max=65536)
    images = torch.randint(0, 256, (b, 3, image_size, image_size), dtype=torch.uint8)
    export_id = uuid.uuid4().hex
    with torch.no_grad(), _reference_decoder(dec):
        progress("exporting encoder.onnx")
        _export(EncoderGraph(model.encoder), (images,), folder / FILES["encoder"], ["images"], ["features"],
                ({0: batch},), opset)
        feats = model.encoder.feature_norm(model.encoder._pooled(model.encoder.backbone.forward_features(
            (images.float() / 255.0 - model.encoder.mean) / model.encoder.std)))
        progress("exporting decoder_init.onnx")
        _export(DecoderInitGraph(dec), (feats,), folder / FILES["decoder_init"], ["features"], ["h", "c", "proj"],
                ({0: batch},), opset)
        h, c, proj = DecoderInitGraph(dec)(feats)
        h, c = h.repeat_interleave(k, 0), c.repeat_interleave(k, 0)
        tokens = torch.ones(b * k, dtype=torch.long)
        progress("exporting decoder_step.onnx")
        # rows = batch * k: torch.export states it as rows being a multiple of batch
        _export(DecoderStepGraph(dec), (tokens, h, c, feats, proj), folder / FILES["decoder_step"],
                ["tokens", "h", "c", "features", "proj"], ["logp", "h_next", "c_next", "alpha"],
                ({0: rows}, {0: rows}, {0: rows}, {0: batch}, {0: batch}), opset)
    graphs = {}
    for name, file in FILES.items():
        _stamp(folder / file, export_id, opset)
        session = ort.InferenceSession(str(folder / file), providers=["CPUExecutionProvider"])
        graphs[name] = {"file": file, **_io(session)}
    section = {"opset": opset, "export_id": export_id, "graphs": graphs, "int8": None,
               "rows_per_image": "decoder_step takes N = B x k rows of tokens/h/c for B images of features "
                                 "(k consecutive rows per image)"}
    if quantize:
        if quantize != "int8":
            raise UserError(f"--quantize {quantize}: only int8 is supported")
        from onnxruntime.quantization import QuantType, quantize_dynamic

        import logging

        progress("quantizing the decoder to int8")
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # its advice to pre-process first concerns static quantisation
        try:
            for name, file in INT8_FILES.items():
                quantize_dynamic(str(folder / FILES[name]), str(folder / file), weight_type=QuantType.QInt8)
                _stamp(folder / file, export_id, opset)
        finally:
            root.setLevel(level)
        section["int8"] = dict(INT8_FILES)
    return section


@contextlib.contextmanager
def _reference_decoder(decoder):
    """The decoder's reference code (no fused paths) while it is traced."""
    fused = decoder.fused
    decoder.fused = False
    try:
        yield decoder
    finally:
        decoder.fused = fused


def onnx_file_notes(section: dict) -> dict[str, str]:
    """What the model card says of each ONNX file."""
    notes = {FILES["encoder"]: "ONNX: uint8 images (B, 3, S, S) -> region features",
             FILES["decoder_init"]: "ONNX: region features -> the LSTM's first h, c and the attention projection",
             FILES["decoder_step"]: "ONNX: one decoding step: word ids, h, c, features, projection -> "
                                    "word log-probabilities, h, c, attention"}
    for name, file in (section.get("int8") or {}).items():
        notes[file] = f"ONNX: {FILES[name]} with int8 weights (dynamic quantisation)"
    return notes


def exporter(quantize: str | None = None, progress: Callable[[str], None] | None = None):
    """The ``extra`` of :func:`capcli.store.folder.export_model` that writes the ONNX graphs of the
    model being exported into its folder (and checks them) and returns config.json's ``onnx``."""
    if quantize not in (None, "int8"):
        raise UserError(f"--quantize {quantize}: only int8 is supported")
    require("onnx")
    require("onnxscript")
    require("onnxruntime")

    def write(folder: Path, state: dict) -> tuple[str, dict, dict[str, str]]:
        from capcli.config import config_from_dict
        from capcli.models.captioner import CaptionModel

        cfg = config_from_dict(state["config"])
        model = CaptionModel(cfg.model, len(state["vocab"]), pretrained=False)
        model.load_state_dict(state["model"])
        size = int(state["data"].get("image_size") or cfg.model.image_size or 224)
        section = export_graphs(model.eval(), size, folder, quantize=quantize, progress=progress)
        vocab = list(state["vocab"])
        section["special_tokens"] = {name: vocab.index(f"<{name}>") for name in ("pad", "start", "end", "unk")
                                     if f"<{name}>" in vocab}
        return "onnx", section, onnx_file_notes(section)

    return write
