"""Decoding without gradients, fused: :class:`InferenceStep` is ``Decoder.step`` for beam search
and sampling, and :func:`teacher_forced` runs it over given captions (the teacher-forced loss and
top-5 of an evaluation). Both compute what :class:`capcli.models.decoder.Decoder` defines (tested
equal to it); ``Decoder.fused = False`` turns them off.
"""

from __future__ import annotations

import torch

from capcli.runtime import active_autocast_dtype


def gate_table(decoder) -> torch.Tensor:
    """(V, 4H): every word's embedding through the LSTM's input weights, so that a decoding step
    reads a row instead of multiplying (B, E) by (E, 4H). Worth making once per evaluation or
    captioning run (``Decoder.derived_weights``), or for one decode of at least V rows x steps."""
    emb = decoder.embedding.embedding_dim
    with torch.no_grad():
        return decoder.embedding.weight @ decoder.lstm.weight_ih[:, :emb].t()


def make_step(decoder, rows: int = 0, steps: int = 0, table: torch.Tensor | None = None) -> "InferenceStep":
    """The step for a decode of ``rows`` sequences over up to ``steps`` steps: with ``table``
    (held for a whole run) when given, else with a table made now where it pays for itself."""
    if table is None and rows * steps >= decoder.vocab_size:
        table = gate_table(decoder)
    return InferenceStep(decoder, table)


