"""Sweep hf.patch over transformers causal-LM architectures.
usage: sweep.py OUTDIR model_type [model_type ...]   (or --all-from START END)
"""
import json, os, sys, signal, traceback, time, copy, math, warnings
warnings.filterwarnings("ignore")
import torch
import transformers as tf
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as M
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from surgery_kernels import hf

tf.logging.set_verbosity_error()
V = 150
B, T = 2, 12
CPU_BACKEND = set(os.environ.get("CPU_BACKEND", "").split(","))
GEN = set(os.environ.get("GEN", "").split(","))

BASE = dict(
    vocab_size=V, hidden_size=64, n_embd=64, d_model=64, dim=64, embed_dim=64, n_embed=64, emb_dim=64,
    intermediate_size=96, ffn_dim=96, n_inner=96, ffn_hidden_size=96, d_ff=96, decoder_ffn_dim=96, dim_ff=96,
    num_hidden_layers=2, n_layer=2, num_layers=2, n_layers=2, decoder_layers=2,
    num_attention_heads=4, n_head=4, n_heads=4, num_heads=4, decoder_attention_heads=4,
    num_key_value_heads=2, n_kv_heads=2, num_kv_heads=2, multi_query_group_num=2,
    head_dim=16, kv_channels=16, attention_head_dim=16,
    moe_intermediate_size=32, expert_intermediate_size=32, shared_expert_intermediate_size=32,
    moe_ffn_hidden_size=32, expert_hidden_size=32, moe_shared_expert_intermediate_size=32,
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_routed_experts=4,
    num_experts_per_tok=2, moe_topk=2, moe_k=2, top_k=2, num_selected_experts=2,
    n_group=1, topk_group=1, n_shared_experts=1,
    max_position_embeddings=128, n_positions=128, n_ctx=128, max_seq_len=128, seq_length=128,
    output_router_logits=True, router_aux_loss_coef=0.37, aux_loss_coef=0.37, router_jitter_noise=0.0,
    q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, qk_head_dim=16,
    index_head_dim=16, index_n_heads=2, index_topk=8,
    state_size=8, ssm_state_size=8, mamba_d_state=8, mamba_n_heads=4, mamba_head_dim=16, mamba_d_conv=4,
    mamba_expand=2, mamba_n_groups=1, mamba_d_head=16, mamba_dt_rank=8, time_step_rank=8, n_groups=1,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    first_k_dense_replace=1, use_cache=True,
)
FIX = dict(rotary_dim=8, mamba_n_heads=8, expand=1, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
           expert_layer_offset=1)
SPECIAL = dict(final_logit_softcapping=0.05, logit_scale=3.0, logits_scaling=0.3, lm_head_multiplier=2.5,
               logits_soft_cap=0.05, output_logit_soft_cap=0.05, logits_mup_width_multiplier=7.0, dim_model_base=16,
               scale_emb=3, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3,
               mup_enabled=True, scale_embedding=True)
ZERO = ("dropout", "pdrop", "drop_rate", "dropout_rate", "layerdrop", "drop_path")
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, sep_token_id=2, cls_token_id=1,
              mask_token_id=3, unk_token_id=3)


def shrink_kwargs(cfg, extra):
    d = cfg.to_dict()
    kw = {}
    nl_default = None
    for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(d.get(k), int):
            nl_default = d[k]
            break
    for k, v in BASE.items():
        if k in d and (d[k] is not None or k in ("q_lora_rank",)) and not isinstance(d[k], (dict, list)):
            kw[k] = v
    for k, v in TOKENS.items():
        if k in d and d[k] is not None and not isinstance(d[k], list):
            kw[k] = v
    for k, v in d.items():
        if any(z in k for z in ZERO) and isinstance(v, (int, float)) and not isinstance(v, bool):
            kw[k] = 0.0
    # lists/strings per layer: keep one of each kind
    nl = None
    for k, v in d.items():
        if nl_default and isinstance(v, (list, str)) and len(v) == nl_default and nl_default > 2 and k not in ("model_type",):
            seen, idx = [], []
            for i, x in enumerate(v):
                if x not in seen:
                    seen.append(x); idx.append(i)
            while len(idx) < 2:
                idx.append(idx[-1] + 1)
            val = [v[i] for i in idx[:4]]
            kw[k] = "".join(val) if isinstance(v, str) else val
            nl = max(nl or 0, len(val))
    if nl:
        for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            if k in kw:
                kw[k] = nl
    if "kv_lora_rank" in d and "qk_rope_head_dim" in d:
        kw["head_dim"] = BASE["qk_rope_head_dim"]
        kw["num_key_value_heads"] = BASE["num_attention_heads"] if "num_key_value_heads" in d else None
        if kw["num_key_value_heads"] is None: del kw["num_key_value_heads"]
    for k, v in FIX.items():
        if k in d:
            kw[k] = v
    variant = os.environ.get("VARIANT", "")
    if "special" in variant:
        for k, v in SPECIAL.items():
            if k in d:
                kw[k] = v
    if "fliptie" in variant and isinstance(d.get("tie_word_embeddings"), bool):
        kw["tie_word_embeddings"] = not d["tie_word_embeddings"]
    kw.update(extra)
    return kw


