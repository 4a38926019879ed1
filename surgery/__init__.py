"""surgery: LLM Surgery (arXiv 2409.13054) on Hugging Face causal LMs with the fused losses of
``surgery_kernels`` — gradient ascent on text to forget, descent on text to learn, token-level KL
to the frozen original on text to retain, in one objective.

    from surgery import Surgery, Stream, EvalSet
    summary = Surgery(model=model, tokenizer=tok, streams=[Stream("forget", "f.jsonl", loss="ascent", weight=0.1),
                                                           Stream("learn", "l.jsonl", loss="descent", weight=2.0),
                                                           Stream("retain", "r.jsonl", loss="kl", weight=0.5)],
                      train={"steps": 40}, eval=[EvalSet("facts", "q.jsonl")], output_dir="runs/x").run()

Command line: ``surgery train CONFIG.yaml [--set key=value ...] [--resume]``, ``surgery eval CONFIG``,
``surgery demo``.
"""

from .config import EvalSet, ModelConfig, Stream, SurgeryConfig, TrainConfig, load_config
from .data import DataError
from .evaluate import multiple_choice, perplexity
from .trainer import NonFiniteLossError, Surgery, TrainingInterrupted

__all__ = ["Surgery", "Stream", "EvalSet", "TrainConfig", "ModelConfig", "SurgeryConfig", "load_config",
           "multiple_choice", "perplexity", "DataError", "NonFiniteLossError", "TrainingInterrupted", "from_config"]


def from_config(cfg: SurgeryConfig, **kwargs) -> Surgery:
    """A :class:`Surgery` run from a loaded config (``load_config``); kwargs go to ``Surgery``."""
    return Surgery(model=cfg.model, streams=cfg.streams, reference=cfg.reference, train=cfg.train, eval=cfg.eval,
                   output_dir=cfg.output_dir, **kwargs)
