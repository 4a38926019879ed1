import os, sys, json
os.environ.setdefault("VARIANT", "special")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep
CASES = {
  "falcon_h1": dict(mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1),
  "recurrent_gemma": dict(num_hidden_layers=3, lru_width=64, attention_window_size=16, block_types=["recurrent", "recurrent", "attention"]),
  "bamba": dict(attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16),
  "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"], mamba_n_heads=8, mamba_d_head=16),
  "zamba": dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8),
  "xlstm": dict(num_heads=4, qk_dim_factor=1.0, v_dim_factor=1.0, chunk_size=4, mode="train", return_last_states=False, weight_mode="single"),
  "bamba_zloss": None, "gemma3n_text": dict(num_kv_shared_layers=0, layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=8, laurel_rank=8, altup_num_inputs=2, activation_sparsity_pattern=[0.0, 0.0]),
  "llama4_text": dict(num_hidden_layers=2, no_rope_layers=[1, 0], layer_types=["chunked_attention", "full_attention"], interleave_moe_layer_step=1, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=96, attention_chunk_size=16),
  "lfm2": dict(num_hidden_layers=2, layer_types=["conv", "full_attention"], full_attn_idxs=None),
  "nemotron": dict(partial_rotary_factor=0.5, head_dim=16),
  "ministral": dict(head_dim=16, sliding_window=16),
  "hunyuan_v1_dense": dict(head_dim=16),
  "deepseek_v2": dict(topk_group=1, n_group=1, topk_method="greedy", num_key_value_heads=4),
}
only = sys.argv[1:] or list(CASES)
import signal
signal.signal(signal.SIGALRM, sweep.handler)
for mt in only:
    signal.alarm(40)
    try:
        r = sweep.test_one(mt, CASES[mt])
    except BaseException as e:
        r = dict(arch=mt, status="ERR", msg=repr(e)[:300])
    signal.alarm(0)
    os.makedirs("r4", exist_ok=True)
    json.dump(r, open(f"r4/{mt}.json", "w"), default=str)
    print(mt, r.get("status"), r.get("loss_rel"), r.get("grad_rel"), (r.get("msg") or "")[:300], r.get("extra", {}).get("softcap"), r.get("aux_loss"), flush=True)