def tiny_config(mt, extra=None, sub_extra=None):
    cls = CONFIG_MAPPING[mt]
    base = cls()
    kw = shrink_kwargs(base, extra or {})
    for sub in ("text_config", "vision_config", "audio_config", "decoder_config", "speech_config"):
        sc = getattr(base, sub, None)
        if sc is not None and hasattr(sc, "to_dict"):
            skw = {**sc.to_dict(), **shrink_kwargs(sc, sub_extra or {})}
            for k in ("transformers_version", "architectures"):
                skw.pop(k, None)
            kw[sub] = skw
    return cls(**kw)


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    am[1, -3:] = 0
    ids[1, -3:] = 0
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, -3:] = -100
    return ids, am, labels


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run(model, kwargs, seed=123):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def compare(o, og, r, rg):
    lrel = rel(o.loss.detach(), r.loss.detach())
    gmax, worst = 0.0, None
    missing = sorted(set(rg) ^ set(og))
    scale = max([rg[n].double().norm().item() for n in rg] + [1e-30])
    for n in rg:
        if n in og:
            a, b = og[n].double(), rg[n].double()
            x = ((a - b).norm() / max(b.norm().item(), 1e-3 * scale)).item()
            if not math.isfinite(x) or x > gmax:
                gmax, worst = x, n
    return dict(loss_rel=lrel, grad_rel=gmax, worst=worst, grad_missing=missing[:5],
                loss_ours=o.loss.item(), loss_hf=r.loss.item())


def build(mt, dtype, extra=None, sub_extra=None):
    cfg = tiny_config(mt, extra, sub_extra)
    torch.manual_seed(0)
    try:
        model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    except Exception:
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(cfg)
    model = model.to(dtype)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return cfg, model


