"""surgery_kernels.hf.patch against Hugging Face's own loss, on tiny random models.

Shapes: batch 2 x 13 tokens, vocab 97 (odd, prime: no power-of-two luck), hidden 32; patched
models use chunk_size=5 so the chunked path runs several (and a ragged last) chunk.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from conftest import RecordCreated
from surgery_kernels import hf
from surgery_kernels.backends import BACKENDS, availability

tf = pytest.importorskip("transformers")

B, T, V, H = 2, 13, 97, 32
CHUNK = 5


def _config(arch: str, vocab=V, **extra):
    common = dict(vocab_size=vocab, hidden_size=H, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if arch == "gpt2":
        # Dropout off: the comparison needs two identical forwards.
        return tf.GPT2Config(vocab_size=vocab, n_embd=H, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **extra)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig,
           "gemma2": tf.Gemma2Config, "granite": tf.GraniteConfig, "mixtral": tf.MixtralConfig}[arch]
    if arch == "gemma2":
        common["head_dim"] = 8
    return cls(**common, **extra)


def _model(arch: str, dtype=torch.float32, seed=0, **extra):
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(_config(arch, **extra)).to(dtype)


def _batch(seed=1, tokens=T, vocab=V):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, tokens), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    labels[1, -3:] = -100  # right padding
    return ids, labels


def _loss_and_grads(model, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _assert_same_loss_and_grads(ours, ref):
    (o, og), (r, rg) = ours, ref
    assert o.logits is None
    assert _rel(o.loss.detach(), r.loss.detach()) <= 1e-5, (o.loss.item(), r.loss.item())
    assert og.keys() == rg.keys()
    for name in rg:
        assert _rel(og[name], rg[name]) <= 1e-5, name


# Llama, Qwen2, Mistral, GPT-2 (the four), Gemma2 (logits softcapped after the head),
# Granite (logits divided by a scale): one mechanism, the last two folded from what it records;
# Mixtral with output_router_logits (the router's aux loss is part of HF's loss).
ARCHS = ["llama", "qwen2", "mistral", "gpt2", "gemma2", "granite", "mixtral"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_items", [None, 7], ids=["mean", "num_items_in_batch"])
def test_patched_loss_and_grads_equal_huggingface(arch, num_items):
    extra = {}
    if arch == "gemma2":
        extra["final_logit_softcapping"] = 2.0  # small cap: tanh is far from linear at these logits
    if arch == "granite":
        extra["logits_scaling"] = 4.0
    if arch == "mixtral":
        extra.update(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5)
    model = _model(arch, **extra)
    ids, labels = _batch()
    kwargs = dict(input_ids=ids, labels=labels)
    if num_items is not None:
        kwargs["num_items_in_batch"] = torch.tensor(num_items)
    ref = _loss_and_grads(model, **kwargs)
    assert ref[0].logits.shape == (B, T, V)
    hf.patch(model, backend="torch", chunk_size=CHUNK)
    _assert_same_loss_and_grads(_loss_and_grads(model, **kwargs), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_token_nll_equals_per_token_ce_of_the_logits(arch):
    """hf.token_nll on a patched model: per-token NLL (B, T) of the shifted labels, 0 where
    ignored and at the last position, equal to the cross-entropy of the unpatched model's logits
    (Gemma-2's softcapping and Granite's scaling folded in, Mixtral's router loss left out), with
    the same gradients for a per-sequence objective (an NPO-like sum with per-row upstream
    weights); a model that is not patched is refused."""
    extra = {"gemma2": {"final_logit_softcapping": 2.0}, "granite": {"logits_scaling": 4.0},
             "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                             router_aux_loss_coef=0.5)}.get(arch, {})
    model = _model(arch, **extra)
    ids, labels = _batch()
    att = torch.ones_like(ids)
    att[1, -2:] = 0
    with pytest.raises(ValueError, match="patch"):
        hf.token_nll(model, input_ids=ids, labels=labels)
    logits = model(input_ids=ids, attention_mask=att).logits
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    ref = torch.nn.functional.cross_entropy(logits.transpose(1, 2), shifted, reduction="none", ignore_index=-100)
    rows = torch.tensor([0.3, -1.7])
    model.zero_grad(set_to_none=True)
    (ref.sum(-1) * rows).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    hf.patch(model, backend="torch", chunk_size=CHUNK)
    model.zero_grad(set_to_none=True)
    ours = hf.token_nll(model, input_ids=ids, attention_mask=att, labels=labels, num_items_in_batch=torch.tensor(3))
    assert ours.shape == (B, T) and (ours[shifted == -100] == 0).all()
    assert _rel(ours.detach(), ref.detach()) <= 1e-5
    (ours.sum(-1) * rows).sum().backward()
    for n, g in ref_grads.items():
        assert _rel(dict(model.named_parameters())[n].grad, g) <= 1e-5, n


def test_token_nll_through_wrappers():
    """token_nll calls the model, so a wrapper around the patched model runs: torch.compile's
    (the patch is found on the compiled module's original) and forward hooks; the result equals
    the bare patched model's."""
    model = _model("llama")
    ids, labels = _batch()
    hf.patch(model, backend="torch")
    bare = hf.token_nll(model, input_ids=ids, labels=labels)
    seen = []
    handle = model.register_forward_hook(lambda *a: seen.append(1))
    assert torch.equal(hf.token_nll(model, input_ids=ids, labels=labels), bare) and seen == [1]
    handle.remove()
    compiled = torch.compile(model, backend="eager")
    assert torch.allclose(hf.token_nll(compiled, input_ids=ids, labels=labels), bare, rtol=1e-6, atol=0)
    # token_kl hands the model a function to run on the head inputs: through torch.compile too
    reference = hf.patch(_model("llama", seed=1), backend="torch")
    kl = hf.token_kl(model, reference, input_ids=ids)
    assert torch.allclose(hf.token_kl(compiled, reference, input_ids=ids), kl, rtol=1e-6, atol=0)


def _logits_kl(logits, ref_logits, direction, temperature, dtype=torch.float64):
    logq = torch.log_softmax(logits.to(dtype) / temperature, -1)
    logp = torch.log_softmax(ref_logits.to(dtype) / temperature, -1)
    if direction == "forward":
        return (logp.exp() * (logp - logq)).sum(-1)
    return (logq.exp() * (logq - logp)).sum(-1)


def _assert_kl_close(got, logits, ref_logits, direction, temperature, mask=1):
    """Against the KL of the logits in float64, within twice plain PyTorch's float32 error: these
    KLs are small next to the logits (near models), so float32 statistics cancel (~1e-4 relative
    here) in any implementation."""
    exact = _logits_kl(logits, ref_logits, direction, temperature) * mask
    plain = _logits_kl(logits, ref_logits, direction, temperature, torch.float32) * mask
    assert _rel(got.detach(), exact.detach()) <= 2 * _rel(plain.detach(), exact.detach()) + 1e-6


@pytest.mark.parametrize("arch,ref_arch,direction", [("llama", "llama", "forward"), ("granite", "granite", "reverse"),
                                                      ("gemma2", "gemma2", "forward"), ("gemma2", "llama", "reverse")])
def test_token_kl_equals_the_kl_of_the_logits(arch, ref_arch, direction):
    """hf.token_kl(model, reference, **batch): per-token KL between two patched models (Granite's
    logit scaling and Gemma-2's softcap folded in on each side that has them: Gemma-2 against
    Gemma-2, and against an uncapped Llama), 0 outside the attention mask, equal to the KL of
    their logits at temperature 2 with the same gradients; head_inputs gives the pieces."""
    extras = {"granite": {"logits_scaling": 4.0}, "gemma2": {"final_logit_softcapping": 2.0}}
    model, ref = _model(arch, seed=0, **extras.get(arch, {})), _model(ref_arch, seed=1, **extras.get(ref_arch, {}))
    ids, _ = _batch()
    att = torch.ones_like(ids)
    att[1, -3:] = 0
    logits, ref_logits = model(input_ids=ids, attention_mask=att).logits, ref(input_ids=ids, attention_mask=att).logits
    up = torch.linspace(0.5, 1.5, T)
    want = {}  # parameter gradients through the logits' KL in float64 ("exact") and float32 ("plain")
    for name, dt in (("exact", torch.float64), ("plain", torch.float32)):
        grads = torch.autograd.grad((_logits_kl(logits, ref_logits.detach(), direction, 2.0, dt) * att * up).sum(),
                                    list(model.parameters()), retain_graph=True, allow_unused=True)
        want[name] = {n: g for (n, _), g in zip(model.named_parameters(), grads) if g is not None}
    for m in (model, ref):
        hf.patch(m, backend="torch", chunk_size=CHUNK)
    model.zero_grad(set_to_none=True)
    got = hf.token_kl(model, ref, input_ids=ids, attention_mask=att, direction=direction, temperature=2.0)
    assert got.shape == (B, T) and (got[att == 0] == 0).all()
    _assert_kl_close(got, logits, ref_logits, direction, 2.0, att)
    (got * up).sum().backward()
    params = dict(model.named_parameters())
    for n, g in want["exact"].items():
        assert _rel(params[n].grad, g) <= 2 * _rel(want["plain"][n], g) + 1e-6, n
    pieces = hf.head_inputs(model, input_ids=ids, attention_mask=att, labels=ids)
    assert pieces.hidden.shape == (B, T, H)
    assert pieces.softcap == (pytest.approx(2.0) if arch == "gemma2" else None)


def test_token_kl_against_the_adapters_off_reference():
    """A LoRA model against itself with adapters off (the reference passed as HeadInputs): the KL
    of the two logits, gradients reaching only the adapters."""
    peft = pytest.importorskip("peft")
    base = _model("llama")
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # adapters that change the model
    ids, _ = _batch()
    with torch.no_grad(), model.disable_adapter():
        ref_logits = model(input_ids=ids).logits
    logits = model(input_ids=ids).logits
    expect = _logits_kl(logits, ref_logits, "forward", 1.0)
    hf.patch(model, backend="torch")
    with torch.no_grad(), model.disable_adapter():
        ref = hf.head_inputs(model, input_ids=ids)
    got = hf.token_kl(model, ref, input_ids=ids)
    assert expect.min() > 0
    _assert_kl_close(got, logits, ref_logits, "forward", 1.0)
    got.sum().backward()
    assert all((p.grad is not None) == ("lora_" in n) for n, p in model.named_parameters() if p.requires_grad)


def test_head_inputs_reference_is_a_snapshot():
    """Under no_grad head_inputs gives a snapshot: an optimizer step on a trained head after it
    leaves a reference taken before unchanged (the KL against it is the KL against the old model,
    not 0). token_kl takes a reference in another dtype (a bf16 model against a float32 one) and an
    integer mask."""
    model = hf.patch(_model("llama"), backend="torch")
    ids, _ = _batch()
    with torch.no_grad():
        ref = hf.head_inputs(model, input_ids=ids)
        before = model(input_ids=ids, labels=ids)  # the patched loss: logits None; keep the model as it was
    assert before.logits is None
    w0 = ref.weight.clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert torch.equal(ref.weight, w0) and not torch.equal(model.lm_head.weight, w0)
    assert hf.token_kl(model, ref, input_ids=ids).min() > 0
    low = hf.patch(_model("llama", dtype=torch.bfloat16), backend="torch")
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kl = hf.token_kl(low, hf.patch(_model("llama", seed=1), backend="torch"), input_ids=ids, mask=mask)
    assert kl.dtype == torch.float32 and (kl[0, :3] == 0).all() and (kl[mask.bool()] > 0).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_head_inputs_and_token_nll_build_no_kv_cache(arch):
    """head_inputs, token_kl and token_nll return no cache, so they run the model with
    use_cache=False (a no_grad reference would otherwise keep every layer's keys and values to the
    end of its forward); a batch's own use_cache wins; the plain labelled loss is left as the model
    runs it."""
    model = hf.patch(_model(arch), backend="torch")
    assert model.config.use_cache
    seen = []
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.transformer
    decoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("use_cache")), with_kwargs=True)
    ids, labels = _batch()
    with torch.no_grad():
        hf.head_inputs(model, input_ids=ids)
        hf.token_nll(model, input_ids=ids, labels=labels)
        hf.token_kl(model, model, input_ids=ids)
        hf.head_inputs(model, input_ids=ids, use_cache=True)
        out = model(input_ids=ids, labels=labels)
    assert seen == [False, False, False, False, True, None]
    assert out.past_key_values is not None  # the labelled call still builds the cache the config asks for


