"""The surgery objective as one ``nn.Module`` around the trained model.

    L = sum_s c_s * sign_s * mean_{tokens of s} CE   (ascent: sign -1, descent: +1)
      + sum_r c_r * mean_{tokens of r} KL(p_ref || p)

All streams of a step are padded to one length and run through the base model in **one** forward
(rows ordered: CE streams, then KL streams), or as two (``kl_batch``: the KL rows at their own
length, when padding short CE rows to long KL rows would waste more than it saves). Ascent and
descent rows then go through **one** ``linear_cross_entropy`` call whose per-token weights carry
the sign, the per-stream token mean and the stream's coefficient (``c_s * sign_s / N_s``, N_s =
live tokens of stream s over all processes) with ``reduction="sum"``, so the gradients come from
the forward's one pass over the logits; the per-token CE it also returns (``return_values``)
gives each stream's own mean CE as the sum of ``sign_s * ce_i / N_s`` over its slice. Retain rows
go through one ``linear_kl_div`` call against the reference's final hidden states, the same way.

Only **live** tokens (``target != IGNORE``) reach the loss kernels: padding, prompt tokens and
each row's last position are dropped before the head, so the ``tokens x vocab`` work is
proportional to the tokens that carry a loss (a fact statement trains on its ~3 answer tokens
out of ~15; a batch padded to its longest row is mostly padding). They are taken by their flat
positions (``ce_index`` / ``kl_index``), which the trainer finds on the host, where the targets
are built: selecting by a boolean mask on the GPU (``h[live]``, and its backward) makes the host
wait for the device, once per selection, in the middle of every pass.

Everything that touches the head weight happens inside ``forward``: under FSDP the weight is
unsharded only there.
"""

from __future__ import annotations

import torch
from torch import nn

from surgery_kernels import linear_cross_entropy, linear_kl_div

from .data import IGNORE
from .modeling import check_head, final_hidden, head_options, is_peft, logit_scale, output_layer


