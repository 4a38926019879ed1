"""The fallback (and CI) model: a tiny Llama with a word-level tokenizer, both built here, first
trained on the facts so that it has something to unlearn and to retain.

Used when the real model package cannot be installed or loaded (the demo says so and labels every
output "tiny Llama fallback"), and by the fast tests: it runs the whole pipeline in seconds.
"""

from __future__ import annotations

import random
from collections import Counter

import torch

from . import facts as F

TINY_NAME = "tiny Llama fallback (random init, first trained on the facts here)"


def build_tokenizer(texts: list[str], max_words: int = 4000):
    """A word-level tokenizer (words and punctuation; unknown words -> <unk>) over ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    counts = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(t))
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2}
    for w, _ in counts.most_common(max_words):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    tk.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>")


def pretraining_texts(all_facts: list[F.Fact]) -> list[str]:
    """Every fact in every training phrasing and as the evaluation question with its answer: the
    tiny model must know the facts in the framings the probe asks."""
    out = []
    for f in all_facts:
        out += [r["prompt"] + r["completion"] for r in F.statements(f)]
        out += [F.fill(t, f) + " " + f.capital + "." for t in F.PROBE_TEMPLATES]
    return out


def build(all_facts: list[F.Fact], paragraphs: list[str], *, steps: int = 150, seed: int = 0, hidden: int = 64,
          layers: int = 2, log=print):
    """(model, tokenizer, description): a tiny LlamaForCausalLM trained with the plain Hugging Face
    loss on the facts (and a few paragraphs, so the perplexity means something)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = pretraining_texts(all_facts)
    # Invented capitals of the edit set must be words too, or they would all be <unk>.
    rng = random.Random(f"sets-{seed}")
    extra = " ".join(F.fictitious_capitals(64, rng, set()))
    tok = build_tokenizer(texts + paragraphs + [extra, "Answer:"])
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    data = texts * 3 + paragraphs
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(len(data), (32,), generator=g).tolist()
        enc = tok([data[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=64)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    log(f"tiny model: {sum(p.numel() for p in model.parameters())} parameters, pre-trained {steps} steps "
        f"(last loss {loss.item():.3f})")
    model.eval()
    return model, tok, TINY_NAME