def test_a_head_released_after_its_forward_is_refused_clearly():
    """A wrapper that empties the head's weight when its forward returns (DeepSpeed ZeRO-3 does,
    simulated by a forward hook) would leave the loss reading freed memory: refused, naming it.
    (FSDP2's fully_shard(model.lm_head) is supported: tests/test_fsdp.py.)"""
    model = hf.patch(_model("llama"), backend="torch")
    ids, labels = _batch()
    keep = model.lm_head.weight.data

    def release(module, args, out):
        module.weight.data = torch.empty(0)
    handle = model.lm_head.register_forward_hook(release)
    for call in (lambda: model(input_ids=ids, labels=labels), lambda: hf.token_nll(model, input_ids=ids, labels=labels),
                 lambda: hf.token_kl(model, model, input_ids=ids)):
        with pytest.raises(NotImplementedError, match="weight was released when their forward returned"):
            call()
        model.lm_head.weight.data = keep
    handle.remove()
    assert torch.isfinite(model(input_ids=ids, labels=labels).loss)


def test_token_kl_names_an_unpatched_reference():
    """An unpatched reference was reported as head_inputs needing "a model patched": the user
    called token_kl, and its reference is what needs patching (or its HeadInputs)."""
    model = hf.patch(_model("llama"), backend="torch")
    ids, _ = _batch()
    with pytest.raises(ValueError, match=r"token_kl: reference \(LlamaForCausalLM\) is not patched"):
        hf.token_kl(model, _model("llama", seed=1), input_ids=ids)
    with pytest.raises(TypeError, match="token_kl: reference must be a patched model or its HeadInputs"):
        hf.token_kl(model, torch.zeros(3), input_ids=ids)
    with pytest.raises(ValueError, match="token_kl needs a model patched") as info:
        hf.token_kl(_model("llama"), model, input_ids=ids)
    # which model, and the likely cause: a copy made before patching
    assert "this LlamaForCausalLM is not" in str(info.value) and "copy made before patching" in str(info.value)
    with pytest.raises(ValueError, match="token_nll needs a model patched.*this LlamaForCausalLM is not"):
        hf.token_nll(hf.unpatch(hf.patch(_model("llama"))), input_ids=ids, labels=ids)


