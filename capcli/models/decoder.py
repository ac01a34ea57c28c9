"""Show-Attend-Tell LSTM decoder: soft attention, a sigmoid gate on the context, h/c initialised
from the mean region feature, dropout before the vocabulary projection.

Teacher forcing (ratio 1) runs the LSTM step by step and the vocabulary projection over all steps
at once; a ratio below 1 (free-running or scheduled sampling) feeds back the model's own argmax with
probability 1 - ratio, which needs the projection at every step.

Training runs the recurrence in :class:`_Recurrence`, a fused forward with a hand-written backward;
:meth:`Decoder.step` (one step through the modules) serves beam search and is the reference the
fused code must agree with.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from capcli.models.attention import SoftAttention


class Decoder(nn.Module):
    def __init__(self, vocab_size: int, enc_dim: int, emb_dim: int = 512, att_dim: int = 512,
                 dec_dim: int = 512, dropout: float = 0.5):
        super().__init__()
        self.vocab_size = vocab_size
        self.enc_dim, self.dec_dim = enc_dim, dec_dim
        self.attention = SoftAttention(enc_dim, dec_dim, att_dim)
        self.embedding = nn.Embedding(vocab_size, emb_dim)
        self.lstm = nn.LSTMCell(emb_dim + enc_dim, dec_dim)
        self.init_h = nn.Linear(enc_dim, dec_dim)
        self.init_c = nn.Linear(enc_dim, dec_dim)
        self.f_beta = nn.Linear(dec_dim, enc_dim)  # gate on the attended context
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dec_dim, vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    def init_state(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = feats.mean(dim=1)
        return self.init_h(mean), self.init_c(mean)

    def step(self, tokens: torch.Tensor, feats: torch.Tensor, enc_proj: torch.Tensor,
             h: torch.Tensor, c: torch.Tensor):
        """One LSTM step: (h, c, alpha) after reading ``tokens`` (B,)."""
        context, alpha = self.attention(feats, enc_proj, h)
        context = torch.sigmoid(self.f_beta(h)) * context
        h, c = self.lstm(torch.cat([self.embedding(tokens), context], dim=1), (h, c))
        return h, c, alpha

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(h))

    def _teacher_forced_no_grad(self, feats, enc_proj, h, c, captions, active):
        """The teacher-forced recurrence without gradients: hidden states (N, T, H) and attention
        (N, T, P), as ``_Recurrence`` gives them (rows sorted longest first when ``active``;
        the steps after a caption's end hold zeros)."""
        n, steps = captions.size(0), captions.size(1) - 1
        run = active if active is not None else [n] * steps
        step = self.stepper(n, steps)
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

    def stepper(self, rows: int = 0, steps: int = 0) -> "InferenceStep":
        """A faster :meth:`step` for decoding without gradients (beam search, sampling) over
        ``rows`` sequences for up to ``steps`` steps; see :class:`InferenceStep`. The word-gate
        table is used when it is held (:meth:`frozen_weights`) or pays for itself in this call."""
        held = getattr(self, "_gate_table", None) is not None
        return InferenceStep(self, held or rows * steps >= self.vocab_size)

    def gate_table(self) -> torch.Tensor:
        """(V, 4H): every word's embedding through the LSTM input weights, so that a decoding step
        reads a row instead of multiplying (B, E) by (E, 4H). Held inside :meth:`frozen_weights`."""
        held = getattr(self, "_gate_table", None)
        if held is not None:
            return held
        emb = self.embedding.embedding_dim
        with torch.no_grad():
            return self.embedding.weight @ self.lstm.weight_ih[:, :emb].t()

    @contextlib.contextmanager
    def frozen_weights(self):
        """Promise that the weights do not change inside the block (an evaluation, a captioning
        run), so that what is derived from them is computed once for all its batches. (Weight
        version counters cannot tell: fused optimizers update in place without bumping them.)"""
        self._gate_table = None
        self._gate_table = self.gate_table()
        try:
            yield self
        finally:
            self._gate_table = None

    def forward(self, feats: torch.Tensor, captions: torch.Tensor, tf_ratio: float = 1.0,
                enc_proj: torch.Tensor | None = None, lengths: torch.Tensor | None = None):
        """Scores for captions[:, 1:] given captions[:, :-1].

        Args:
            feats: (N, P, enc_dim) region features, one row per caption.
            captions: (N, T+1) token ids, <start> first, padded.
            tf_ratio: probability of feeding the ground-truth token (1 = teacher forcing).
            enc_proj: ``attention.project(feats)`` if already computed.
            lengths: (N,) caption lengths counting <start> and <end>, when known: each caption
                then runs only its own ``length - 1`` steps (captions sorted longest first, the
                batch shrinking as they end, as packed sequences do). The steps after a
                caption's end then hold finite placeholders (attention zeros), which the loss
                masks.
        Returns:
            logits (N, T, V) and attention weights (N, T, P).
        """
        if enc_proj is None:
            enc_proj = self.attention.project(feats)
        active = restore = None
        steps_max = captions.size(1) - 1
        if lengths is not None:
            steps = (lengths.reshape(-1) - 1).clamp(1, steps_max)
            # active[t]: captions still running at step t, a prefix of them once sorted longest first
            active = (steps.numel() - torch.bincount(steps, minlength=steps_max + 1)[:steps_max].cumsum(0)).tolist()
            if active[-1] == steps.numel():  # every caption runs every step
                active = None
            else:
                order = torch.argsort(steps, descending=True, stable=True)
                if not bool((order[1:] > order[:-1]).all()):  # not already sorted
                    restore = torch.argsort(order)
                    feats = _PermuteRows.apply(feats, order, restore)
                    enc_proj = _PermuteRows.apply(enc_proj, order, restore)
                    captions = captions[order]
        h, c = self.init_state(feats)
        teacher = tf_ratio >= 1.0
        if (teacher and not torch.is_grad_enabled() and feats.device.type == "cpu"
                and _active_autocast_dtype("cpu") is None):
            # without gradients (evaluation's loss and top-5): InferenceStep's row-major products,
            # whose gate nonlinearities read contiguous memory (the recurrence's transposed ones
            # read it strided)
            out, alphas = self._teacher_forced_no_grad(feats, enc_proj, h, c, captions, active)
        else:
            # A Linear's output has the dtype matmuls run in (autocast's when it is on, else the
            # parameters'): the recurrence runs with autocast off and every operand cast to it.
            dtype = h.dtype
            att, lstm = self.attention, self.lstm
            # the attention query, the context gate and the hidden-to-gates product all read the
            # previous h: one GEMM per step; both LSTM biases ride along with the last
            w_h = torch.cat([att.dec_att.weight, self.f_beta.weight, lstm.weight_hh])
            b_h = torch.cat([att.dec_att.bias, self.f_beta.bias, lstm.bias_ih + lstm.bias_hh])
            fc_w, fc_b = (None, None) if teacher else (self.fc.weight.to(dtype), self.fc.bias.to(dtype))
            out, alphas = _Recurrence.apply(
                feats.to(dtype), enc_proj.to(dtype), h, c.to(dtype), w_h.to(dtype), b_h.to(dtype),
                lstm.weight_ih.to(dtype), att.full_att.weight.view(-1).to(dtype), att.full_att.bias.to(dtype),
                self.embedding.weight.to(dtype), fc_w, fc_b, captions, float(tf_ratio),
                self.dropout.p if self.dropout.training else 0.0, feats.dtype, active)
        if teacher:  # one projection over all steps (that ran)
            if active is None:
                out = self.logits(out)
            else:  # the placeholders stay zeros
                n, steps, hid = out.shape
                rows = _slots_that_ran(active, n, out.device).t().reshape(-1).nonzero().squeeze(1)
                packed = self.logits(out.reshape(n * steps, hid).index_select(0, rows))
                out = packed.new_zeros(n * steps, packed.size(1)).index_copy(0, rows, packed).view(n, steps, -1)
        if restore is not None:
            out, alphas = _PermuteRows.apply(out, restore, order), _PermuteRows.apply(alphas, restore, order)
        return out, alphas


class InferenceStep:
    """:meth:`Decoder.step` without gradients, fused: the three products of the previous h (the
    attention query, the context gate, the hidden-to-gates term) are one matrix product; the
    embedding half of the LSTM input comes from :meth:`Decoder.gate_table` (a row read) when
    ``use_table``, else one product; the relu over the attention MLP is in place. Same results as
    :meth:`Decoder.step` up to float rounding (tested).

    Rows may share an image (the beams of a beam search): ``feats`` and ``enc_proj`` then hold one
    row per image and ``h``, ``c``, ``tokens`` ``k`` consecutive rows per image (``grouped``), so
    the image's features are neither copied per beam nor read once per beam. On a CPU the
    attention MLP (``k * P * A`` values an image, 20 MB a step for 40 images at beam 5) is formed
    a few images at a time in one reused buffer that stays in the core's cache, instead of three
    passes over main memory."""

    grouped = True  # accepts one feats/enc_proj row per image for k rows of h (beam search)
    CPU_BLOCK_BYTES = 1 << 20  # the attention MLP's working block on a CPU (a fraction of L2)

    def __init__(self, decoder: Decoder, use_table: bool = True):
        att, lstm = decoder.attention, decoder.lstm
        emb = decoder.embedding.embedding_dim
        self.decoder = decoder
        self.att_dim, self.enc_dim, self.gates = att.dec_att.out_features, decoder.enc_dim, 4 * decoder.dec_dim
        # under autocast the products run in its dtype: cast the weights once, not at every step
        low = _active_autocast_dtype(lstm.weight_ih.device.type)
        cast = (lambda w: w.to(low)) if low is not None else (lambda w: w)
        with torch.no_grad():
            self.w_h = cast(torch.cat([att.dec_att.weight, decoder.f_beta.weight, lstm.weight_hh]))
            self.b_h = torch.cat([att.dec_att.bias, decoder.f_beta.bias, lstm.bias_ih + lstm.bias_hh])
            self.w_emb, self.w_ctx = cast(lstm.weight_ih[:, :emb]), cast(lstm.weight_ih[:, emb:])
        self.w_full, self.b_full = att.full_att.weight.view(-1), att.full_att.bias
        self.table = decoder.gate_table() if use_table else None

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


def _active_autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs products in on this device type now, or None when it is off."""
    try:
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (AttributeError, TypeError, RuntimeError):  # torch < 2.4: no per-device queries
        pass
    return None


def _autocast_off(device_type: str):
    """Autocast disabled where the device has autocast (the meta device, used to build models
    without memory, has none)."""
    available = getattr(torch.amp, "is_autocast_available", lambda d: d in ("cpu", "cuda"))
    return torch.autocast(device_type, enabled=False) if available(device_type) else contextlib.nullcontext()


def _slots_that_ran(active: list[int], rows: int, device) -> torch.Tensor:
    """(T, rows) bool, time-major: row n ran step t (n < active[t], rows sorted longest first)."""
    return torch.arange(rows, device=device) < torch.tensor(active, device=device).unsqueeze(1)


class _PermuteRows(torch.autograd.Function):
    """``x[order]`` for a permutation ``order`` whose inverse is ``inverse``: the gradient is
    ``grad[inverse]``, a gather, where indexing's generic backward scatters with accumulation
    (several times slower on a CPU)."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.inverse = inverse
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        return grad.index_select(0, ctx.inverse), None, None


class _Recurrence(torch.autograd.Function):
    """All steps of :meth:`Decoder.step` (plus, below ratio 1, the per-step logits and the token fed
    back) with a hand-written backward through time.

    Why by hand: under autograd every step's matmuls compute and accumulate their own full-size
    weight gradients (the LSTM and attention weights, ~13 MB a step at the default sizes), which
    dominated the training step on a CPU. Here the backward loop only carries the activation
    gradients and each weight gradient is one GEMM over all steps at the end. With teacher forcing
    the embedding half of the LSTM input projection is also one GEMM over all steps.

    Buffers are time-major (T, N, ...) so a step reads and writes contiguous slices.
    Inputs are in the compute dtype already (see Decoder.forward); the softmax runs in at least
    float32 and the alphas are returned in ``alpha_dtype`` (the features' dtype), as
    :class:`SoftAttention` does.
    Returns (N, T, H) hidden states with teacher forcing (``fc_w`` None), else (N, T, V) logits;
    and (N, T, P) attention weights.
    """

    @staticmethod
    def forward(ctx, feats, enc_proj, h0, c0, w_h, b_h, w_x, w_full, b_full, emb_w, fc_w, fc_b,
                captions, tf_ratio, p_drop, alpha_dtype, active=None):
        with _autocast_off(feats.device.type):
            n, regions, enc_dim = feats.shape
            att_dim, hid, emb_dim = enc_proj.size(2), h0.size(1), emb_w.size(1)
            steps = captions.size(1) - 1
            dtype = h0.dtype
            teacher = fc_w is None
            # active[t]: the rows (a prefix: sorted longest first) still running at step t. The
            # other rows' slots stay zero: the outputs there are placeholders, and the zeros keep
            # the gradient GEMMs over all slots (below) exact.
            shrink = active is not None
            run = active if shrink else [n] * steps
            new = h0.new_zeros if shrink else h0.new_empty
            hs = new(steps + 1, n, hid)
            cs = h0.new_empty(steps + 1, n, hid)
            hs[0], cs[0] = h0, c0
            acts = h0.new_empty(steps, n, 4 * hid)  # i, f, g, o after their nonlinearities
            # dec_att(h): backward rebuilds relu(enc_proj + query) from it rather than keep that
            # (N, P, A) tensor per step: written into a slice of a big buffer it misses the cache
            # where a recycled temporary hits it (measured 4x slower for that add and relu)
            queries = new(steps, n, att_dim)
            gate = h0.new_empty(steps, n, enc_dim)
            context = new(steps, n, enc_dim)
            x = new(steps, n, emb_dim + enc_dim)  # LSTM input: [embedding, gated context]
            alphas = (h0.new_zeros if shrink else h0.new_empty)(
                steps, n, regions, dtype=torch.promote_types(dtype, torch.float32))
            w_ctx = w_x[:, emb_dim:]
            b_h = b_h.unsqueeze(1)
            masks = logits = None
            if teacher:
                tokens = captions[:, :-1].t()
                x[:, :, :emb_dim] = emb_w[tokens]
                # (4H, columns) in the transposed layout of the step's gates (below): step t's rows
                # are the columns first[t] .. first[t] + run[t]; only the steps that run are formed
                if shrink:
                    first = [0, *itertools.accumulate(run)]
                    emb_in = x[:, :, :emb_dim][_slots_that_ran(run, n, x.device)]  # (sum(run), E), t-major
                else:
                    first = [t * n for t in range(steps)]
                    emb_in = x[:, :, :emb_dim].reshape(steps * n, emb_dim)
                x_gates = torch.mm(w_x[:, :emb_dim], emb_in.t())
            else:
                tokens = captions.new_zeros(steps, n)
                tokens[0] = captions[:, 0]
                logits = new(steps, n, fc_w.size(0))
                if p_drop > 0:
                    masks = new(steps, n, hid)
            # Products are formed transposed, W @ x^T, and read back through transposed views: with a
            # few rows of x, CPU BLAS runs x @ W^T about twice as slow (the weight is read against
            # its layout).
            for t in range(steps):
                r = run[t]  # rows [:r] run this step
                if r == 0:  # every caption has ended: the rest stays placeholders
                    break
                z = torch.addmm(b_h, w_h, hs[t, :r].t())  # (A + E + 4H, r)
                query, gate_in, z_gates = z.split([att_dim, enc_dim, 4 * hid])
                queries[t, :r] = query.t()  # contiguous: the broadcast add below is ~3x slower on a view
                pre = torch.relu_(enc_proj[:r] + queries[t, :r].unsqueeze(1))
                scores = torch.addmv(b_full, pre.view(r * regions, att_dim), w_full).view(r, regions)
                alpha = torch.softmax(scores, dim=1, dtype=alphas.dtype)
                alphas[t, :r] = alpha
                context[t, :r] = torch.bmm(alpha.to(dtype).unsqueeze(1), feats[:r]).squeeze(1)
                torch.sigmoid(gate_in.t(), out=gate[t, :r])
                torch.mul(gate[t, :r], context[t, :r], out=x[t, :r, emb_dim:])
                if teacher:
                    z_gates = z_gates + x_gates[:, first[t]:first[t] + r]
                    gates = torch.addmm(z_gates, w_ctx, x[t, :r, emb_dim:].t()).t()
                else:
                    x[t, :r, :emb_dim] = emb_w[tokens[t, :r]]
                    gates = torch.addmm(z_gates, w_x, x[t, :r].t()).t()
                act = acts[t, :r]
                torch.sigmoid(gates, out=act)  # one call for all four; g's quarter is redone as tanh
                torch.tanh(gates[:, 2 * hid:3 * hid], out=act[:, 2 * hid:3 * hid])
                i, f, g, o = act.chunk(4, dim=1)
                torch.addcmul(f * cs[t, :r], i, g, out=cs[t + 1, :r])
                torch.mul(o, torch.tanh(cs[t + 1, :r]), out=hs[t + 1, :r])
                if teacher:
                    continue
                h_out = hs[t + 1, :r]
                if masks is not None:
                    # the same draws as nn.Dropout on h (they depend on the shape only), kept as a mask
                    masks[t, :r] = F.dropout(torch.ones_like(h_out), p_drop)
                    h_out = h_out * masks[t, :r]
                logits[t, :r] = torch.addmm(fc_b.unsqueeze(1), fc_w, h_out.t()).t()
                predicted = logits[t, :r].argmax(dim=-1)
                if tf_ratio <= 0.0:
                    token = predicted
                else:  # drawn at every step, the last included, as the step-by-step loop always did
                    use_truth = torch.rand(r, device=captions.device) < tf_ratio
                    token = torch.where(use_truth, captions[:r, t + 1], predicted)
                if t + 1 < steps:
                    tokens[t + 1, :r] = token
        ctx.active = active
        ctx.save_for_backward(feats, enc_proj, w_h, w_x, w_full, emb_w, fc_w, hs, cs, acts, queries,
                              gate, context, x, alphas, tokens, masks)
        out = hs[1:] if teacher else logits
        return (out.transpose(0, 1).contiguous(),
                alphas.transpose(0, 1).to(alpha_dtype, memory_format=torch.contiguous_format, copy=True))

    @staticmethod
    def backward(ctx, grad_out, grad_alphas):
        (feats, enc_proj, w_h, w_x, w_full, emb_w, fc_w, hs, cs, acts, queries, gate, context, x,
         alphas, tokens, masks) = ctx.saved_tensors
        need = ctx.needs_input_grad
        with _autocast_off(feats.device.type):
            steps, n, hid = acts.size(0), acts.size(1), hs.size(2)
            regions, enc_dim, att_dim, emb_dim = feats.size(1), feats.size(2), queries.size(2), emb_w.size(1)
            dtype = hs.dtype
            rows = steps * n
            shrink = ctx.active is not None
            run = ctx.active if shrink else [n] * steps
            new = hs.new_zeros if shrink else hs.new_empty
            grad_fc_w = grad_fc_b = None
            if fc_w is None:
                dh_out = grad_out.transpose(0, 1).to(dtype)
            else:
                d_logits = grad_out.transpose(0, 1).to(dtype).reshape(rows, -1)
                h_fc = hs[1:] if masks is None else hs[1:] * masks
                grad_fc_w = d_logits.t() @ h_fc.reshape(rows, hid)
                grad_fc_b = d_logits.sum(0)
                dh_out = (d_logits @ fc_w).view(steps, n, hid)
                if masks is not None:
                    dh_out = dh_out * masks
            d_alpha_out = grad_alphas.transpose(0, 1).to(alphas.dtype)
            # gradients of z = [query, gate_in, gates] per step; weight gradients come from it at the end
            dz = new(steps, n, att_dim + enc_dim + 4 * hid)
            d_query, d_gate_in, d_gates = dz.split([att_dim, enc_dim, 4 * hid], dim=2)
            d_context = new(steps, n, enc_dim) if need[0] else None
            # With r_t = relu'(enc_proj + query_t) (a 0/1 mask) and s_t = d_scores_t:
            #   d query_t = w_full * sum_p s_t r_t            (m_t below, times w_full)
            #   d enc_proj = w_full * sum_t s_t r_t          (acc below, times w_full at the end)
            #   d w_full = sum_{t,n,p} s_t r_t (enc_proj + query_t), which regroups into the sums
            #     of enc_proj * acc and query_t * m_t: no per-step pass over the relu output for it
            d_scores = new(steps, n, regions)
            m = new(steps, n, att_dim)
            acc = torch.zeros_like(enc_proj)
            work = torch.empty_like(enc_proj)
            w_ctx = w_x[:, emb_dim:].contiguous()  # read at every step below: strided, ~1.6x slower
            # the rows that have not started (backwards) keep zero gradients
            dh = torch.zeros_like(hs[0])
            dc = torch.zeros_like(cs[0])
            for t in reversed(range(steps)):
                r = run[t]
                if r == 0:
                    continue
                dh_t = dh[:r] + dh_out[t, :r]
                i, f, g, o = acts[t, :r].chunk(4, dim=1)
                tanh_c = torch.tanh(cs[t + 1, :r])
                dc_t = dc[:r] + dh_t * o * (1 - tanh_c * tanh_c)
                di, df, dg, do = d_gates[t, :r].chunk(4, dim=1)
                torch.mul(dc_t * g, i * (1 - i), out=di)
                torch.mul(dc_t * cs[t, :r], f * (1 - f), out=df)
                torch.mul(dc_t * i, 1 - g * g, out=dg)
                torch.mul(dh_t * tanh_c, o * (1 - o), out=do)
                torch.mul(dc_t, f, out=dc[:r])
                d_x_ctx = d_gates[t, :r] @ w_ctx  # gradient of the gated context
                gate_t = gate[t, :r]
                d_ctx = d_x_ctx * gate_t
                if d_context is not None:
                    d_context[t, :r] = d_ctx
                torch.mul(d_x_ctx * context[t, :r], gate_t * (1 - gate_t), out=d_gate_in[t, :r])
                alpha = alphas[t, :r]
                # as a row times feats^T: bmm runs this form ~3x faster than feats times a column
                d_alpha = torch.bmm(d_ctx.unsqueeze(1), feats[:r].transpose(1, 2)).squeeze(1).to(alpha.dtype)
                d_alpha += d_alpha_out[t, :r]
                d_scores[t, :r] = alpha * (d_alpha - (alpha * d_alpha).sum(1, keepdim=True))
                # 0/1 in the float dtype (bmm needs one); in place, gt_ is far faster than a bool compare
                relu_grad = torch.add(enc_proj[:r], queries[t, :r].unsqueeze(1), out=work[:r]).gt_(0)
                torch.bmm(d_scores[t, :r].unsqueeze(1), relu_grad, out=m[t, :r].unsqueeze(1))
                torch.mul(m[t, :r], w_full, out=d_query[t, :r])
                acc[:r].addcmul_(relu_grad, d_scores[t, :r].unsqueeze(2))
                torch.mm(dz[t, :r], w_h, out=dh[:r])
            d_w_full = (enc_proj * acc).sum((0, 1)) + (queries * m).sum((0, 1))
            d_b_full = d_scores.sum().view(1)
            d_enc = acc.mul_(w_full) if need[1] else None
            # the weight gradients: one GEMM each over every (step, row) slot, or over the slots
            # that ran when the shrinking left many empty
            dz_rows, h_rows, x_rows = dz.view(rows, -1), hs[:-1].reshape(rows, hid), x.view(rows, -1)
            tok_rows = tokens.reshape(-1)
            if shrink and sum(run) < 0.9 * rows:
                keep = _slots_that_ran(run, n, dz.device).view(-1).nonzero().squeeze(1)
                dz_rows, h_rows, x_rows, tok_rows = dz_rows[keep], h_rows[keep], x_rows[keep], tok_rows[keep]
            d_w_h = dz_rows.t() @ h_rows
            d_b_h = dz_rows.sum(0)
            d_gates_rows = dz_rows[:, att_dim + enc_dim:]
            d_w_x = d_gates_rows.t() @ x_rows
            d_emb = None
            if need[9]:
                d_emb = torch.zeros_like(emb_w).index_add_(0, tok_rows, d_gates_rows @ w_x[:, :emb_dim])
            d_feats = None
            if d_context is not None:  # context_t = alpha_t @ feats: all steps in one bmm
                d_feats = torch.bmm(alphas.to(dtype).permute(1, 2, 0), d_context.transpose(0, 1))
        return (d_feats, d_enc, dh, dc, d_w_h, d_b_h, d_w_x, d_w_full, d_b_full, d_emb, grad_fc_w,
                grad_fc_b, None, None, None, None, None)


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, alphas: torch.Tensor,
                 lengths: torch.Tensor, alpha_c: float = 1.0, pad: int = 0):
    """Masked cross-entropy over real steps + doubly stochastic attention regularisation.

    Args:
        logits: (N, T, V); targets: (N, T) = captions[:, 1:]; alphas: (N, T, P);
        lengths: (N,) caption lengths including <start> and <end> (so T_real = lengths - 1).
    Returns:
        (total loss, cross-entropy, mask) where mask (N, T) marks the real steps.
    """
    steps = targets.size(1)
    mask = torch.arange(steps, device=targets.device).unsqueeze(0) < (lengths - 1).unsqueeze(1)
    # padding steps are ignored rather than cut out: no boolean indexing (a copy of the logits on the
    # CPU, a host sync on a GPU); the mean over the kept steps is the same
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.masked_fill(~mask, -100).flatten(),
                         ignore_index=-100)
    loss = ce
    if alpha_c:
        attended = (alphas.float() * mask.unsqueeze(2)).sum(dim=1)  # (N, P): total attention per region
        loss = loss + alpha_c * ((1.0 - attended) ** 2).mean()
    return loss, ce, mask
