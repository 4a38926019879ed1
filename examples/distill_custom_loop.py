"""A custom training loop that calls the losses directly: a small student learns from text (cross-
entropy) and from a larger frozen teacher (token-level KL), both computed from final hidden states
and lm_head weights with ``LinearCrossEntropy`` and ``LinearKLDiv`` — neither model's logits are
ever materialized. Teacher and student have different hidden sizes (96 and 48); only the
vocabulary is shared.

    python examples/distill_custom_loop.py [--steps 40] [--backend auto]

The teacher here is first fitted to the corpus for a few steps so it has something to teach;
in real use it is a pretrained model loaded from disk.
"""

from __future__ import annotations

import argparse

import torch

import tiny
from surgery_kernels import LinearCrossEntropy, LinearKLDiv


def hidden_and_head(model, input_ids, attention_mask):
    """(final hidden states (B, T, H) — after the final norm —, lm_head weight (V, H)): the one
    code path for every Hugging Face causal LM."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask)
    return out.last_hidden_state, model.get_output_embeddings().weight


def shifted(labels, ignore_index=-100):
    """Position t predicts token t + 1; the last position has no target."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)


def main(argv=None) -> dict:
    """Train; return {"ce": [...], "kl": [...]} per step and the two models."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--teacher-steps", type=int, default=40)
    p.add_argument("--backend", default="auto")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the KL term")
    p.add_argument("--temperature", type=float, default=2.0)
    args = p.parse_args(argv)

    texts = tiny.corpus()
    tok = tiny.tokenizer(texts)
    batch = tok(texts, padding=True, return_tensors="pt")
    ids, attn = batch["input_ids"], batch["attention_mask"]
    target = shifted(ids.masked_fill(attn == 0, -100))
    live = target != -100

    ce_loss = LinearCrossEntropy(backend=args.backend)
    # Forward KL(p_teacher || p_student) at temperature T, per live token, averaged.
    kl_loss = LinearKLDiv(direction="forward", temperature=args.temperature, backend=args.backend)

    teacher = tiny.model(len(tok), hidden_size=96, layers=2, seed=1)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for _ in range(args.teacher_steps):
        h, w = hidden_and_head(teacher, ids, attn)
        loss = ce_loss(h, w, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval().requires_grad_(False)
    with torch.no_grad():
        t_hidden, t_weight = hidden_and_head(teacher, ids, attn)

    student = tiny.model(len(tok), hidden_size=48, layers=1, seed=2)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    history = {"ce": [], "kl": []}
    for step in range(args.steps):
        h, w = hidden_and_head(student, ids, attn)
        ce = ce_loss(h, w, target)
        kl = kl_loss(h, w, t_hidden, t_weight, mask=live)
        loss = (1 - args.alpha) * ce + args.alpha * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        history["ce"].append(ce.item())
        history["kl"].append(kl.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  ce {ce.item():.4f}  kl {kl.item():.4f}")
    history.update(teacher=teacher, student=student)
    return history


if __name__ == "__main__":
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    main()