def test_token_kl_reductions():
    """reduction="sum" / "mean" (over the scored tokens): the (B, T) values' sum / masked mean
    and the same gradients; another reduction, and a float mask (a weight would be read as
    yes/no), are refused by name."""
    model, ref = _model("llama", seed=0), _model("llama", seed=1)
    for m in (model, ref):
        hf.patch(m, backend="torch", chunk_size=CHUNK)
    ids, _ = _batch()
    att = torch.ones_like(ids)
    att[1, -3:] = 0
    grads = {}
    for reduction in ("none", "sum", "mean"):
        model.zero_grad(set_to_none=True)
        out = hf.token_kl(model, ref, input_ids=ids, attention_mask=att, reduction=reduction)
        if reduction == "none":
            values = out.detach()
            out = out.sum() / att.sum()
        else:
            assert out.dim() == 0
            want = values.sum() / (att.sum() if reduction == "mean" else 1)
            assert torch.allclose(out.detach(), want, rtol=1e-6, atol=0), reduction
            if reduction == "sum":
                out = out / att.sum()
        out.backward()
        grads[reduction] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for reduction in ("sum", "mean"):
        assert len(grads[reduction]) == len(grads["none"])
        for g, want in zip(grads[reduction], grads["none"]):
            assert _rel(g, want) <= 1e-5, reduction
    with pytest.raises(ValueError, match="reduction must be one of"):
        hf.token_kl(model, ref, input_ids=ids, reduction="batchmean")
    with pytest.raises(TypeError, match="mask must be a bool or integer tensor.*token_weight"):
        hf.token_kl(model, ref, input_ids=ids, mask=att * 0.5)


