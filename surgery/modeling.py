"""The one model path: final hidden states from the base model, logits never computed.

Every Hugging Face ``*ForCausalLM`` is ``lm_head(base_model(...).last_hidden_state)``:
``PreTrainedModel.base_model`` is the attribute named by ``base_model_prefix`` (``model`` for
Llama, Qwen2, Mistral; ``transformer`` for GPT-2) and its ``last_hidden_state`` is already the
final-normed state the head consumes. Calling it skips the head, so no ``[tokens, vocab]``
tensor ever exists; the loss takes ``get_output_embeddings().weight`` (and bias, if any).
Checked for Llama, Qwen2, Mistral and GPT-2 (logits equal to ``lm_head(hidden)`` exactly) on
transformers 5.24; the same attributes exist since transformers 4.x, including 5.17.

Why not the alternatives: ``output_hidden_states=True`` still runs the head over every
position; ``logits_to_keep`` trims the head but which entry of ``hidden_states`` is post-norm
varies between versions and models.

Models whose head does more than a linear map are detected: Gemma-2's final logit softcap is
passed to the kernels' ``softcap`` (and, for KL streams, ``ref_softcap``: the reference is the
same architecture); a constant logit scale (Cohere's ``logit_scale``, Granite's
``logits_scaling``, Falcon-H1's ``lm_head_multiplier``: ``LOGIT_SCALING``) is folded into the
hidden states and bias the kernels receive. A scaling attribute on an architecture not in that
table is refused, and ``check_head`` compares, on two tokens, the model's own logits with what
the losses compute, so an architecture that does anything else is refused before training
rather than silently trained wrong.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import re

import torch
from torch import nn

log = logging.getLogger("surgery")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def unwrap(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` inside a peft wrapper (LoRA layers stay injected in it)."""
    get = getattr(model, "get_base_model", None)
    if callable(get) and type(model).__name__.startswith("Peft"):
        return get()
    return model


def head_options(model: nn.Module) -> dict:
    """Extra kernel options the model's head needs (``softcap``)."""
    cfg = getattr(unwrap(model), "config", None)
    cap = getattr(cfg, "final_logit_softcapping", None)
    return {"softcap": float(cap)} if cap else {}


# model_type -> (config attribute, whether the *ForCausalLM multiplies or divides by it): each
# scales the head's output, or (minicpm3) its input, by a constant (transformers 5.x sources).
# The same attribute name means either: HyperCLOVAX multiplies by logits_scaling, Granite divides.
LOGIT_SCALING = {
    **{t: ("logit_scale", "mul") for t in ("cohere", "cohere2", "cohere2_moe")},
    **{t: ("logits_scaling", "div") for t in ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid",
                                             "granite_swa", "granitemoe_swa", "minicpm3")},
    "hyperclovax": ("logits_scaling", "mul"),
    "falcon_h1": ("lm_head_multiplier", "mul"),
}
_SCALING_ATTRS = ("logit_scale", "logits_scaling", "lm_head_multiplier")


def logit_scale(model: nn.Module) -> float:
    """The constant the model's logits are ``lm_head(hidden)`` times (1.0 for most models), or a
    ValueError for a scaling attribute whose use this table does not know."""
    cfg = getattr(unwrap(model), "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind in LOGIT_SCALING:
        attr, how = LOGIT_SCALING[kind]
        v = getattr(cfg, attr, None)
        if v is None:
            return 1.0
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < abs(v) < float("inf")):
            raise ValueError(f"model config has {attr}={v!r}: expected a finite nonzero number")
        return float(v) if how == "mul" else 1.0 / float(v)
    for attr in _SCALING_ATTRS:
        v = getattr(cfg, attr, None)
        if v not in (None, 1, 1.0):
            raise ValueError(f"model config (model_type {kind!r}) has {attr}={v}: how this architecture applies "
                             f"it to its logits is not known here (surgery.modeling.LOGIT_SCALING), so the losses "
                             f"cannot follow it")
    return 1.0


@torch.no_grad()
def check_head(model: nn.Module, *, scale: float = 1.0, softcap: float | None = None) -> None:
    """Compare the model's own logits on two tokens with what the losses compute from
    ``final_hidden`` and the output layer (times ``scale``, softcapped): a ValueError naming the
    architecture when they differ — a head the losses would train wrong (scaled hidden states
    before the head, a logit transform this module does not know). The model runs in eval mode,
    restored after."""
    params = next(iter(model.parameters()), None)
    if params is None:
        return
    ids = torch.tensor([[0, 1]], device=params.device)
    att = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits.double()
        head = output_layer(model)
        z = torch.nn.functional.linear(final_hidden(model, ids, att), head.weight, getattr(head, "bias", None))
        z = z.double() * scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
    finally:
        model.train(was_training)
    # (another shape: positions the base model does not see, such as peft's virtual prompt tokens)
    err = ((z - logits).norm() / logits.norm().clamp_min(1e-30)).item() if z.shape == logits.shape else math.inf
    # the model and this computation round differently only after the head's GEMM (scale, softcap)
    tol = 1e-4 if params.dtype in (torch.float32, torch.float64) else 3e-2
    if not err <= tol:
        kind = getattr(getattr(unwrap(model), "config", None), "model_type", type(unwrap(model)).__name__)
        raise ValueError(f"this model's logits are not what the losses compute from its final hidden states and "
                         f"output layer (model_type {kind!r}: relative difference {err:.3g} on two tokens, scale "
                         f"{scale}, softcap {softcap}): its *ForCausalLM transforms the hidden states or the logits "
                         f"in a way surgery.modeling does not follow")


