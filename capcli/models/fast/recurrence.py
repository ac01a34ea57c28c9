"""The decoder's training pass, fused: every step of ``Decoder.step`` in one autograd Function
with a hand-written backward through time (:class:`_Recurrence`), captions sorted longest first so
the batch shrinks as they end (as packed sequences do). :func:`forward` computes what
``Decoder.forward``'s reference loop computes (tested equal, values and gradients);
``Decoder.fused = False`` turns it off.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from capcli.models.fast import inference
from capcli.runtime import active_autocast_dtype, autocast_off


def forward(decoder, feats: torch.Tensor, enc_proj: torch.Tensor, captions: torch.Tensor, tf_ratio: float = 1.0,
            lengths: torch.Tensor | None = None, table: torch.Tensor | None = None):
    """``Decoder.forward``, fused: logits (N, T, V) and attention (N, T, P).

    With ``lengths`` (N,) (caption lengths counting <start> and <end>) each caption runs only its
    own ``length - 1`` steps; the steps after its end hold finite placeholders (zeros), which the
    loss masks. Without gradients on a CPU the teacher-forced pass steps through
    :func:`capcli.models.fast.inference.teacher_forced` (with the decoder's held ``table``).
    """
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
    h, c = decoder.init_state(feats)
    teacher = tf_ratio >= 1.0
    if (teacher and not torch.is_grad_enabled() and feats.device.type == "cpu"
            and active_autocast_dtype("cpu") is None):
        # without gradients (evaluation's loss and top-5): InferenceStep's row-major products,
        # whose gate nonlinearities read contiguous memory (the recurrence's transposed ones
        # read it strided)
        out, alphas = inference.teacher_forced(decoder, feats, enc_proj, h, c, captions, active, table)
    else:
        # A Linear's output has the dtype matmuls run in (autocast's when it is on, else the
        # parameters'): the recurrence runs with autocast off and every operand cast to it.
        dtype = h.dtype
        att, lstm = decoder.attention, decoder.lstm
        # the attention query, the context gate and the hidden-to-gates product all read the
        # previous h: one GEMM per step; both LSTM biases ride along with the last
        w_h = torch.cat([att.dec_att.weight, decoder.f_beta.weight, lstm.weight_hh])
        b_h = torch.cat([att.dec_att.bias, decoder.f_beta.bias, lstm.bias_ih + lstm.bias_hh])
        fc_w, fc_b = (None, None) if teacher else (decoder.fc.weight.to(dtype), decoder.fc.bias.to(dtype))
        out, alphas = _Recurrence.apply(
            feats.to(dtype), enc_proj.to(dtype), h, c.to(dtype), w_h.to(dtype), b_h.to(dtype),
            lstm.weight_ih.to(dtype), att.full_att.weight.view(-1).to(dtype), att.full_att.bias.to(dtype),
            decoder.embedding.weight.to(dtype), fc_w, fc_b, captions, float(tf_ratio),
            decoder.dropout.p if decoder.dropout.training else 0.0, feats.dtype, active)
    if teacher:  # one projection over all steps (that ran)
        if active is None:
            out = decoder.logits(out)
        else:  # the placeholders stay zeros
            n, steps, hid = out.shape
            rows = slots_that_ran(active, n, out.device).t().reshape(-1).nonzero().squeeze(1)
            packed = decoder.logits(out.reshape(n * steps, hid).index_select(0, rows))
            out = packed.new_zeros(n * steps, packed.size(1)).index_copy(0, rows, packed).view(n, steps, -1)
    if restore is not None:
        out, alphas = _PermuteRows.apply(out, restore, order), _PermuteRows.apply(alphas, restore, order)
    return out, alphas


def slots_that_ran(active: list[int], rows: int, device) -> torch.Tensor:
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
    """All steps of ``Decoder.step`` (plus, below ratio 1, the per-step logits and the token fed
    back) with a hand-written backward through time.

    Why by hand: under autograd every step's matmuls compute and accumulate their own full-size
    weight gradients (the LSTM and attention weights, ~13 MB a step at the default sizes), which
    dominated the training step on a CPU. Here the backward loop only carries the activation
    gradients and each weight gradient is one GEMM over all steps at the end. With teacher forcing
    the embedding half of the LSTM input projection is also one GEMM over all steps.

    Buffers are time-major (T, N, ...) so a step reads and writes contiguous slices.
    Inputs are in the compute dtype already (see :func:`forward`); the softmax runs in at least
    float32 and the alphas are returned in ``alpha_dtype`` (the features' dtype), as
    ``SoftAttention`` does.
    Returns (N, T, H) hidden states with teacher forcing (``fc_w`` None), else (N, T, V) logits;
    and (N, T, P) attention weights.
    """

    @staticmethod
    def forward(ctx, feats, enc_proj, h0, c0, w_h, b_h, w_x, w_full, b_full, emb_w, fc_w, fc_b,
                captions, tf_ratio, p_drop, alpha_dtype, active=None):
        with autocast_off(feats.device.type):
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
            # where a recycled temporary hits it
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
                    emb_in = x[:, :, :emb_dim][slots_that_ran(run, n, x.device)]  # (sum(run), E), t-major
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
                queries[t, :r] = query.t()  # contiguous: the broadcast add below is slower on a view
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
        with autocast_off(feats.device.type):
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
            w_ctx = w_x[:, emb_dim:].contiguous()  # read at every step below: strided reads are slower
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
                # as a row times feats^T: bmm runs this form faster than feats times a column
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
                keep = slots_that_ran(run, n, dz.device).view(-1).nonzero().squeeze(1)
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