def test_eval_mode_returns_logits_for_metrics_unless_told_not_to():
    """In eval mode under no_grad (Trainer.evaluate, predict) a labelled call returns the logits
    and the loss made from them, as the unpatched model does — compute_metrics needs them (labels
    given by keyword or by position); with gradients enabled (training with dropout off) and with
    eval_logits=False the loss stays fused; token_nll never makes logits; training mode is fused."""
    ref = _model("llama")
    ids, labels = _batch()
    want = ref(input_ids=ids, labels=labels)
    model = hf.patch(copy.deepcopy(ref), backend="torch")
    model.eval()
    with torch.no_grad():
        got = model(input_ids=ids, labels=labels)
        positional = model(ids, None, None, None, None, labels)  # LlamaForCausalLM.forward's 6th: labels
    assert got.logits is not None and torch.equal(got.logits, want.logits) and torch.equal(got.loss, want.loss)
    assert torch.equal(positional.loss, want.loss) and positional.logits is not None
    grad = model(input_ids=ids, labels=labels)
    assert grad.logits is None and torch.allclose(grad.loss, want.loss, rtol=1e-6, atol=0)
    assert hf.token_nll(model, input_ids=ids, labels=labels).shape == labels.shape
    hf.patch(model, backend="torch", eval_logits=False)
    with torch.no_grad():
        fused = model(input_ids=ids, labels=labels)
    assert fused.logits is None and torch.allclose(fused.loss, want.loss, rtol=1e-6, atol=0)
    assert model.train()(input_ids=ids, labels=labels).logits is None
    with pytest.raises(TypeError, match="eval_logits"):
        hf.patch(model, eval_logits="yes")


def test_trainer_evaluate_with_compute_metrics(tmp_path):
    """The stock Trainer evaluates a patched model with compute_metrics as it does the unpatched
    one (the same metrics), and trains it without logits."""
    from transformers import Trainer, TrainingArguments

    ids, labels = _batch()
    data = [{"input_ids": i, "labels": l} for i, l in zip(ids, labels)]
    seen = []

    def metrics(pred):
        seen.append(pred.predictions.shape)
        logits, lab = torch.as_tensor(pred.predictions), torch.as_tensor(pred.label_ids)
        ok = (logits[:, :-1].argmax(-1) == lab[:, 1:])[lab[:, 1:] != -100]
        return {"accuracy": ok.float().mean().item()}

    results = []
    for patched in (False, True):
        model = _model("llama")
        if patched:
            hf.patch(model, backend="torch")
        args = TrainingArguments(output_dir=str(tmp_path / str(patched)), per_device_eval_batch_size=2, report_to=[],
                                 use_cpu=True, max_steps=1, per_device_train_batch_size=2, save_strategy="no")
        trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, compute_metrics=metrics)
        results.append(trainer.evaluate())
        trainer.train()
    assert seen == [(B, T, V)] * 2
    assert results[1]["eval_accuracy"] == results[0]["eval_accuracy"]
    assert results[1]["eval_loss"] == pytest.approx(results[0]["eval_loss"], rel=1e-6)


