"""Fine-tune a Hugging Face causal LM with the stock ``transformers.Trainer``, its loss computed by
surgery_kernels (``surgery_kernels.hf.patch``): the [batch, tokens, vocab] logits are never made.

The model, tokenizer and data are tiny and built in memory; runs on a CPU in seconds:

    python examples/hf_trainer.py            # patched
    python examples/hf_trainer.py --no-patch # the same run with Hugging Face's own loss

Nothing else changes in a training script: patch the model before handing it to the Trainer.
Gradient accumulation makes the Trainer pass ``num_items_in_batch``, which the patched loss honours.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

import tiny
from surgery_kernels import hf


def main(argv=None) -> Trainer:
    """Train and evaluate; return the Trainer (its model, and the loss of every step and the
    evaluation in its state.log_history)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--backend", default="auto")
    p.add_argument("--no-patch", action="store_true", help="use Hugging Face's own loss (for comparison)")
    args = p.parse_args(argv)

    texts = tiny.corpus()
    tok = tiny.tokenizer(texts)
    model = tiny.model(len(tok))
    if not args.no_patch:
        hf.patch(model, backend=args.backend)

    # Padded to the longest sentence; the collator turns [PAD] labels into -100.
    data = Dataset.from_dict({"text": texts}).map(
        lambda b: tok(b["text"], padding="max_length", max_length=12), batched=True, remove_columns=["text"])
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
            learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
            report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=targs, train_dataset=data, eval_dataset=data,
                          data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
        trainer.train()
        # Evaluation works too: in eval mode the patched model makes its logits (compute_metrics
        # and predictions need them; hf.patch(model, eval_logits=False) keeps the fused loss).
        metrics = trainer.evaluate()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"{'patched' if not args.no_patch else 'plain'}: loss {losses[0]:.4f} -> {losses[-1]:.4f} "
          f"after {len(losses)} steps; eval loss {metrics['eval_loss']:.4f}")
    return trainer


if __name__ == "__main__":
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    main()