class SurgeryObjective(nn.Module):
    """Wraps the trained model (``self.model``). ``forward(mode=...)``:

    - ``"loss"``: ``(total, terms, capped)`` — the objective (a scalar with gradient) and, per
      stream, ``terms[s] = sum over this process's tokens of ce_i / N_s`` (or kl_i / N_s): summed
      over processes that is the stream's own mean CE / KL (capped ascent tokens included at their
      real CE), and ``capped[s]``, how many of this process's tokens ``ascent_cap`` switched off.
    - ``"nll"``: per-token negative log-likelihood ``(B, L)`` of ``target`` (0 where IGNORE), no logits.
    - ``"hidden"``: ``(final hidden (B, L, H), head weight, head bias)`` — copies of the weight as the
      forward sees it (``with_head=False``: ``(hidden, None, None)``).
    """

    def __init__(self, model: nn.Module, *, backend: str = "auto", kl_direction: str = "forward",
                 ascent_cap: float | None = None):
        super().__init__()
        self.model = model
        self.backend, self.kl_direction, self.ascent_cap = backend, kl_direction, ascent_cap
        self.head_opts = head_options(model)
        # Cohere/Granite-style logit scaling, folded into the hidden states and bias the kernels take
        self.logit_scale = logit_scale(model)
        check_head(model, scale=self.logit_scale, softcap=self.head_opts.get("softcap"))

    def _head(self):
        head = output_layer(self.model)
        return head.weight, getattr(head, "bias", None)

    def _scaled(self, hidden, bias):
        """(hidden, bias) times the model's logit scale: z = scale * (hidden @ W.T + bias)."""
        s = self.logit_scale
        if s == 1.0:
            return hidden, bias
        return hidden * s, None if bias is None else bias * s

    def forward(self, mode: str, input_ids, attention_mask, target=None, *, n_ce_rows: int = 0, ce_weight=None,
                ce_coeff=None, kl_weight=None, kl_coeff=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                stream_rows=None, with_head=True, kl_batch=None, ce_index=None, kl_index=None):
        if mode == "hidden":
            h = final_hidden(self.model, input_ids, attention_mask)
            if not with_head:
                return h, None, None
            # A copy: under FSDP the gathered weight is freed after the forward.
            w, b = self._head()
            return h, w.detach().clone(), None if b is None else b.detach().clone()
        if mode == "nll":
            h = final_hidden(self.model, input_ids, attention_mask)
            w, b = self._head()
            live = live_index(target)
            hs, bs = self._scaled(_take(h, live), b)
            v = linear_cross_entropy(hs, w, _take(target, live), bias=bs, reduction="none", backend=self.backend,
                                     **self.head_opts)
            return _scatter(v, live, target.shape)
        if mode != "loss":
            raise ValueError(f"mode must be 'loss', 'nll' or 'hidden', got {mode!r}")
        return self._loss(input_ids, attention_mask, target, n_ce_rows, ce_weight, ce_coeff, kl_weight, kl_coeff,
                          ref_hidden, ref_weight, ref_bias, stream_rows, kl_batch, ce_index, kl_index)

    def _loss(self, input_ids, attention_mask, target, n_ce_rows, ce_weight, ce_coeff, kl_weight, kl_coeff,
              ref_hidden, ref_weight, ref_bias, stream_rows, kl_batch=None, ce_index=None, kl_index=None):
        """ce_weight / ce_coeff: (n_ce_rows, L) per-token sign_s / N_s and c_s; kl_weight / kl_coeff the same
        for the KL rows (1 / N_r, c_r); stream_rows: per stream, its (start, stop) rows, CE rows first.
        kl_batch: ``(input_ids, attention_mask, target)`` of the KL rows as a batch of their own
        length (then ``input_ids``... hold the CE rows only); None: the KL rows follow the CE rows.
        ce_index / kl_index: ``live_index`` of the CE rows' / KL rows' targets, on the device (None:
        found here, a host synchronization on a GPU)."""
        if kl_batch is None:
            h = final_hidden(self.model, input_ids, attention_mask)
            ce_part = (h[:n_ce_rows], target[:n_ce_rows])
            kl_ids, kl_att, kl_tgt = input_ids[n_ce_rows:], attention_mask[n_ce_rows:], target[n_ce_rows:]
            hk_all = h[n_ce_rows:]
        else:
            if input_ids.shape[0] != n_ce_rows:
                raise ValueError(f"with kl_batch, input_ids holds the {n_ce_rows} CE rows only, "
                                 f"got {input_ids.shape[0]}")
            ce_part = (final_hidden(self.model, input_ids, attention_mask) if n_ce_rows else None, target)
            kl_ids, kl_att, kl_tgt = kl_batch
            hk_all = final_hidden(self.model, kl_ids, kl_att) if kl_ids.shape[0] else None
        w, b = self._head()
        total = w.new_zeros((), dtype=torch.float32)
        # Per row, the sum of its per-token values (and capped tokens): stream terms are sums of rows.
        row_vals, row_capped = [], []
        if n_ce_rows:
            # One signed call for every ascent and descent stream, over the live tokens only.
            hc, tc_ = ce_part
            sel = live_index(tc_) if ce_index is None else ce_index
            tw = _take(ce_weight, sel)
            # One "sum" call with weights c_s * sign_s / N_s: its gradients come from the forward's
            # pass over the logits ("none" would recompute them in the backward). The per-token CE
            # comes back for the metrics; the kernel's ascent_cap zeroes a capped token's loss and
            # gradient, and the token keeps its real CE in the stream's logged mean.
            hs, bs = self._scaled(_take(hc, sel), b)
            loss, ce = linear_cross_entropy(hs, w, _take(tc_, sel), bias=bs, token_weight=tw * _take(ce_coeff, sel),
                                            reduction="sum", ascent_cap=self.ascent_cap, backend=self.backend,
                                            return_values=True, **self.head_opts)
            if self.ascent_cap is not None:
                cap = (tw < 0) & (ce > self.ascent_cap)
                row_capped.append(_scatter(cap.to(torch.float32), sel, tc_.shape).sum(1))
            total = total + loss
            row_vals.append(_scatter(tw * ce, sel, tc_.shape).sum(1))
        if hk_all is not None and hk_all.shape[0]:
            sel = live_index(kl_tgt) if kl_index is None else kl_index
            hk = _take(hk_all, sel)
            if ref_hidden is None:
                ref_hidden, ref_weight, ref_bias = self._adapter_reference(kl_ids, kl_att, w, b)
            elif ref_weight is None:
                # A frozen head is its own reference (LoRA, or layers-only training with a cache).
                ref_weight, ref_bias = w, b
            if ref_hidden.dtype != hk.dtype:
                # A reference in another dtype than the trained hidden states (defensive: the copy and
                # the cache compute in the training's precision).
                ref_hidden = ref_hidden.to(hk.dtype)
            if ref_weight.dtype != ref_hidden.dtype:
                ref_weight = ref_weight.to(ref_hidden.dtype)
                ref_bias = None if ref_bias is None else ref_bias.to(ref_hidden.dtype)
            kw = _take(kl_weight, sel)
            # the reference is the same architecture (a copy, the adapters-off model or a cache of
            # it): its logits are scaled and capped as the trained model's are
            cap = self.head_opts.get("softcap")
            hk, bk = self._scaled(hk, b)
            rh, ref_bias = self._scaled(_take(ref_hidden, sel), ref_bias)
            loss, kl = linear_kl_div(hk, w, rh, ref_weight, bias=bk, ref_bias=ref_bias,
                                     token_weight=kw * _take(kl_coeff, sel), reduction="sum",
                                     direction=self.kl_direction, softcap=cap, ref_softcap=cap, backend=self.backend,
                                     return_values=True)
            total = total + loss
            row_vals.append(_scatter(kw * kl, sel, kl_tgt.shape).sum(1))
        values = torch.cat(row_vals, 0)
        caps = torch.zeros_like(values)  # capped counts exist for CE rows only, which come first
        if row_capped:
            caps[:n_ce_rows] = row_capped[0]
        if not stream_rows:
            return total, values.new_zeros(0), values.new_zeros(0)
        return (total, torch.stack([values[a:z].sum() for a, z in stream_rows]),
                torch.stack([caps[a:z].sum() for a, z in stream_rows]))

    def _adapter_reference(self, input_ids, attention_mask, w, b):
        """reference="adapter": the same model with its LoRA adapters switched off."""
        if not is_peft(self.model):
            raise ValueError("reference='adapter' needs a LoRA (peft) model")
        if w.requires_grad:
            raise ValueError("reference='adapter' needs a frozen lm_head (the head is trained, so the adapters-off "
                             "model is not the original); use reference='copy' or 'cache'")
        # In eval mode, as the copy and cache references run: no dropout in the reference.
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with torch.no_grad(), self.model.disable_adapter():
                rh = final_hidden(self.model, input_ids, attention_mask)
        finally:
            for m, training in modes:
                m.training = training
        return rh, w, b


def live_index(target: torch.Tensor) -> torch.Tensor:
    """(B, L) targets -> the flat positions (n,) of their live tokens (``target != IGNORE``), int64.
    On a GPU tensor this waits for the device (the count decides the shape): where the targets are
    built on the host, call it there and move the result with the batch."""
    return (target != IGNORE).reshape(-1).nonzero().squeeze(1)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, L, ...) -> (n, ...): the entries at the flat (B, L) positions ``index``. An index_select
    (its backward an index_add), where ``x[mask]`` would find the positions again on the host."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, index)


def _scatter(values: torch.Tensor, index: torch.Tensor, shape) -> torch.Tensor:
    """Per-live-token ``values`` back at their (B, L) = ``shape`` positions ``index``, 0 elsewhere."""
    return values.new_zeros(shape).reshape(-1).index_copy(0, index, values).reshape(shape)