def test_patch_survives_pickle_and_accelerate_unwrap(tmp_path):
    """torch.save(model) keeps the patch (a bound method pickled as getattr(model, "forward")
    came back as the class's forward, unpatched while is_patched said True); so does accelerate's
    unwrap_model(keep_fp32_wrapper=False), which walks the forward's __wrapped__ chain; the
    Trainer still reads the model's own signature."""
    model = hf.patch(_model("llama"), backend="torch")
    ids, labels = _batch()
    want = model(input_ids=ids, labels=labels).loss
    assert list(inspect.signature(model.forward).parameters)[:2] == ["input_ids", "attention_mask"]
    torch.save(model, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    out = back(input_ids=ids, labels=labels)
    assert hf.is_patched(back) and out.logits is None and torch.equal(out.loss, want)
    assert back.forward.__self__ is back and back.lm_head.forward.__self__ is back.lm_head
    hf.unpatch(back)
    assert "forward" not in back.__dict__ and back(input_ids=ids, labels=labels).logits is not None
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a Trainer in this process set it up already
    try:
        acc = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
        prepared = acc.prepare(model)
        assert prepared(input_ids=ids, labels=labels).logits is None
        bare = acc.unwrap_model(prepared, keep_fp32_wrapper=False)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    out = bare(input_ids=ids, labels=labels)
    assert out.logits is None and torch.equal(out.loss, want)


def test_changed_output_embeddings_are_named():
    """Output embeddings replaced after patch (resize_token_embeddings of an untied head) or
    wrapped by peft are named in the error, with what to do; peft on lm_head at patch time too."""
    model = hf.patch(_model("llama"), backend="torch")
    ids, labels = _batch()
    model.resize_token_embeddings(V + 3)
    with pytest.raises(RuntimeError, match="replaced since patch .* call surgery_kernels.hf.patch"):
        model(input_ids=ids, labels=labels)
    hf.patch(model, backend="torch")
    assert model(input_ids=ids, labels=labels).logits is None
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(TypeError, match="peft wrapper: LoRA or modules_to_save on the output embeddings"):
        hf.patch(lora)
    inner = hf.patch(_model("llama"), backend="torch")
    lora = peft.get_peft_model(inner, peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(RuntimeError, match="peft wrapper on lm_head"):
        lora(input_ids=ids, labels=labels)


def test_vision_language_moe_router_loss_coefficient():
    """Vision-language MoE models keep router_aux_loss_coef in config.text_config; the patched
    loss adds it as they do (it was refused as missing)."""
    cls = getattr(tf, "Qwen3VLMoeForConditionalGeneration", None)
    if cls is None:
        pytest.skip("this transformers has no Qwen3-VL-MoE")
    cfg = tf.Qwen3VLMoeConfig(
        text_config=dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                         intermediate_size=64, output_router_logits=True, router_aux_loss_coef=0.3,
                         max_position_embeddings=64, rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=H, patch_size=4,
                           temporal_patch_size=1, spatial_merge_size=1))
    torch.manual_seed(0)
    model = cls(cfg)
    ids, labels = _batch()
    # asked for by keyword: transformers 5.17 (the GPU image's) does not read the top-level call's
    # default from text_config.output_router_logits, later releases do
    want = model(input_ids=ids, labels=labels, output_router_logits=True)
    assert want.aux_loss is not None and want.aux_loss > 0
    got = hf.patch(model, backend="torch")(input_ids=ids, labels=labels, output_router_logits=True)
    assert got.logits is None and torch.allclose(got.loss, want.loss, rtol=1e-6, atol=0)


def test_token_kl_against_an_inference_mode_reference():
    """A reference taken under torch.inference_mode() (inference tensors, which autograd cannot
    save) gives the same KL and gradients as one taken under no_grad."""
    model = hf.patch(_model("llama"), backend="torch")
    reference = hf.patch(_model("llama", seed=1), backend="torch")
    ids, _ = _batch()
    grads = []
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            ref = hf.head_inputs(reference, input_ids=ids)
        model.zero_grad(set_to_none=True)
        hf.token_kl(model, ref, input_ids=ids).sum().backward()
        grads.append(model.lm_head.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_head_inputs_through_accelerate_mixed_precision_keep_the_model_dtype():
    """accelerate's mixed-precision wrapper converts a forward's bf16 outputs to float32, which
    made head_inputs return a float32 copy of the whole weight (and float32 GEMMs after): the
    weight is the head's own parameter again, the hidden states back in bf16, and the gradients
    are those of the unwrapped model."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    ids, _ = _batch()
    grads = []
    for wrap in (False, True):
        model = hf.patch(_model("llama", dtype=torch.bfloat16), backend="torch")
        AcceleratorState._reset_state(reset_partial_state=True)
        try:
            run = accelerate.Accelerator(cpu=True, mixed_precision="bf16").prepare(model) if wrap else model
            got = hf.head_inputs(run, input_ids=ids)
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
        assert got.weight is model.lm_head.weight and got.hidden.dtype == torch.bfloat16
        from surgery_kernels import linear_cross_entropy
        linear_cross_entropy(got.hidden, got.weight, ids, backend="torch").backward()
        grads.append(model.lm_head.weight.grad.float())
        with torch.no_grad():
            snap = hf.head_inputs(run, input_ids=ids)
        assert snap.weight.dtype == torch.bfloat16 and torch.equal(snap.weight, model.lm_head.weight)
    assert torch.equal(grads[0], grads[1])


def test_unpatch_and_repatch_under_an_accelerate_hook():
    """A hook accelerate adds after patch (cpu_offload, dispatch_model, add_hook_to_module) wraps
    the patched forward and copies its attributes: unpatch leaves that wrapper (and its hook) in
    place, the model works after the hook is removed, and patching again (to change options) keeps
    the hook running once instead of recursing."""
    hooks = pytest.importorskip("accelerate.hooks")
    calls = []

    class Count(hooks.ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(1)
            return args, kwargs

    ids, labels = _batch()
    model = hf.patch(_model("llama"), backend="torch")
    hooks.add_hook_to_module(model, Count())
    hf.unpatch(model)
    assert model(input_ids=ids, labels=labels).logits is not None and calls == [1]
    hooks.remove_hook_from_module(model)
    assert model(input_ids=ids, labels=labels).logits is not None and calls == [1]
    again = hf.patch(_model("llama"), backend="torch")
    hooks.add_hook_to_module(again, Count())
    hf.patch(again, backend="torch", eval_logits=False)
    assert again(input_ids=ids, labels=labels).logits is None and calls == [1, 1]


def _backend_cases():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [pytest.param(b, dev, id=f"{b}-{dev}", marks=[pytest.mark.cuda] if dev == "cuda" else [])
            for dev in devices for b in BACKENDS if availability(b, dev).ok]


@pytest.mark.parametrize("backend,device", _backend_cases())
def test_every_available_backend(backend, device):
    model = _model("llama").to(device)
    ids, labels = (t.to(device) for t in _batch())
    ref = _loss_and_grads(model, input_ids=ids, labels=labels)
    hf.patch(model, backend=backend)
    _assert_same_loss_and_grads(_loss_and_grads(model, input_ids=ids, labels=labels), ref)


def test_without_labels_and_after_unpatch_the_model_is_unchanged():
    model = _model("llama")
    ids, labels = _batch()
    head = model.get_output_embeddings()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        ref_loss = model(input_ids=ids, labels=labels).loss
        generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert hf.patch(model) is model and hf.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)
        assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False), generated)
    hf.unpatch(model)
    assert not hf.is_patched(model)
    # Nothing of the patch is left on the instances: the class forwards run again.
    assert "forward" not in vars(model) and "forward" not in vars(head)
    assert not hasattr(model, hf._ATTR) and not hasattr(head, hf._ATTR)
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    assert torch.equal(out.logits, logits) and torch.equal(out.loss, ref_loss)
    assert hf.unpatch(model) is model  # unpatching twice is harmless


def test_forward_wrapped_by_others_before_and_after_patching():
    """Tools such as accelerate replace model.forward on the instance: patch wraps what is there,
    and unpatch after a later wrap leaves that wrap working (ours becomes a pass-through)."""
    model = _model("llama")
    ids, labels = _batch()
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels)
    calls = []

    def wrap(fwd):
        def wrapped(*args, **kwargs):
            calls.append(1)
            return fwd(*args, **kwargs)
        return wrapped

    model.forward = before = wrap(model.forward)
    hf.patch(model, backend="torch")
    model.forward = wrap(model.forward)
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    assert len(calls) == 2 and out.logits is None and _rel(out.loss, ref.loss) <= 1e-5
    hf.unpatch(model)
    assert not hf.is_patched(model)
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    assert len(calls) == 4 and torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
    # Patched again and unpatched while ours is on top: the earlier wrap is what remains.
    model = _model("llama")
    model.forward = before = wrap(model.forward)
    hf.unpatch(hf.patch(model))
    assert vars(model)["forward"] is before


def test_patch_twice_replaces_the_options_and_unpatch_still_restores():
    model = _model("llama")
    hf.patch(model, chunk_size=3)
    hf.patch(model, backend="torch", chunk_size=CHUNK)
    assert getattr(model, hf._ATTR).chunk_size == CHUNK
    hf.unpatch(model)
    assert "forward" not in vars(model) and "forward" not in vars(model.get_output_embeddings())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_no_logits_sized_tensor_in_a_patched_forward_and_backward(arch):
    # More tokens (B*T = 58 > H) and a larger vocabulary than elsewhere, so that the logits
    # (B*T*V = 59,798 elements) are bigger than any weight (V*H = 32,992) or attention matrix.
    tokens, vocab = 29, 1031
    model = _model(arch, vocab=vocab)
    ids, labels = _batch(tokens=tokens, vocab=vocab)

    def biggest():
        model.zero_grad(set_to_none=True)
        with RecordCreated() as rec:
            model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
        return rec.largest()[0]

    # The detector sees the logits of the plain model...
    assert biggest() >= B * tokens * vocab
    hf.patch(model, backend="torch", chunk_size=CHUNK)
    # ...and none in the patched one: the largest is a weight or its gradient (V x H); a chunk of
    # logits (CHUNK x V) is smaller still.
    assert biggest() <= vocab * H < B * tokens * vocab


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_return_dict_false_keeps_the_model_tuple_positions(arch):
    """The model's own tuple with None for the logits: every other entry where the model puts it
    (`loss, logits, cache = out`; Mixtral's aux_loss comes before its logits)."""
    extra = dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True) if arch == "mixtral" else {}
    model = _model(arch, **extra)
    ids, labels = _batch()
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels, return_dict=False, use_cache=True)
        at = list(model(input_ids=ids, labels=labels, use_cache=True).keys()).index("logits")
        hf.patch(model, backend="torch")
        out = model(input_ids=ids, labels=labels, return_dict=False, use_cache=True)
    assert isinstance(out, tuple) and isinstance(ref, tuple)
    assert len(out) == len(ref) and out[at] is None and ref[at].shape == (B, T, V)
    assert _rel(out[0], ref[0]) <= 1e-5
    assert [type(x) for i, x in enumerate(out) if i != at] == [type(x) for i, x in enumerate(ref) if i != at]
    if arch == "mixtral":
        assert at == 2 and _rel(out[1], ref[1]) <= 1e-6  # loss, aux_loss, logits, ...


def test_positional_labels_and_shift_labels():
    model = _model("llama")
    ids, labels = _batch()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    shift[0, 5] = -100
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels).loss
        ref_shift = model(input_ids=ids, labels=labels, shift_labels=shift).loss
        hf.patch(model, backend="torch")
        # LlamaForCausalLM.forward(input_ids, attention_mask, position_ids, cache, inputs_embeds, labels)
        positional = model(ids, None, None, None, None, labels).loss
        shifted = model(input_ids=ids, labels=labels, shift_labels=shift).loss
    assert _rel(positional, ref) <= 1e-5
    assert _rel(shifted, ref_shift) <= 1e-5 and _rel(shifted, ref) > 1e-4


