"""Hugging Face integration: ``patch(model)`` makes ``model(input_ids=..., labels=...)`` compute its
loss with :func:`surgery_kernels.linear_cross_entropy`, never materializing the ``(B, T, V)`` logits.
On a patched model, ``token_nll`` (per-token NLL), ``token_kl`` (per-token KL to a reference) and
``head_inputs`` (what the output embeddings receive) serve objectives beyond the mean CE, through
the same forward.

One mechanism for every causal LM, no copied ``forward``. ``patch`` sets two instance attributes:

1. ``model.forward``: without ``labels`` it calls the model's own forward untouched (with
   ``labels`` in eval mode under no_grad too, unless ``eval_logits=False``: evaluation's metrics
   need the logits). Otherwise it takes the loss-only arguments out (``labels``,
   ``num_items_in_batch``, ``shift_labels``, ``ignore_index``), arms the output embeddings, runs the
   model's own forward (which, given no labels, computes no loss), then computes the loss from what
   the output embeddings received and returns the output with ``loss`` set and ``logits=None``.
2. ``model.get_output_embeddings().forward`` (an ``nn.Linear``): while armed, it records its input
   hidden states and returns a zero-width placeholder ``(B, T, 0)`` instead of logits. Whatever the
   architecture does to its logits afterwards (Gemma's softcapping, Granite's scaling) is applied to
   the placeholder, recorded, and folded into the loss (scalar scales into the hidden states and
   bias, ``c * tanh(x / c)`` into ``softcap``); anything else is refused with NotImplementedError
   rather than silently computing a different loss.

Why these hooks and not others:

- ``model.loss_function`` receives logits that were already materialized: too late.
- ``logits_to_keep`` slices the hidden states *before* the head; with it we would have to fetch
  the last hidden state some other way (``output_hidden_states`` keeps every layer's states, and
  whether its last entry is after the final norm differs between architectures).
- The output embeddings see exactly the hidden states the logits are made of (after the final
  norm and any model-specific projection) and hold the weight and bias actually used (tied or
  not), for every architecture; wrapping their ``forward`` is the narrowest cut.
- Instance attributes rather than module hooks: a forward hook cannot stop ``nn.Linear`` from
  computing the logits, and peft's ``LoraModel`` calls ``self.model.forward(...)`` directly,
  bypassing ``__call__`` hooks on the inner model. Both wrappers (``_Forward``) behave as methods
  bound to their module and keep their state on it, so ``copy.deepcopy`` and pickling of a patched
  model give a patched copy that runs the copy, and ``inspect.signature(model.forward)`` is the
  model's own (the Trainer reads it to choose dataset columns and to decide whether to pass
  ``num_items_in_batch``).

The loss is Hugging Face's ``ForCausalLMLoss``: labels shifted left by one (``shift_labels``
used as given when passed), tokens equal to ``ignore_index`` (-100) skipped, the mean over the
remaining tokens, or their sum divided by ``num_items_in_batch`` when the trainer passes it;
plus ``router_aux_loss_coef * aux_loss`` for mixture-of-experts models that return an
``aux_loss``, as they do themselves. Models whose loss is something else (another
``loss_function``, a forward that does not call it — Bart-family and TrOCR ``*ForCausalLM``,
encoder-decoders — or a z-loss) are refused at patch time; a model that adds some other
label-dependent term inside its own forward cannot be detected. One difference: a batch with no
live token gives 0 here and NaN in Hugging Face.

Sharding: the loss reads the head's weight after the model's forward. Under DDP, FSDP2 with the
head in the root's unit (the trainer's layout), or ``reshard_after_forward=False``, it is still
there. A head that FSDP2 shards as a unit of its own (``fully_shard(model.lm_head)``, a size-based
wrap policy) is resharded when its forward returns; the loss then runs inside a second call of
the head, so FSDP2 gathers, reshards and reduce-scatters for it as for any forward of the unit
(``_with_head``). Wrappers that release the weight otherwise (DeepSpeed ZeRO-3) are refused with
an explanation.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import torch

from . import checks
from .backends import BACKENDS
from .functional import linear_cross_entropy, linear_kl_div

_Model = TypeVar("_Model", bound=torch.nn.Module)

_ATTR = "_surgery_kernels_patch"
# Keyword arguments that only the loss uses: taken out of a labelled call. _PER_TOKEN (token_nll's):
# the loss is the per-token NLL (B, T) instead of the mean, without the MoE router loss.
_PER_TOKEN = "_surgery_kernels_per_token"
_LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index", _PER_TOKEN)
# head_inputs' flag: no loss; the forward returns what the output embeddings received, as a
# HeadInputs, labels or not.
_HEAD = "_surgery_kernels_head"


class HeadInputs(NamedTuple):
    """What a patched model's logits are made of: ``softcap * tanh(z / softcap)`` (or ``z`` when
    softcap is None) with ``z = hidden @ weight.T + bias``; the model's own logit scaling is folded
    into ``hidden`` and ``bias``."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None


