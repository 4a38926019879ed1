import json, glob, os
from collections import OrderedDict
def load(d):
    return {os.path.basename(f)[:-5]: json.load(open(f)) for f in glob.glob(d + "/*.json")}
r1, r2, r3, r4 = load("r1"), load("r2"), load("r3"), load("r4")
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as M
rows = []
for mt, cn in M.items():
    r = r4.get(mt) if r4.get(mt, {}).get("status") == "OK" else r2.get(mt) or r1.get(mt)
    if r is None: r = dict(status="SKIP-timeout (hangs building default-size parts)")
    st = r["status"]
    def num(x):
        if not x or x.get("status") not in ("OK", "WRONG?"): return ""
        return f"{x['loss_rel']:.0e}/{x['grad_rel']:.0e}"
    notes = []
    if st in ("OK", "WRONG?"):
        e = r.get("extra", {})
        if e.get("softcap"): notes.append(f"softcap={e['softcap']}")
        if r.get("aux_loss") is not None: notes.append("aux_loss incl.")
        if r.get("bias"): notes.append("head bias")
        notes.append("tied" if r.get("tied") else "untied")
        if r.get("dtype") == "torch.float32": notes.append("fp32")
        bad = [k for k in ("head_inputs_logits_rel", "token_nll_rel", "eval_nograd_loss_rel", "eval_grad_loss_rel") if (e.get(k) or 0) > 1e-5]
        if bad: notes.append("BAD " + ",".join(bad))
        ni = e.get("num_items")
        if isinstance(ni, list) and max(ni[:2]) > 1e-5: notes.append("num_items BAD")
        s3 = r3.get(mt, {}).get("status")
        notes.append(f"flipped-tie:{num(r3.get(mt)) or s3}")
        if mt in r4: notes.append("hand config")
        msg = ""
    else:
        msg = (r.get("msg") or "").replace("\n", " ").replace("|", "/")[:110]
    rows.append(f"| {mt} | {st} | {num(r)} | {' '.join(notes)}{msg} |")
print("| model_type | outcome | loss/grad rel | notes |\n|---|---|---|---|")
print("\n".join(rows))