def test_bad_labels_are_named_where_the_caller_put_them():
    """An out-of-range label is reported as `labels` at its own index (the loss sees it shifted one
    to the left, as `target`); a label at position 0, which predicts nothing, is not used, as in
    Hugging Face's loss."""
    model = _model("llama")
    ids, labels = _batch()
    hf.patch(model, backend="torch")
    bad = labels.clone()
    bad[1, 5] = V
    with pytest.raises(ValueError, match=rf"labels must hold class ids in \[0, {V}\).*found {V} at index \(1, 5\)"):
        model(input_ids=ids, labels=bad)
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    shift[0, 2] = -5
    with pytest.raises(ValueError, match=r"shift_labels must hold class ids.*found -5 at index \(0, 2\)"):
        model(input_ids=ids, labels=labels, shift_labels=shift)
    with pytest.raises(TypeError, match="labels must hold integer class ids"):
        model(input_ids=ids, labels=labels.float())
    first = labels.clone()
    first[1, 0] = V
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, labels=first).loss, model(input_ids=ids, labels=labels).loss)


def test_bf16_error_no_worse_than_huggingface():
    """bf16 model: both losses against float64 CE of the same hidden states that reach the head."""
    model = _model("llama", dtype=torch.bfloat16)
    ids, labels = _batch()
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        theirs = model(input_ids=ids, labels=labels).loss
    hook.remove()
    z = seen[0].double() @ model.get_output_embeddings().weight.double().t()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    exact = torch.nn.functional.cross_entropy(z.reshape(-1, V), shift.reshape(-1), ignore_index=-100)
    hf.patch(model, backend="torch", chunk_size=CHUNK)
    with torch.no_grad():
        ours = model(input_ids=ids, labels=labels).loss
    assert abs(ours.double() - exact) <= 2 * abs(theirs.double() - exact) + 1e-6


