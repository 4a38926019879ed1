"""A tiny corpus, tokenizer and Llama-style model built in memory, so the examples run offline on
a CPU in seconds (no model hub)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

COUNTRIES = ["France", "Peru", "Kenya", "Japan", "Chile", "Norway", "Egypt", "Canada", "Nepal", "Ghana"]
CAPITALS = ["Paris", "Lima", "Nairobi", "Tokyo", "Santiago", "Oslo", "Cairo", "Ottawa", "Kathmandu", "Accra"]
TEMPLATES = ["The capital of {c} is {k} .", "{k} is the capital of {c} .", "In {c} , the capital city is {k} ."]


def corpus() -> list[str]:
    """30 short sentences stating facts (10 countries x 3 phrasings)."""
    return [t.format(c=c, k=k) for c, k in zip(COUNTRIES, CAPITALS) for t in TEMPLATES]


def tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of ``texts`` (plus [PAD], [UNK], [BOS])."""
    words = sorted({w for t in texts for w in t.split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]")


def model(vocab_size: int, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialized float32 Llama with ``hidden_size`` and ``layers``."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=None)
    return LlamaForCausalLM(cfg)