def decoder(model: nn.Module) -> nn.Module:
    """The base model (everything before the head) of a causal LM, peft-wrapped or not."""
    causal = unwrap(model)
    base = getattr(causal, "base_model", None)
    if base is None or base is causal:
        raise TypeError(f"{type(causal).__name__} has no base model under its head; pass an AutoModelForCausalLM")
    return base


def output_layer(model: nn.Module) -> nn.Module:
    head = unwrap(model).get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(unwrap(model)).__name__} has no output embedding (lm_head) with a weight")
    return head


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) ids -> (B, L, H) final hidden states, without computing logits."""
    out = decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def is_saved_model(path) -> bool:
    """Whether the folder ``path`` holds a saved model: a model's config.json or a LoRA adapter's
    adapter_config.json (what save_pretrained writes first to look for)."""
    return any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "adapter_config.json"))


# The files a saved tokenizer has one of (fast, slow, SentencePiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    # (else transformers blames a missing sentencepiece or tiktoken, naming no path)
    if os.path.isdir(path) and not any(os.scandir(path)):
        raise ValueError(f"tokenizer directory {path} is empty (model.tokenizer, or model.path without it)")
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ValueError(f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): a model saved without "
                         f"its tokenizer; save it there too (tokenizer.save_pretrained) or give model.tokenizer")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        # Padding positions carry no loss, so any id works; eos is the usual choice.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def load_model(path: str | None = None, config: dict | None = None, dtype: str = "float32", seed: int = 0):
    """A causal LM from a local directory, or randomly initialised (seeded) from a config dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import transformers

    dt = DTYPES[dtype]
    if path is not None:
        # (a path that is not a local folder goes to from_pretrained as a hub id)
        if os.path.isdir(path) and not is_saved_model(path):
            raise ValueError(f"model.path {path} holds no config.json (nor a LoRA adapter's adapter_config.json): "
                             f"not a saved model, or an unfinished download or copy")
        # transformers < 4.56 names the argument torch_dtype (and would ignore dtype=).
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        adapter = os.path.join(path, "adapter_config.json")
        if os.path.isfile(adapter):
            # A LoRA adapter (a LoRA run's final/ or checkpoint): its base model with the adapter on,
            # trainable, so that eval scores the trained adapter and train continues it.
            try:
                from peft import AutoPeftModelForCausalLM
            except ImportError as e:  # pragma: no cover - peft is in the hf extra
                raise ImportError(f"{path} holds a LoRA adapter, which needs peft: "
                                  f"pip install 'surgery-kernels[hf]'") from e
            with open(adapter) as f:
                base = json.load(f).get("base_model_name_or_path")
            if not base or not os.path.isdir(base):
                raise ValueError(f"{path} holds a LoRA adapter whose base model {base!r} is not a local directory "
                                 f"(a base built from model.config is not saved; a moved base must be found at "
                                 f"that path): load the base with model.path and the adapter with peft instead")
            return AutoPeftModelForCausalLM.from_pretrained(path, is_trainable=True, **{key: dt})
        return AutoModelForCausalLM.from_pretrained(path, **{key: dt})
    cfg = dict(config)
    try:
        cfg_obj = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    except Exception as e:  # transformers' own validation raises its own classes (StrictDataclass...Error)
        raise ValueError(f"model.config: {type(e).__name__}: {' '.join(str(e).split())}") from e
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg_obj)
    return model.to(dt)