def test_gradient_checkpointing():
    model = _model("llama")
    # Renamed activation_checkpointing_enable in transformers 5.2x; the GPU image has 5.17.
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    ids, labels = _batch()
    ref = _loss_and_grads(model, input_ids=ids, labels=labels, use_cache=False)
    hf.patch(model, backend="torch", chunk_size=CHUNK)
    _assert_same_loss_and_grads(_loss_and_grads(model, input_ids=ids, labels=labels, use_cache=False), ref)


def test_deepcopy_of_a_patched_model_runs_the_copy():
    model = hf.patch(_model("llama"), backend="torch")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.get_output_embeddings().weight.mul_(3)
        ids, labels = _batch()
        a = model(input_ids=ids, labels=labels)
        b = twin(input_ids=ids, labels=labels)
    assert a.logits is None and b.logits is None
    assert _rel(a.loss, b.loss) > 1e-3
    assert hf.is_patched(twin)


def test_peft_lora_patched_before_or_after_wrapping():
    peft = pytest.importorskip("peft")
    ids, labels = _batch()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ref_model = peft.get_peft_model(_model("llama"), lora)
    ref = _loss_and_grads(ref_model, input_ids=ids, labels=labels)
    # After wrapping: the PeftModel's forward is patched.
    after = hf.patch(peft.get_peft_model(_model("llama"), copy.deepcopy(lora)), backend="torch", chunk_size=CHUNK)
    # Before wrapping: peft calls the inner model's forward directly, which is the patched one.
    before = peft.get_peft_model(hf.patch(_model("llama"), backend="torch", chunk_size=CHUNK), copy.deepcopy(lora))
    for m in (after, before):
        torch.manual_seed(0)
        # init_lora_weights=False draws random adapters: give all three the same ones.
        m.load_state_dict(ref_model.state_dict())
        _assert_same_loss_and_grads(_loss_and_grads(m, input_ids=ids, labels=labels), ref)


def test_peft_prompt_tuning_patches_its_base_model():
    """Prompt tuning prepends virtual tokens and pads the labels for them inside peft's forward:
    patching the PeftModel is refused with what to do (it failed on a label shape, blaming
    logits_to_keep), and patching the model under it gives peft's own loss and gradients."""
    peft = pytest.importorskip("peft")
    ids, labels = _batch()
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    ref_model = peft.get_peft_model(_model("llama"), cfg)
    ref = _loss_and_grads(ref_model, input_ids=ids, labels=labels)
    model = peft.get_peft_model(_model("llama"), copy.deepcopy(cfg))
    model.load_state_dict(ref_model.state_dict())
    with pytest.raises(NotImplementedError, match=r"prompt-learning.*hf.patch\(model.get_base_model\(\)\)"):
        hf.patch(model, backend="torch")
    hf.patch(model.get_base_model(), backend="torch", chunk_size=CHUNK)
    _assert_same_loss_and_grads(_loss_and_grads(model, input_ids=ids, labels=labels), ref)
    assert ref[1].keys() == {"prompt_encoder.default.embedding.weight"}


class _ToyLM(torch.nn.Module):
    """A minimal causal LM: any module with get_output_embeddings() and a labels argument works."""

    def __init__(self, transform):
        super().__init__()
        self.embed = torch.nn.Embedding(V, H)
        self.head = torch.nn.Linear(H, V)
        self.transform = transform

    def get_output_embeddings(self):
        return self.head

    # No return_dict argument, no **kwargs: patch must not pass it either.
    def forward(self, input_ids, labels=None):
        logits = self.transform(self.head(self.embed(input_ids)))
        loss = None
        if labels is not None:
            shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, V), shift.reshape(-1))
        return tf.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)


@pytest.mark.parametrize("transform", [
    pytest.param(lambda z: z, id="identity"),
    pytest.param(lambda z: 2.5 * z.float(), id="rmul-float"),
    pytest.param(lambda z: torch.tanh(z / 0.7 * 2) * 0.7, id="scaled-softcap"),
])
def test_toy_model_with_bias_and_folded_transforms(transform):
    torch.manual_seed(0)
    model = _ToyLM(transform)
    ids, labels = _batch()
    ref = _loss_and_grads(model, input_ids=ids, labels=labels)
    hf.patch(model, backend="torch", chunk_size=CHUNK)
    _assert_same_loss_and_grads(_loss_and_grads(model, input_ids=ids, labels=labels), ref)