class InferenceStep:
    """:meth:`Decoder.step <capcli.models.decoder.Decoder.step>` without gradients, fused: the three
    products of the previous h (the attention query, the context gate, the hidden-to-gates term)
    are one matrix product; the embedding half of the LSTM input comes from ``table``
    (:func:`gate_table`: a row read instead of a product) when given, else one product; the relu
    over the attention MLP is in place. Same results as ``Decoder.step`` up to float rounding
    (tested).

    Rows may share an image (the beams of a beam search): ``feats`` and ``enc_proj`` then hold one
    row per image and ``h``, ``c``, ``tokens`` ``k`` consecutive rows per image (``grouped``), so
    the image's features are neither copied per beam nor read once per beam. On a CPU the
    attention MLP (``k * P * A`` values an image, 20 MB a step for 40 images at beam 5) is formed
    a few images at a time in one reused buffer that stays in the core's cache, instead of three
    passes over main memory."""

    grouped = True  # accepts one feats/enc_proj row per image for k rows of h (beam search)
    CPU_BLOCK_BYTES = 1 << 20  # the attention MLP's working block on a CPU (a fraction of L2)

    def __init__(self, decoder, table: torch.Tensor | None = None):
        att, lstm = decoder.attention, decoder.lstm
        emb = decoder.embedding.embedding_dim
        self.decoder = decoder
        self.att_dim, self.enc_dim, self.gates = att.dec_att.out_features, decoder.enc_dim, 4 * decoder.dec_dim
        # under autocast the products run in its dtype: cast the weights once, not at every step
        low = active_autocast_dtype(lstm.weight_ih.device.type)
        cast = (lambda w: w.to(low)) if low is not None else (lambda w: w)
        with torch.no_grad():
            self.w_h = cast(torch.cat([att.dec_att.weight, decoder.f_beta.weight, lstm.weight_hh]))
            self.b_h = torch.cat([att.dec_att.bias, decoder.f_beta.bias, lstm.bias_ih + lstm.bias_hh])
            self.w_emb, self.w_ctx = cast(lstm.weight_ih[:, :emb]), cast(lstm.weight_ih[:, emb:])
        self.w_full, self.b_full = att.full_att.weight.view(-1), att.full_att.bias
        self.table = table

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, feats: torch.Tensor, enc_proj: torch.Tensor,
                 h: torch.Tensor, c: torch.Tensor):
        images, regions, _ = enc_proj.shape
        n = h.size(0)
        if n % images:
            raise ValueError(f"{n} rows of h do not split evenly over {images} images")
        k = n // images
        z = torch.addmm(self.b_h, h, self.w_h.t())
        query, gate_in, z_gates = z.split([self.att_dim, self.enc_dim, self.gates], dim=1)
        scores = self._scores(enc_proj, query.view(images, k, 1, self.att_dim)).view(n, regions) + self.b_full
        # softmax in at least float32 (under autocast the scores may be half precision)
        alpha = torch.softmax(scores, dim=1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(feats.dtype)
        context = torch.bmm(alpha.view(images, k, regions), feats).view(n, -1)
        context = torch.sigmoid(gate_in) * context
        if self.table is not None:
            z_gates = z_gates + self.table[tokens]
        else:
            z_gates = torch.addmm(z_gates, self.decoder.embedding(tokens), self.w_emb.t())
        gates = torch.addmm(z_gates, context.to(z_gates.dtype), self.w_ctx.t())
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c, alpha

    def _float32(self, enc_proj: torch.Tensor) -> torch.Tensor:
        """``enc_proj`` in float32, cast once per decode rather than at every step: the cast of
        the last tensor seen is held, with that tensor (so its memory cannot be reused by another
        while held); a beam search's compaction gives a new tensor, cast once more."""
        if enc_proj.dtype == torch.float32:
            return enc_proj
        held = self.__dict__.get("_proj32")
        if held is None or held[0] is not enc_proj:
            held = (enc_proj, enc_proj.float())
            self._proj32 = held
        return held[1]

    def _scores(self, enc_proj: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """(images * k * P,) attention scores before the bias: relu(enc_proj + query) . w_full,
        with enc_proj (images, P, A) and query (images, k, 1, A)."""
        images, regions, dim = enc_proj.shape
        k = query.size(1)
        dtype = torch.promote_types(enc_proj.dtype, query.dtype)
        cpu = enc_proj.device.type == "cpu"
        if cpu and dtype != torch.float64:  # the CPU's elementwise kernels run float32 faster than half precision
            dtype = torch.float32
            enc_proj, query = self._float32(enc_proj), query.float()
        w = self.w_full.to(dtype)
        per_image = k * regions * dim * dtype.itemsize
        block = max(1, self.CPU_BLOCK_BYTES // per_image)
        if not cpu or block >= images:
            pre = torch.relu_(enc_proj.unsqueeze(1) + query)
            return torch.mv(pre.view(-1, dim), w)
        buf = torch.empty(block, k, regions, dim, dtype=dtype, device=enc_proj.device)
        parts = []
        for i in range(0, images, block):
            j = min(images, i + block)
            pre = buf[: j - i]
            torch.add(enc_proj[i:j].unsqueeze(1), query[i:j], out=pre)
            parts.append(torch.mv(pre.relu_().view(-1, dim), w))
        return torch.cat(parts)


def teacher_forced(decoder, feats: torch.Tensor, enc_proj: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
                   captions: torch.Tensor, active: list[int] | None, table: torch.Tensor | None = None):
    """The teacher-forced recurrence without gradients, through :class:`InferenceStep`: hidden
    states (N, T, H) and attention (N, T, P), as the training recurrence gives them (rows sorted
    longest first when ``active`` counts the rows still running at each step; the steps after a
    caption's end hold zeros).

    On a CPU this row-major step runs faster than the training recurrence, whose transposed
    products make its gate nonlinearities read strided memory."""
    n, steps = captions.size(0), captions.size(1) - 1
    run = active if active is not None else [n] * steps
    step = make_step(decoder, n, steps, table)
    hs = h.new_zeros(n, steps, h.size(1))
    alphas = h.new_zeros(n, steps, feats.size(1), dtype=torch.promote_types(h.dtype, torch.float32))
    for t in range(steps):
        r = run[t]
        if r == 0:
            break
        h, c, alpha = step(captions[:r, t], feats[:r], enc_proj[:r], h[:r], c[:r])
        hs[:r, t] = h
        alphas[:r, t] = alpha
    return hs, alphas