@dataclass
class _Call:
    """What the output embeddings recorded during one labelled forward."""

    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    placeholder: torch.Tensor | None = None
    tape: list = field(default_factory=list)


@dataclass
class _Patch:
    backend: str
    chunk_size: int | None
    head: torch.nn.Module
    prev_forward: object  # the model's instance-level forward before patching, if any
    prev_head_forward: object
    labels_position: int | None  # index of ``labels`` among the positional parameters
    takes_return_dict: bool  # whether forward accepts return_dict (by name or **kwargs)
    takes_use_cache: bool = False  # whether forward accepts use_cache (by name, or **kwargs with config.use_cache)
    eval_logits: bool = True  # a labelled call in eval mode runs the model's own forward (logits and all)
    active: bool = True
    call: _Call | None = None  # set while a labelled forward is in flight
    # Set while the loss runs inside a second call of the output embeddings (``_with_head``): what
    # their forward computes then, from its input and their parameters.
    inside_head: object = None


class _Placeholder(torch.Tensor):
    """Zero-width stand-in for the logits. Every torch function applied to it is recorded on
    the tape of the call in flight, and its result is a placeholder too, so the chain of
    operations an architecture applies to its logits can be read back afterwards."""

    _tape: list | None = None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = super().__torch_function__(func, types, args, kwargs)
        # Attribute reads (shape, dtype, device) go through here as property getters.
        if getattr(func, "__name__", "") != "__get__":
            tape = next((a._tape for a in args if isinstance(a, _Placeholder) and a._tape is not None), None)
            if tape is not None:
                tape.append((func, args, kwargs, out))
                if isinstance(out, _Placeholder):
                    out._tape = tape
        return out


def _is_func(func, *names) -> bool:
    return getattr(func, "__name__", None) in names


def _number(x) -> float | None:
    return float(x) if isinstance(x, numbers.Real) and not isinstance(x, bool) else None


def _interpret(call: _Call, logits) -> tuple[float, float | None]:
    """Read the chain of operations applied to the placeholder into ``(scale, softcap)`` such that
    the model's logits are ``softcap * tanh(scale * z / softcap)`` (or ``scale * z`` when softcap
    is None), z = hidden @ weight.T + bias. Refuses anything else."""
    pre, post, tanh = 1.0, 1.0, False
    current = call.placeholder
    for func, args, kwargs, out in call.tape:
        if not args or args[0] is not current:
            if len(args) == 2 and args[1] is current and _is_func(func, "__rmul__", "mul") and \
                    _number(args[0]) is not None:
                args = (args[1], args[0])
            else:
                raise NotImplementedError(
                    f"surgery_kernels.hf.patch: this model combines its logits with something else after the output "
                    f"embeddings ({getattr(func, '__name__', func)!r}); the patched loss would differ, so it is refused")
        other = _number(args[1]) if len(args) > 1 else None
        name = getattr(func, "__name__", repr(func))
        if name in ("float", "contiguous") and len(args) == 1 and not kwargs:
            pass
        elif name == "to" and len(args) == 2 and args[1] in (torch.float32, torch.float64) and not kwargs:
            pass
        elif name in ("mul", "__mul__", "__rmul__") and other is not None and not kwargs:
            if tanh:
                post *= other
            else:
                pre *= other
        elif name in ("div", "__truediv__", "true_divide") and other not in (None, 0.0) and not kwargs:
            if tanh:
                post /= other
            else:
                pre /= other
        elif name == "tanh" and len(args) == 1 and not kwargs and not tanh:
            tanh = True
        else:
            raise NotImplementedError(
                f"surgery_kernels.hf.patch: this model applies {name!r} to its logits after the output embeddings; "
                f"only scalar scaling and tanh softcapping (c * tanh(x / c)) can be folded into the fused loss")
        current = out
    if logits is not current:
        raise NotImplementedError("surgery_kernels.hf.patch: the logits this model returns are not the output "
                                  "embeddings' result (or a scaled/softcapped version of it); refusing to patch")
    if not tanh:
        return pre, None
    if post <= 0:
        raise NotImplementedError(f"surgery_kernels.hf.patch: softcapping with a non-positive cap ({post}) is not "
                                  f"supported")
    # post * tanh(pre * z) = c * tanh((pre * c) * z / c) with c = post.
    return pre * post, post


def _head_forward(self, state: _Patch, hidden, *args, **kwargs):
    if state.inside_head is not None:
        inside, state.inside_head = state.inside_head, None
        return inside(hidden, self.weight, self.bias)
    call = state.call
    if not state.active or call is None:
        if state.prev_head_forward is not None:
            return state.prev_head_forward(hidden, *args, **kwargs)
        return type(self).forward(self, hidden, *args, **kwargs)
    if call.hidden is not None:
        raise NotImplementedError("surgery_kernels.hf.patch: the output embeddings were called twice in one forward")
    call.hidden, call.weight, call.bias = hidden, self.weight, self.bias
    ph = hidden.new_empty(*hidden.shape[:-1], 0).as_subclass(_Placeholder)
    ph._tape = call.tape
    call.placeholder = ph
    return ph


