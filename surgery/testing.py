"""Tiny models, tokenizers and data for tests and benchmarks (no model hub needed).

``word_tokenizer(words)`` builds a whitespace word-level tokenizer (``tokenizers`` WordLevel wrapped
in ``PreTrainedTokenizerFast``, BOS added, PAD/UNK/EOS specials); ``tiny_llama(vocab_size)`` a
random Llama config dict; ``fact_streams()`` small synthetic unlearn / update / retain data.
"""

from __future__ import annotations

import random

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def word_tokenizer(words, save_dir=None):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in sorted(set(words)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    if save_dir is not None:
        fast.save_pretrained(save_dir)
    return fast


def sentencepiece_style_tokenizer(words):
    """A word-level tokenizer that marks word starts as Llama-2's does: "▁" before every word and
    before the text (Llama-2's tokenizer.json normalizer: prepend "▁", spaces to "▁"), so " paris"
    alone is "▁", "▁paris" while "... ? paris" ends in "▁?", "▁paris"."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(list(SPECIALS) + ["▁"] + sorted({"▁" + w for w in words}))}
    sp = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    sp.pre_tokenizer = pre_tokenizers.Split(Regex("▁"), behavior="merged_with_next")
    sp.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=sp, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_llama(vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 4, **kw) -> dict:
    cfg = dict(model_type="llama", vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
               max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0, bos_token_id=2,
               eos_token_id=3)
    cfg.update(kw)
    return cfg


NAMES = ["alba", "borin", "cadra", "dovel", "essen", "farn", "galen", "hesk", "istra", "jorv", "kelda", "lumen",
         "marr", "norsk", "ovid", "pell", "quarn", "rusk", "selm", "tarn", "ulme", "vask", "wenn", "yarl"]
CITIES = ["amber", "brook", "cliff", "dune", "ember", "fjord", "grove", "haven", "isle", "jade", "knoll", "lark",
          "moor", "nook", "oak", "peak", "quay", "ridge", "spire", "thorn", "vale", "wold", "yew", "zenith"]
FILLER = "the of a in and is was to river city old north south great people land sea".split()


def fact_streams(seed: int = 0, n: int = 8):
    """(unlearn, update, retain, questions) synthetic records: facts 'the capital of X is Y'."""
    rng = random.Random(seed)
    names = NAMES[:]
    rng.shuffle(names)
    fact = {c: CITIES[i] for i, c in enumerate(names)}
    unlearn = [{"text": f"the capital of {c} is {fact[c]}"} for c in names[:n]]
    update = [{"prompt": f"the capital of {c} is", "completion": f" {fact[names[-1 - i]]}"}
              for i, c in enumerate(names[n:2 * n])]
    retain = [{"text": " ".join(rng.choice(FILLER) for _ in range(rng.randint(6, 14)))} for _ in range(n)]
    questions = [{"question": f"the capital of {c} is", "choices": [fact[c], CITIES[(i + 1) % 24], CITIES[(i + 2) % 24]],
                  "answer": 0} for i, c in enumerate(names[:n])]
    return unlearn, update, retain, questions


def all_words() -> list[str]:
    return NAMES + CITIES + FILLER + ["capital"]