@pytest.mark.parametrize("transform", [
    pytest.param(lambda z: z[..., :50], id="slice"),
    pytest.param(lambda z: z + 1.0, id="shift"),
    pytest.param(lambda z: torch.tanh(z) * torch.ones(()), id="tensor-scale"),
    pytest.param(lambda z: torch.tanh(torch.tanh(z)), id="double-tanh"),
    pytest.param(lambda z: z.detach().new_zeros(B, T, V), id="replaced"),
])
def test_unknown_logit_transforms_are_refused(transform):
    model = hf.patch(_ToyLM(transform), backend="torch")
    ids, labels = _batch()
    with pytest.raises(NotImplementedError, match="surgery_kernels.hf.patch"):
        model(input_ids=ids, labels=labels)
    # Without labels nothing is intercepted.
    if transform(torch.zeros(B, T, V)).shape == (B, T, V):
        assert model(input_ids=ids).logits.shape == (B, T, V)


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        hf.patch(_model("llama"), backend="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        hf.patch(_model("llama"), chunk_size=0)
    with pytest.raises(TypeError, match="model"):
        hf.patch(torch.nn.Linear(2, 2))
    toy = _ToyLM(lambda z: z)
    toy.head = torch.nn.Sequential(torch.nn.Linear(H, V))
    with pytest.raises(TypeError, match="nn.Linear"):
        hf.patch(toy)
    model = _model("llama")
    model.loss_function = lambda *a, **k: 0
    with pytest.raises(ValueError, match="loss_function"):
        hf.patch(model)
    model = _model("llama")
    model.config.z_loss_coefficient = 1e-4  # as Bamba's: computed from the logits
    with pytest.raises(ValueError, match="z_loss"):
        hf.patch(model)


def test_models_with_a_loss_of_their_own_are_refused():
    """Every PreTrainedModel has a ``loss_function`` property, but Bart-family and TrOCR
    ``*ForCausalLM`` compute an unshifted CE of their own, and encoder-decoder models their own
    loss: patching them silently made the loss a shifted CE (10% off on BartForCausalLM)."""
    small = dict(vocab_size=V, d_model=32, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
                 max_position_embeddings=64)
    for cfg in (tf.BartConfig(encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64, is_decoder=True,
                              **small), tf.TrOCRConfig(is_decoder=True, **small)):
        model = tf.AutoModelForCausalLM.from_config(cfg)
        with pytest.raises(ValueError, match=f"{type(model).__name__}.forward computes its loss without"):
            hf.patch(model)
    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                   num_heads=4))
    with pytest.raises(ValueError, match="encoder-decoder"):
        hf.patch(t5)


def test_data_parallel_replicas_are_refused():
    """nn.DataParallel's replicas copy the module's __dict__, so each would run the patch bound to
    the original module (its weights, its device): refused when DataParallel replicates (HF
    Trainer does on several GPUs without torchrun), and possible again after unpatch."""
    model = hf.patch(_model("llama"), backend="torch")
    for module in (model, model.get_output_embeddings()):
        with pytest.raises(RuntimeError, match="DataParallel is not supported.*torchrun"):
            module._replicate_for_data_parallel()
    import pickle

    again = pickle.loads(pickle.dumps(model))  # the refusal pickles (a module-level function)
    with pytest.raises(RuntimeError, match="DataParallel"):
        again._replicate_for_data_parallel()
    hf.unpatch(model)
    assert model._replicate_for_data_parallel().forward.__func__ is type(model).forward


def test_labels_not_matching_the_tokens_at_the_head():
    model = hf.patch(_model("llama"), backend="torch")
    ids, labels = _batch()
    with pytest.raises(ValueError, match="labels.*logits_to_keep"):
        model(input_ids=ids, labels=labels, logits_to_keep=1)


def test_model_scoring_only_part_of_its_head_positions_is_named():
    """Git's own loss skips the image tokens before the text: the patched loss cannot line its
    labels up, and says why (it blamed logits_to_keep, which was not involved)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GitConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=16, patch_size=8),
                       vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)
    model = hf.patch(tf.GitForCausalLM(cfg).train(), backend="torch")
    ids = torch.randint(3, 100, (2, 12))
    with pytest.raises(ValueError, match=r"labels must have the shape.*image features.*unpatch"):
        model(input_ids=ids, pixel_values=torch.randn(2, 3, 16, 16), labels=ids)


def test_a_trl_fused_head_call_passes_through():
    """TRL >= 1.x's SFT and DPO trainers install their own fused LM head on the model
    (``add_fused_lm_head``): ``model(..., labels=..., fused_lm_head=True)`` computes its loss from
    the backbone's hidden states. Patched after it, such a call goes through untouched, labels
    included (the patch stripped them: TRL's head failed with a TypeError on ``labels[:, 1:]``);
    a plain labelled call is still the patched loss. A stand-in for TRL's head, TRL not needed."""
    model = _model("llama")
    ids, labels = _batch()
    want = model(input_ids=ids, labels=labels)
    original = model.forward
    seen = []

    def fused_forward(*args, fused_lm_head=False, labels=None, **kwargs):
        if not fused_lm_head:
            return original(*args, labels=labels, **kwargs)
        seen.append(labels)
        hidden = model.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        return torch.nn.functional.cross_entropy(model.lm_head(hidden).flatten(0, 1), labels[:, 1:].flatten())

    model.forward = fused_forward
    hf.patch(model, backend="torch")
    model.train()
    got = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert len(seen) == 1 and torch.equal(seen[0], labels)
    assert torch.allclose(got, want.loss, rtol=1e-6, atol=0)
    plain = model(input_ids=ids, labels=labels)
    assert plain.logits is None and torch.allclose(plain.loss, want.loss, rtol=1e-6, atol=0) and len(seen) == 1