class _LinkHead(torch.autograd.Function):
    """Identity on the hidden states whose graph node also lists the head's weight and bias, so
    that DDP's search for unused parameters (it walks the graph from the forward's outputs) finds
    them when the head is used after the forward; no gradient flows through this link."""

    @staticmethod
    def forward(ctx, hidden, weight, bias):
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def _is_fsdp2(module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return False
    return isinstance(module, FSDPModule)


def _released(state: _Patch, call: _Call) -> bool:
    """Whether the output embeddings' parameters were released when their forward returned: a
    head that FSDP2 shards as a unit of its own (``fully_shard(model.lm_head)``, a size-based wrap
    policy) is resharded then; DeepSpeed ZeRO-3 empties a partitioned parameter's data."""
    return call.weight.numel() == 0 or (_is_fsdp2(state.head) and _is_dtensor(state.head.weight))


def _with_head(state: _Patch, call: _Call, logits, fn):
    """``fn(HeadInputs)`` (the loss, the KL, a snapshot) while the head's parameters hold their
    values. Usually they still do after the model's forward, and ``fn`` runs on what the head
    recorded. An FSDP2 head of its own was resharded when its forward returned: ``fn`` then runs
    inside a second call of the head, so FSDP2 does for it what it does for any forward of the
    unit — all-gathers the weight before, reshards after, all-gathers it again before this
    result's backward (which recomputes from it for ``reduction="none"``) and reduce-scatters its
    gradient when the gradient reaches the head's input."""
    if call.hidden is None:
        raise NotImplementedError("surgery_kernels.hf.patch: the model's forward did not call its output embeddings")
    scale, softcap = _interpret(call, logits)

    def pieces(hidden, weight, bias):
        if scale != 1.0:
            hidden = hidden * scale
            bias = bias * scale if bias is not None else None
        return HeadInputs(hidden, weight, bias, softcap)

    if not _released(state, call):
        return fn(pieces(call.hidden, call.weight, call.bias))
    if not _is_fsdp2(state.head):
        raise NotImplementedError(
            "surgery_kernels.hf.patch: the output embeddings' weight was released when their forward returned "
            "(a sharding wrapper around the head, such as DeepSpeed ZeRO-3), and the loss reads it after that; "
            "keep the head's parameters gathered for the model's forward (FSDP2's fully_shard(model.lm_head) "
            "is supported)")
    state.inside_head = lambda h, w, b: fn(pieces(h, w, b))
    try:
        return state.head(call.hidden)
    finally:
        state.inside_head = None


def _causal_lm_loss(state: _Patch, head: HeadInputs, labels, loss_kwargs, per_token: bool = False):
    hidden, weight, bias, softcap = head
    ignore_index = loss_kwargs.get("ignore_index", -100)
    shift_labels = loss_kwargs.get("shift_labels")
    name = "shift_labels" if shift_labels is not None else "labels"
    if shift_labels is None:
        # Position t predicts label t + 1; the last position has nothing to predict.
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    if tuple(shift_labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{name} must have the shape of the tokens that reach the output embeddings "
                         f"{tuple(hidden.shape[:-1])}, got {tuple(shift_labels.shape)}: logits_to_keep with labels, "
                         f"or a model whose own loss scores only part of its head's positions (other tokens, such "
                         f"as image features, before the text), which the patched loss cannot line up; unpatch "
                         f"such a model (surgery_kernels.hf.unpatch)")
    if torch.is_floating_point(shift_labels) or torch.is_complex(shift_labels) or shift_labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class ids, got dtype {shift_labels.dtype}")
    # What the caller passed, and where (the loss would name its shifted copy `target`).
    checks.target_range(shift_labels.to(torch.int64), ignore_index, weight.shape[0], name=name,
                        shift=1 if name == "labels" else 0)
    num_items = None if per_token else loss_kwargs.get("num_items_in_batch")
    reduction = "none" if per_token else "mean" if num_items is None else "sum"
    loss = linear_cross_entropy(hidden, weight, shift_labels, bias=bias, ignore_index=ignore_index,
                                reduction=reduction, softcap=softcap, backend=state.backend,
                                chunk_size=state.chunk_size)
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    return loss


def _original_forward(model, state: _Patch):
    if state.prev_forward is not None:
        return state.prev_forward
    return functools.partial(type(model).forward, model)


def _armed_forward(model, state: _Patch, args, kwargs):
    """The model's own forward with the output embeddings armed: (its output, what they recorded)."""
    if state.takes_return_dict:
        kwargs["return_dict"] = True
    call = state.call = _Call()
    try:
        out = _original_forward(model, state)(*args, **kwargs)
    finally:
        state.call = None
    if not isinstance(out, Mapping):
        raise NotImplementedError(f"surgery_kernels.hf.patch: the model returned a {type(out).__name__}; a "
                                  f"labelled call needs a ModelOutput (a mapping with 'logits')")
    return out, call


def _model_forward(self, state: _Patch, *args, **kwargs):
    if kwargs.get("fused_lm_head"):
        # TRL's fused LM head (trl.trainer.utils.add_fused_lm_head, which TRL 1.16's SFT, DPO, KTO,
        # GRPO and RLOO trainers install on the model) computes its loss from the backbone's hidden
        # states itself, without logits: its call goes through untouched, labels included.
        return _original_forward(self, state)(*args, **kwargs)
    labels = kwargs.pop("labels", None)
    positional = False
    if labels is None and state.labels_position is not None and len(args) > state.labels_position:
        args = list(args)
        labels, args[state.labels_position] = args[state.labels_position], None
        positional = labels is not None
    head = state.active and kwargs.pop(_HEAD, False)
    # A plain labelled call in eval mode under no_grad (Trainer.evaluate, prediction_step): metrics
    # and predictions need the logits, so the model computes them and its own loss, unpatched.
    # With gradients enabled (training with dropout off) the loss stays fused.
    plain_eval = (labels is not None and not head and _PER_TOKEN not in kwargs and state.eval_logits
                  and not self.training and not torch.is_grad_enabled())
    if not state.active or (labels is None and not head) or plain_eval:
        if positional:
            args[state.labels_position] = labels
        elif labels is not None:
            kwargs["labels"] = labels
        return _original_forward(self, state)(*args, **kwargs)
    _check_head(self, state)
    loss_kwargs = {k: kwargs.pop(k) for k in _LOSS_KWARGS if k in kwargs}
    if (head or loss_kwargs.get(_PER_TOKEN)) and state.takes_use_cache:
        # head_inputs and token_nll return no cache: without this a model whose config says
        # use_cache (most, outside gradient checkpointing) keeps every layer's keys and values to
        # the end of the forward — under no_grad, a reference's, memory it would otherwise free
        # layer by layer (2 x layers x tokens x kv width: 16 GiB for Llama-2-7B at 32k tokens).
        kwargs.setdefault("use_cache", False)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(getattr(self, "config", None), "return_dict", True)
    out, call = _armed_forward(self, state, args, kwargs)
    logits = out.get("logits")
    if callable(head):  # token_kl: a result computed from the head inputs
        return _with_head(state, call, logits, head)
    if head:
        if not torch.is_grad_enabled():
            # A reference: a snapshot of the head, which a later optimizer step (or resharding)
            # must not change.
            released = call.hidden is not None and _released(state, call)

            def snapshot(p):
                copy = p.weight.requires_grad or released
                return p._replace(weight=p.weight.detach().clone() if copy else p.weight.detach(),
                                  bias=None if p.bias is None else p.bias.detach().clone())
            return _with_head(state, call, logits, snapshot)
        if call.hidden is not None and _released(state, call):
            raise NotImplementedError(
                "head_inputs with gradients: this head's weight is released when its forward returns (FSDP2 "
                "shards it as a unit of its own), before you could use it; use hf.token_kl, hf.token_nll or "
                "the patched loss, which compute inside the head's unit, or fully_shard(model.lm_head, "
                "reshard_after_forward=False)")
        return _with_head(state, call, logits,
                          lambda p: p._replace(hidden=_LinkHead.apply(p.hidden, p.weight, p.bias)))
    per_token = bool(loss_kwargs.get(_PER_TOKEN))
    loss = _with_head(state, call, logits, lambda p: _causal_lm_loss(state, p, labels, loss_kwargs, per_token))
    aux = None if per_token else out.get("aux_loss")
    if aux is not None:
        # Mixture-of-experts models (Mixtral, Qwen2-MoE, ... 30+ in transformers) add the router's
        # load-balancing loss to the loss when labels are given (output_router_logits=True).
        coef = getattr(self, "router_aux_loss_coef", getattr(self, "aux_loss_coef", None))
        if coef is None:  # vision-language MoE models keep it with the text model's config
            coef = getattr(getattr(getattr(self, "config", None), "text_config", None), "router_aux_loss_coef", None)
        if coef is None:
            raise NotImplementedError("surgery_kernels.hf.patch: this model returns an aux_loss but has no "
                                      "router_aux_loss_coef; the patched loss would differ, so it is refused")
        loss = loss + coef * aux.to(loss.device)
    # Rebuild the output so that `loss` comes first (as Hugging Face orders it) and logits is None.
    fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
    if not return_dict:
        # As the model's own tuple, with None where the logits were: to_tuple() drops None fields,
        # which would move the cache into the logits' place (`loss, logits = out[:2]`).
        return (loss,) + tuple(None if k == "logits" else fields[k] for k in out.keys() if k != "loss")
    return type(out)(loss=loss, **fields)


def _output_embeddings(model) -> torch.nn.Linear:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise TypeError(f"model must be a causal LM with output embeddings (get_output_embeddings()), "
                        f"got {type(model).__name__}")
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        cls = type(head)
        raise TypeError(f"model's output embeddings must be a plain torch.nn.Linear (the loss reads its weight and "
                        f"bias), got {cls.__module__}.{cls.__qualname__}" + (
                            " — a peft wrapper: LoRA or modules_to_save on the output embeddings is not supported "
                            "(leave lm_head out of target_modules and modules_to_save)"
                            if cls.__module__.startswith("peft") else ""))
    return head


def _check_head(model, state: _Patch) -> None:
    """The output embeddings the model calls now are the ones patch armed; else say what to do."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or head is state.head:
        return
    if isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward:
        reason = "were replaced since patch (resize_token_embeddings or set_output_embeddings?)"
    else:
        reason = f"are now a {type(head).__module__}.{type(head).__qualname__} (a peft wrapper on lm_head?)"
    raise RuntimeError(f"surgery_kernels.hf.patch: the model's output embeddings {reason}; call "
                       f"surgery_kernels.hf.patch(model) again after changing them (a LoRA or modules_to_save "
                       f"wrapper on the output embeddings is not supported)")


def _check_loss_function(model) -> None:
    """The loss the patch reproduces is transformers' ForCausalLMLoss, called by the model's
    forward as ``self.loss_function``. ``loss_function`` is a property every PreTrainedModel has,
    so the forward must also use it: Bart-family and TrOCR ``*ForCausalLM`` classes, CPM-Ant, XLM
    and encoder-decoder models compute an unshifted CE of their own, which the patch would
    silently replace by a shifted one."""
    get_base = getattr(model, "get_base_model", None)  # peft: the transformers model inside
    base = get_base() if callable(get_base) else model
    name = type(base).__name__
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        raise ValueError(f"surgery_kernels.hf.patch: {name} is an encoder-decoder model; the patch reproduces the "
                         f"decoder-only causal-LM loss (shifted labels) only")
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except ImportError:  # transformers without a loss registry: nothing to compare against
        return
    fn = getattr(base, "loss_function", None)
    if fn is not None and fn is not LOSS_MAPPING.get("ForCausalLM"):
        raise ValueError(f"model's loss_function must be transformers' ForCausalLMLoss (the loss patch reproduces), "
                         f"got {getattr(fn, '__name__', fn)!r}")
    if fn is None:  # not a transformers model: its labels loss is taken to be the shifted CE (docstring)
        return
    forward = type(base).forward
    for _ in range(8):  # decorators (can_return_tuple, auto_docstring, ...) keep the original in __wrapped__
        forward = getattr(forward, "__wrapped__", forward)
    code = getattr(forward, "__code__", None)
    if code is not None and "loss_function" not in code.co_names:
        raise ValueError(f"surgery_kernels.hf.patch: {name}.forward computes its loss without transformers' "
                         f"loss_function (ForCausalLMLoss), so the patched loss would not be the model's (an "
                         f"unshifted cross-entropy, say); patch models whose forward calls self.loss_function")


def _check_extra_loss_terms(model) -> None:
    # Label-dependent terms computed from the logits themselves cannot be reproduced without them.
    z = getattr(getattr(model, "config", None), "z_loss_coefficient", None)
    if z:
        raise ValueError(f"model adds a z-loss to its loss (config.z_loss_coefficient={z}), which the patched loss "
                         f"does not compute; set it to 0 to patch")


def patch(model: _Model, backend: str = "auto", *, chunk_size: int | None = None, eval_logits: bool = True) -> _Model:
    """Make ``model(..., labels=...)`` in training mode compute Hugging Face's causal-LM loss with
    :func:`surgery_kernels.linear_cross_entropy`, returning ``loss`` and ``logits=None``; without
    ``labels`` the model behaves as before. Returns ``model`` itself (changed in place).

    model: a Hugging Face causal LM (``*ForCausalLM``, or a peft model wrapping one) whose output
    embeddings are an ``nn.Linear``. backend, chunk_size: as in ``linear_cross_entropy``.
    eval_logits: in eval mode under ``torch.no_grad()`` (as ``Trainer.evaluate`` and ``predict``
    run) a labelled call returns the logits and the loss made from them, as the unpatched model does —
    ``compute_metrics``, ``preprocess_logits_for_metrics`` and predictions need them; ``False``:
    the fused loss and ``logits=None`` in eval mode too (loss-only evaluation without a
    ``[B, T, V]`` tensor). ``token_nll``, ``token_kl`` and ``head_inputs`` never make logits.
    Patching a patched model replaces the options. Undo with :func:`unpatch`.
    """
    checks.choice("backend", backend, ("auto",) + BACKENDS)
    chunk_size = checks.common("mean", backend, chunk_size)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, _ATTR, None) is not None:
        unpatch(model)
    head = _output_embeddings(model)
    peft_config = getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        raise NotImplementedError(
            "surgery_kernels.hf.patch: a peft prompt-learning model (prompt tuning, p-tuning, prefix tuning) adds its "
            "virtual tokens and pads the labels for them in its own forward, which the loss must follow: patch the "
            "model under it instead, hf.patch(model.get_base_model()), and call the peft model as usual")
    _check_loss_function(model)
    _check_extra_loss_terms(model)
    cls_forward = type(model).forward
    params = inspect.signature(cls_forward).parameters.values()
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
    if not isinstance(eval_logits, bool):
        raise TypeError(f"eval_logits must be True or False, got {eval_logits!r}")
    state = _Patch(backend=backend, chunk_size=chunk_size, head=head, eval_logits=eval_logits,
                   prev_forward=model.__dict__.get("forward"), prev_head_forward=head.__dict__.get("forward"),
                   labels_position=positional.index("labels") if "labels" in positional else None,
                   takes_return_dict=any(p.name == "return_dict" or p.kind == p.VAR_KEYWORD for p in params),
                   takes_use_cache=any(p.name == "use_cache" or (p.kind == p.VAR_KEYWORD and hasattr(
                       getattr(model, "config", None), "use_cache")) for p in params))

    # Plain object attributes (not submodules), so state_dict, parameters and repr are unchanged.
    object.__setattr__(model, _ATTR, state)
    object.__setattr__(head, _ATTR, state)
    model.forward = _Forward(model, head=False, state=state)
    head.forward = _Forward(head, head=True, state=state)
    for module in (model, head):
        object.__setattr__(module, "_replicate_for_data_parallel", _refuse_data_parallel)
    return model


def _refuse_data_parallel():
    """Set on a patched model and head in place of ``Module._replicate_for_data_parallel``:
    ``nn.DataParallel``'s replicas copy the instance ``__dict__``, so each replica's ``forward``
    would be the patch bound to the original module (its weights, its device) — refused instead."""
    raise RuntimeError("surgery_kernels.hf.patch: torch.nn.DataParallel is not supported on a patched model (its "
                       "replicas would run the original module); use DistributedDataParallel — for the Hugging Face "
                       "Trainer on several GPUs, launch with torchrun — or one GPU")


class _Forward:
    """The ``forward`` that :func:`patch` sets on the model (``_model_forward``) and on its output
    embeddings (``_head_forward``): a bound method in all but two points.

    - It pickles as "this wrapper of that module" (``__reduce__``). A bound method pickles as
      ``getattr(module, "forward")``, which on loading finds the class's forward: a model saved
      with ``torch.save(model)`` came back unpatched while ``is_patched`` said True.
    - Its function (``__func__``, a fresh one per module so that it carries the class forward's
      name, docs and signature) has no ``__wrapped__``: accelerate's ``unwrap_model`` walks that
      chain from the forward it wrapped and would install the class's own forward.

    It runs with the patch state it was made with, not whatever the module holds now: a wrapper
    installed over it (accelerate's hooks) survives ``unpatch``, and when the model is patched
    again the old, inactive wrapper must pass through rather than call the new patch's (which
    calls it back).
    """

    _surgery_kernels_wrapper = True

    def __init__(self, module, head: bool, state: _Patch):
        impl = _head_forward if head else _model_forward

        def forward(self, *args, **kwargs):
            return impl(self, state, *args, **kwargs)
        cls_forward = type(module).forward
        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            if hasattr(cls_forward, attr):
                setattr(forward, attr, getattr(cls_forward, attr))
        forward.__signature__ = inspect.signature(cls_forward)
        forward._surgery_kernels_wrapper = True
        self.__self__, self.__func__, self._head, self._state = module, forward, head, state
        self.__name__, self.__doc__ = forward.__name__, forward.__doc__

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    @property
    def __signature__(self):
        return inspect.signature(types.MethodType(self.__func__, self.__self__))

    def __reduce__(self):
        return _Forward, (self.__self__, self._head, self._state)

    def __repr__(self):
        return f"<surgery_kernels.hf patched forward of {type(self.__self__).__name__}>"


def unpatch(model: _Model) -> _Model:
    """Undo :func:`patch`: the model and its output embeddings get back the ``forward`` they had.
    A model that is not patched is returned unchanged. Returns ``model``."""
    state: _Patch | None = getattr(model, _ATTR, None)
    if state is None:
        return model
    state.active = False
    for module, prev in ((model, state.prev_forward), (state.head, state.prev_head_forward)):
        fwd = module.__dict__.get("forward")
        # Only remove our own wrapper; if something wrapped it again since, ours stays as a
        # pass-through (state.active is False) so that wrapper keeps working.
        if isinstance(fwd, _Forward):  # not a wrapper that copied its attributes (functools.update_wrapper)
            if prev is None:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = prev
            module.__dict__.pop(_ATTR, None)
        if module.__dict__.get("_replicate_for_data_parallel") is _refuse_data_parallel:
            del module.__dict__["_replicate_for_data_parallel"]
    return model


def _find_patch(model) -> _Patch | None:
    """The patch state of ``model`` or of the model a wrapper calls (DDP/FSDP ``.module``,
    ``torch.compile``'s ``._orig_mod``; peft forwards the attribute itself)."""
    for _ in range(8):
        state = getattr(model, _ATTR, None)
        if state is not None:
            return state
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if model is None:
            return None
    return None


def _require_patch(model, what: str) -> _Patch:
    state = _find_patch(model)
    if state is None or not state.active:
        raise ValueError(f"{what} needs a model patched with surgery_kernels.hf.patch(model) (or a DDP, FSDP, "
                         f"torch.compile or peft wrapper around one); this {type(model).__name__} is not — a copy "
                         f"made before patching (a reference deep-copied first, a Trainer's own copy) is not "
                         f"patched either: patch it too")
    return state


def token_nll(model: torch.nn.Module, *, labels: torch.Tensor, ignore_index: int = -100,
              shift_labels: torch.Tensor | None = None, **inputs: Any) -> torch.Tensor:
    """Per-token negative log-likelihood of ``labels`` under a patched causal LM, from the hidden
    states its output embeddings receive — no logits — with the model's own logit scaling and
    softcapping folded in, as the patched loss does.

    ``token_nll(model, **batch)`` takes the keyword arguments of ``model(**batch)`` and calls
    ``model(...)`` with them, so wrappers around the patched model (DDP, FSDP, ``torch.compile``,
    peft) run as in any forward: DDP still averages the gradients. ``labels`` (B, T) are shifted as
    Hugging Face shifts them (or pass ``shift_labels``). Returns float32 (B, T) (float64 for a
    float64 model): entry t is ``-log p(labels[t + 1] | tokens <= t)``, 0 where that label is
    ``ignore_index`` and at the last position. Differentiable (``reduction="none"``: any upstream
    gradient), for sequence-level objectives — ``token_nll(...).sum(-1)`` is NPO's or DPO's
    ``-log pi(y | x)`` — and token-weighted ones. The MoE router loss is not included (it is not a
    likelihood). For a frozen reference model, call it under ``torch.no_grad()``. The model runs
    with ``use_cache=False`` unless the batch says otherwise (no key/value cache is returned).
    """
    _require_patch(model, "token_nll")
    if not torch.is_tensor(labels):
        raise TypeError(f"labels must be a tensor of token ids, got {type(labels).__name__}")
    inputs.pop("num_items_in_batch", None)  # a Trainer's batch may carry it; it scales a mean only
    inputs.update(labels=labels, ignore_index=ignore_index, return_dict=True, **{_PER_TOKEN: True})
    if shift_labels is not None:
        inputs["shift_labels"] = shift_labels
    out = model(**inputs)
    nll = out["loss"] if isinstance(out, Mapping) else None
    if nll is None or nll.shape != labels.shape:
        raise ValueError("token_nll: the model did not go through the patched forward (a wrapper that drops or "
                         "renames keyword arguments?)")
    return nll


def _model_inputs(inputs: dict) -> dict:
    """A batch's arguments of the model's forward for head_inputs and token_kl (no loss)."""
    return {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch", "return_dict")}


def head_inputs(model: torch.nn.Module, **inputs: Any) -> HeadInputs:
    """``HeadInputs(hidden, weight, bias, softcap)`` of a patched causal LM for ``model(**inputs)``:
    what its output embeddings receive (hidden (B, T, H) with the gradient path to the model),
    their weight and bias, the model's logit scaling folded in — the inputs of
    :func:`surgery_kernels.linear_kl_div` or ``linear_cross_entropy`` for any objective, without
    logits. Calls ``model(...)``, so wrappers (DDP, FSDP, ``torch.compile``, peft) run; ``labels``
    are ignored. With gradients enabled, ``weight`` and ``bias`` are the live parameters (use them
    in this step); under ``torch.no_grad()`` — a reference — they are a snapshot (a copy when the
    head is trained), so an optimizer step does not change a reference taken before it. For a LoRA
    model's adapters-off reference: ``with torch.no_grad(), model.disable_adapter(): ref =
    head_inputs(model, **batch)``. A head that FSDP2 shards as a unit of its own is resharded when
    its forward returns: under ``torch.no_grad()`` the snapshot is taken inside a second call of
    the head; with gradients that is refused (the weight would be freed before you use it) — use
    ``token_kl``/``token_nll``/the patched loss, which compute inside the head's unit, or
    ``fully_shard(model.lm_head, reshard_after_forward=False)``.
    """
    state = _require_patch(model, "head_inputs")
    out = model(**_model_inputs(inputs), return_dict=True, **{_HEAD: True})
    if not isinstance(out, HeadInputs):
        raise ValueError("head_inputs: the model did not go through the patched forward (a wrapper that drops or "
                         "renames keyword arguments?)")
    w = state.head.weight
    if out.weight.dtype != w.dtype and tuple(out.weight.shape) == tuple(w.shape) and not _is_dtensor(w):
        # A mixed-precision wrapper converted the forward's outputs (accelerate's
        # convert_outputs_to_fp32 makes float32 copies of a bf16 model's tensors: a V x H copy of
        # the weight, and float32 GEMMs in the caller's loss): take them back as the model has
        # them — the weight is the head's own parameter (a snapshot of it under no_grad).
        weight = w if torch.is_grad_enabled() else w.detach().clone() if w.requires_grad else w.detach()
        out = HeadInputs(out.hidden.to(w.dtype), weight, None if out.bias is None else out.bias.to(w.dtype),
                         out.softcap)
    return out


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def token_kl(model: torch.nn.Module, reference: torch.nn.Module | HeadInputs, *, mask: torch.Tensor | None = None,
             direction: str = "forward", temperature: float = 1.0, reduction: str = "none",
             **inputs: Any) -> torch.Tensor:
    """Per-token KL (B, T) between a patched model and a frozen reference on ``model(**inputs)``,
    without either's logits: ``direction="forward"`` is KL(p_ref || p), the retain term of
    LLM Surgery and of most unlearning recipes; ``"reverse"`` KL(p || p_ref); at ``temperature``.
    ``reduction="sum"`` / ``"mean"`` (over the scored tokens) return a scalar whose gradients
    come from the forward's one pass over the logits; ``"none"`` (the (B, T) values, any upstream
    gradient) recomputes them in the backward.

    Entry t compares the two next-token distributions after token t (the positions of the logits,
    not of shifted labels: a mask built from labels needs their shift). The true KL at temperature
    T, without distillation's T² factor.

    reference: another patched model (run under ``torch.no_grad()`` here, on its own device), or
    its :class:`HeadInputs` computed beforehand under ``torch.no_grad()`` (e.g. the same LoRA model
    with its adapters disabled); it may differ from the model in dtype or device (it is cast to
    the model's). mask: (B, T) bool or integer, tokens to score (nonzero = scored; float refused);
    default the ``attention_mask`` (all tokens without one); 0 elsewhere — a loss written as
    ``F.kl_div(..., "batchmean")`` over every position, padding included, is ``token_kl(...,
    mask=torch.ones_like(input_ids), reduction="sum") / input_ids.numel()``. Differentiable w.r.t.
    the model. Each side's logit scaling and softcapping (Gemma-2's final_logit_softcapping) is
    applied as that model applies it.
    """
    state = _require_patch(model, "token_kl")
    checks.choice("reduction", reduction, checks.REDUCTIONS)
    if mask is not None:
        checks.tensor("mask", mask)
        checks.mask_dtype("mask", mask)
    inputs = _model_inputs(inputs)
    if isinstance(reference, HeadInputs):
        ref = reference
    else:
        if not isinstance(reference, torch.nn.Module):
            raise TypeError(f"token_kl: reference must be a patched model or its HeadInputs (surgery_kernels.hf."
                            f"head_inputs), got {type(reference).__name__}")
        ref_state = _find_patch(reference)
        if ref_state is None or not ref_state.active:
            raise ValueError(f"token_kl: reference ({type(reference).__name__}) is not patched: patch it too "
                             f"(surgery_kernels.hf.patch(reference)), or pass its HeadInputs computed under "
                             f"torch.no_grad() (surgery_kernels.hf.head_inputs)")
        dev = next(iter(reference.parameters()), None)
        dev = dev.device if dev is not None else None
        with torch.no_grad():
            ref = head_inputs(reference, **{k: v.to(dev) if torch.is_tensor(v) and dev is not None else v
                                            for k, v in inputs.items()})
    if not torch.is_inference_mode_enabled():
        # A reference taken under inference_mode is copied: autograd cannot save inference tensors.
        ref = HeadInputs(*(t.clone() if t is not None and t.is_inference() else t for t in ref[:3]), ref.softcap)
    if mask is None:
        mask = inputs.get("attention_mask")
        mask = None if mask is None else mask != 0  # a float attention_mask too: nonzero = attended

    def kl(cur: HeadInputs) -> torch.Tensor:
        # Runs inside the model's forward (inside the head's, for an FSDP2 head of its own).
        to = dict(device=cur.hidden.device, dtype=cur.hidden.dtype)
        r = HeadInputs(*(None if t is None else t.detach().to(**to) for t in ref[:3]), ref.softcap)
        m = None if mask is None else mask.to(device=cur.hidden.device)
        return linear_kl_div(cur.hidden, cur.weight, r.hidden, r.weight, bias=cur.bias, ref_bias=r.bias, mask=m,
                             direction=direction, temperature=temperature, softcap=cur.softcap,
                             ref_softcap=r.softcap, reduction=reduction, backend=state.backend,
                             chunk_size=state.chunk_size)

    out = model(**inputs, return_dict=True, **{_HEAD: kl})
    if not torch.is_tensor(out):
        raise ValueError("token_kl: the model did not go through the patched forward (a wrapper that drops or "
                         "renames keyword arguments?)")
    return out


def is_patched(model: torch.nn.Module) -> bool:
    """Whether :func:`patch` is in effect on ``model``."""
    state = getattr(model, _ATTR, None)
    return state is not None and state.active