def test_one(mt, extra=None, sub_extra=None, tag=""):
    res = dict(arch=mt + tag, cls=M[mt])
    dtype = torch.float64
    try:
        cfg, model = build(mt, dtype, extra, sub_extra)
    except Exception as e:
        res.update(status="SKIP-config", msg=f"{type(e).__name__}: {str(e)[:300]}")
        return res
    res["nparams"] = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    res["head"] = type(head).__name__ if head is not None else None
    if isinstance(head, torch.nn.Linear):
        res["tied"] = head.weight is model.get_input_embeddings().weight if model.get_input_embeddings() is not None else None
        res["bias"] = head.bias is not None
    ids, am, labels = batch()
    kwargs = dict(input_ids=ids, attention_mask=am, labels=labels)
    model.train()
    try:
        try:
            ref = run(model, kwargs)
        except Exception as e:
            if dtype == torch.float64:
                dtype = torch.float32
                cfg, model = build(mt, dtype, extra, sub_extra)
                model.train()
                ref = run(model, kwargs)
            else:
                raise
    except Exception as e:
        res.update(status="SKIP-hf-crash", msg="".join(traceback.format_exception_only(type(e), e))[-400:])
        return res
    res["dtype"] = str(dtype)
    r = ref[0]
    res["aux_loss"] = None if r.get("aux_loss") is None else float(r["aux_loss"])
    # determinism check
    ref2 = run(model, kwargs)
    res["hf_nondet"] = rel(ref2[0].loss.detach(), r.loss.detach())
    try:
        hf.patch(model, backend="torch", chunk_size=5)
    except Exception as e:
        res.update(status="refused-at-patch", msg=f"{type(e).__name__}: {str(e)[:400]}")
        return res
    try:
        ours = run(model, kwargs)
    except Exception as e:
        tb = traceback.format_exc()
        res.update(status="refused" if isinstance(e, NotImplementedError) and "surgery_kernels" in str(e) else "CRASH",
                   msg=f"{type(e).__name__}: {str(e)[:400]}", tb=tb[-1500:])
        return res
    c = compare(ours[0], ours[1], ref[0], ref[1])
    res.update(c)
    res["logits_none"] = ours[0].logits is None
    tol = 1e-5 if dtype == torch.float64 else 1e-4
    ok = c["loss_rel"] <= tol and c["grad_rel"] <= max(tol, 10 * res["hf_nondet"]) and not c["grad_missing"]
    res["status"] = "OK" if ok else "WRONG?"
    extra_checks = {}
    # num_items_in_batch
    try:
        kw2 = dict(kwargs, num_items_in_batch=torch.tensor(7))
        hf.unpatch(model)
        try:
            rr = run(model, kw2)
        except Exception as e:
            rr = None
            extra_checks["num_items_hf"] = f"hf crash {type(e).__name__}"
        hf.patch(model, backend="torch", chunk_size=5)
        if rr is not None:
            oo = run(model, kw2)
            cc = compare(oo[0], oo[1], rr[0], rr[1])
            extra_checks["num_items"] = (cc["loss_rel"], cc["grad_rel"], cc["loss_ours"], cc["loss_hf"])
    except Exception as e:
        extra_checks["num_items"] = f"CRASH {type(e).__name__}: {str(e)[:200]}"
    # head_inputs reconstructs the logits; token_nll equals per-token CE of the logits
    try:
        model.eval()
        with torch.no_grad():
            lo = model(input_ids=ids, attention_mask=am).logits
            hi = hf.head_inputs(model, input_ids=ids, attention_mask=am)
            z = hi.hidden @ hi.weight.T + (hi.bias if hi.bias is not None else 0)
            if hi.softcap is not None:
                z = hi.softcap * torch.tanh(z / hi.softcap)
            extra_checks["head_inputs_logits_rel"] = rel(z, lo)
            extra_checks["softcap"] = hi.softcap
            nll = hf.token_nll(model, input_ids=ids, attention_mask=am, labels=labels)
            sl = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
            want = torch.nn.functional.cross_entropy(lo.double().transpose(1, 2), sl, ignore_index=-100, reduction="none")
            extra_checks["token_nll_rel"] = rel(nll, want)
            # eval, no_grad, labels -> logits + hf loss
            hf.unpatch(model)
            torch.manual_seed(5)
            ev_ref = model(**kwargs)
            hf.patch(model, backend="torch", chunk_size=5)
            torch.manual_seed(5)
            ev = model(**kwargs)
            extra_checks["eval_nograd_logits_kept"] = ev.logits is not None
            extra_checks["eval_nograd_loss_rel"] = rel(ev.loss, ev_ref.loss)
        with torch.enable_grad():
            torch.manual_seed(5)
            ev2 = model(**kwargs)
            extra_checks["eval_grad_logits_none"] = ev2.logits is None
            extra_checks["eval_grad_loss_rel"] = rel(ev2.loss.detach(), ev_ref.loss)
        model.train()
    except Exception as e:
        extra_checks["eval_etc"] = f"CRASH {type(e).__name__}: {str(e)[:300]}"
        model.train()
    if mt in CPU_BACKEND:
        try:
            hf.patch(model, backend="cpu")
            oc = run(model, kwargs)
            cc = compare(oc[0], oc[1], ref[0], ref[1])
            extra_checks["cpu_backend"] = (cc["loss_rel"], cc["grad_rel"])
        except Exception as e:
            extra_checks["cpu_backend"] = f"CRASH {type(e).__name__}: {str(e)[:300]}"
        hf.patch(model, backend="torch", chunk_size=5)
    if mt in GEN:
        try:
            model.eval()
            with torch.no_grad():
                gp = model.generate(ids[:1, :5], attention_mask=am[:1, :5], max_new_tokens=4, do_sample=False)
                hf.unpatch(model)
                gu = model.generate(ids[:1, :5], attention_mask=am[:1, :5], max_new_tokens=4, do_sample=False)
            extra_checks["generate_same"] = bool(torch.equal(gp, gu))
        except Exception as e:
            extra_checks["generate"] = f"CRASH {type(e).__name__}: {str(e)[:300]}"
    res["extra"] = extra_checks
    return res


class Timeout(Exception):
    pass


def handler(*a):
    raise Timeout()


if __name__ == "__main__":
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    archs = sys.argv[2:]
    if archs and archs[0] == "--range":
        keys = list(M)
        archs = keys[int(archs[1]):int(archs[2])]
    signal.signal(signal.SIGALRM, handler)
    for mt in archs:
        t0 = time.time()
        signal.alarm(int(os.environ.get("PER_MODEL_S", "40")))
        try:
            res = test_one(mt)
        except Timeout:
            res = dict(arch=mt, status="SKIP-timeout")
        except BaseException as e:
            res = dict(arch=mt, status="SWEEP-ERROR", msg=f"{type(e).__name__}: {str(e)[:300]}", tb=traceback.format_exc()[-1200:])
        finally:
            signal.alarm(0)
        res["secs"] = round(time.time() - t0, 1)
        with open(os.path.join(out, mt + ".json"), "w") as f:
            json.dump(res, f, default=str)
        print(mt, res.get("status"), res.get("loss_rel"), res.get("grad_rel"), res.get("msg", "")[:150], flush=True)