def add_lora(model: nn.Module, lora: dict | None, seed: int = 0):
    """Wrap ``model`` with peft LoRA adapters (in place: the model object is modified), their
    random initialisation drawn from ``seed`` (not from the caller's global RNG state)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - peft is in the hf extra
        raise ImportError("LoRA needs peft: pip install 'surgery-kernels[hf]'") from e
    lora = _lora_settings(lora)
    targets = lora["target_modules"]
    if isinstance(targets, (list, tuple)):
        # peft adapts the names it finds and drops the others silently unless none is found: a typo
        # in one of them would train fewer adapters than asked for
        names = [n for n, _ in model.named_modules()]
        missing = [t for t in targets if not any(n == t or n.endswith("." + str(t)) for n in names)]
        if missing:
            layers = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if type(m).__name__ in ("Linear", "Conv1D") and n})
            raise ValueError(f"lora.target_modules: {missing} name no module of this model; its linear layers "
                             f"are named {layers} (or give target_modules: all-linear)")
    cfg = LoraConfig(r=int(lora["r"]), lora_alpha=float(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                     target_modules=targets, modules_to_save=lora["modules_to_save"], task_type="CAUSAL_LM")
    # peft initialises the adapters on the CPU and then moves them: the CPU generator is the one.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, cfg)


# The lora settings and their defaults (what add_lora makes an adapter with).
LORA_DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear", "modules_to_save": None}


def _lora_settings(lora: dict | None) -> dict:
    """``lora`` over LORA_DEFAULTS; an unknown key is refused."""
    unknown = set(lora or {}) - set(LORA_DEFAULTS)
    if unknown:
        raise ValueError(f"lora: unknown key(s) {sorted(unknown)}; expected some of {sorted(LORA_DEFAULTS)}")
    return {**LORA_DEFAULTS, **(lora or {})}


def lora_differences(model: nn.Module, lora: dict) -> list[str]:
    """How the ``lora`` settings differ from the active adapter ``model`` already carries (a LoRA
    run's final/, loaded): ``["r: 16 asked, 8 in the adapter", ...]``; empty when they agree, e.g.
    the same config evaluating or continuing its own run. Targets compare by module name (leaf),
    ``all-linear`` as every linear layer but the output layer and another string as a regular
    expression over the base model's module names (peft's rules). Unknown keys are refused, as
    when the settings make an adapter."""
    lora = _lora_settings(lora)
    cfg = model.peft_config[model.active_adapter]
    out = []
    for key, attr, cast in (("r", "r", int), ("alpha", "lora_alpha", float), ("dropout", "lora_dropout", float)):
        asked, has = cast(lora[key]), getattr(cfg, attr, None)
        if has is not None and asked != cast(has):
            out.append(f"{key}: {asked:g} asked, {cast(has):g} in the adapter")
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    targets = lora["target_modules"]
    if isinstance(targets, str):
        base = unwrap(model)
        head = base.get_output_embeddings()
        head_name = next((n for n, m in base.named_modules() if m is head), None)
        asked = set()
        for n, m in base.named_modules():  # the base model's layers, under peft's wrappers
            linear = isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
            if not (linear or isinstance(m, (nn.Embedding, nn.Conv1d, nn.Conv2d))) or ".lora_" in n \
                    or ".modules_to_save." in n or n.endswith(".original_module"):
                continue
            n = n.removesuffix(".base_layer")
            if targets == "all-linear":
                hit = linear and not (head_name and (n + ".").startswith(head_name + "."))
            else:
                hit = re.fullmatch(targets, n) is not None
            if hit:
                asked.add(n.rsplit(".", 1)[-1])
    else:
        asked = {str(t).rsplit(".", 1)[-1] for t in (targets if isinstance(targets, (list, tuple)) else [targets])}
    if adapted and asked != adapted:
        out.append(f"target_modules: {sorted(asked)} asked, {sorted(adapted)} in the adapter")
    saved, asked_saved = sorted(getattr(cfg, "modules_to_save", None) or []), sorted(lora["modules_to_save"] or [])
    if asked_saved != saved:
        out.append(f"modules_to_save: {asked_saved} asked, {saved} in the adapter")
    return out


def is_peft(model: nn.Module) -> bool:
    return type(model).__name__.startswith("Peft") and hasattr(model, "disable_adapter")


def select_trainable(model: nn.Module, trainable) -> list[str]:
    """Set ``requires_grad`` by the ``trainable`` option; return the trainable parameter names.

    "all": every parameter. "lora": what peft marked trainable (the adapters). A list of fnmatch
    patterns: parameters whose name matches one of them (e.g. ``["*layers.1[01].*", "lm_head.*"]``);
    under peft, a name matches with or without peft's ``base_model.model.`` prefix, so the same
    pattern picks the same layers with and without LoRA (``model.layers.1.*lora_*``).
    """
    names = [n for n, _ in model.named_parameters()]
    if trainable == "all":
        for p in model.parameters():
            p.requires_grad_(True)
    elif trainable == "lora":
        if not is_peft(model):
            raise ValueError("trainable='lora' needs LoRA adapters: give lora={r, alpha, target_modules}")
    elif isinstance(trainable, (list, tuple)) and trainable and all(isinstance(p, str) for p in trainable):
        hit = set()
        prefix = "base_model.model." if is_peft(model) else None
        for n, p in model.named_parameters():
            as_named = (n, n[len(prefix):]) if prefix and n.startswith(prefix) else (n,)
            on = any(fnmatch.fnmatchcase(m, pat) for m in as_named for pat in trainable)
            p.requires_grad_(on)
            if on:
                hit.add(n)
        if not hit:
            raise ValueError(f"trainable patterns {list(trainable)} match no parameter; names look like "
                             f"{names[:3]}")
    else:
        raise ValueError(f"trainable must be 'all', 'lora' or a list of parameter-name patterns, got {trainable!r}")
    out = [n for n, p in model.named_parameters() if p.requires_grad]
    if not out:
        raise ValueError("no trainable parameters")
    return out
