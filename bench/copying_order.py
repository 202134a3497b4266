"""When does a small model learn to copy from its context? The measurement behind Chapter 3's choice to start
pretraining from its copying model. Three depth-2 models, the same seed, batch and precision:

- `text`: pretrained on a run's token files only (Chapter 4 without the warm start);
- `copy, then text`: first trained on Chapter 3's repeated sequences until the steps run out, then pretrained
  on text like `text`;
- `text, then copy`: `text`, then the same steps of repeated sequences.

Printed for each, after each phase: the induction test (Chapter 3's) and the validation loss on real text.

    .venv/bin/python bench/copying_order.py --run-dir runs/cpu [--copy-steps 900] [--text-steps 700]
        [--embedding-lr 0.01] [--muon-lr 0.02] [--seed 1337]

The run directory needs Chapter 3's outputs (tokenizer/ and tokens/). Measured on a 2-core Xeon (AMX-BF16)
with the tokens of a `cpu` run, seed 1337, bf16 autocast, 16 x 256 text tokens and 16 x 64 copy rows per step
(by this procedure, before it became this script):

| model | induction | validation loss (nats/token) |
|---|---|---|
| text (700 steps) | 0% | 5.330 |
| copy (892 steps), then text (700 steps) | 95% after the copy phase, 45% after the text | 5.319 |
| text (700 steps, embeddings at 3e-3), then copy (1,200 steps) | 4% | — |

With the embeddings at 3e-3 during the text phase instead of 0.01, the warm start (1,200 copy steps) kept more
of the skill (78%) but cost 0.40 nats per token (5.825 vs 5.424): the embeddings that the copy phase trained at
0.02 do not move back fast enough. Mid-training (Chapter 4) then took the 45% model (embeddings at 0.01) to 83%
induction, with 100% of pass keys, in 350 steps (`mid_fraction` 0.5 of 700).

The Muon rate of the text phase matters as much. From the copying model of a `cpu` run with seed 1, 644 text
steps at Muon 0.02 kept 41–59% induction along the way (checked every 100 steps; 44% at step 600); Chapter 4 of the
same run, whose sweep had chosen Muon 0.05, ended pretraining at 0%, and 322 steps of mid-training at 0.02 left
it at 0%.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from llmbook.modeling import (
    COPY_ROW_TOKENS,
    ModelConfig,
    PackedLoader,
    Recipe,
    Transformer,
    evaluate,
    induction,
    load_tokenizer,
    make_optimizer,
    repeated_sequences,
    train_step,
)


def copy_phase(model, tok, steps: int, seed: int, precision: str):
    "Chapter 3's copying run: Muon, with the embeddings at Muon's rate, on repeated random sequences."
    recipe = Recipe(lr=Recipe().muon_lr, precision=precision)
    optimizer, generator = make_optimizer(model, recipe), torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = repeated_sequences(16, COPY_ROW_TOKENS, tok.vocab_size, generator)
        train_step(model, optimizer, [batch], recipe, step, steps)


def text_phase(model, tokens: Path, steps: int, embedding_lr: float, muon_lr: float, seed: int, precision: str):
    "Pretraining on the run's token files: Muon at `muon_lr` for the matrices, AdamW at `embedding_lr` for the rest."
    recipe = Recipe(lr=embedding_lr, muon_lr=muon_lr, precision=precision)
    optimizer, loader = make_optimizer(model, recipe), PackedLoader(tokens, "train", 256, 16, seed=seed)
    for step in range(steps):
        train_step(model, optimizer, [loader.next_batch()], recipe, step, steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--copy-steps", type=int, default=900)
    parser.add_argument("--late-copy-steps", type=int, default=1200)
    parser.add_argument("--text-steps", type=int, default=700)
    parser.add_argument("--embedding-lr", type=float, default=0.01)
    parser.add_argument("--muon-lr", type=float, default=0.02)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    tok, tokens = load_tokenizer(args.run_dir / "tokenizer"), args.run_dir / "tokens"
    started = time.time()

    def report(name: str, model):
        val = PackedLoader(tokens, "val", 256, 16, seed=0)
        loss = evaluate(model, val, 16, "cpu", Recipe(precision=args.precision))
        row = dict(model=name, induction=round(induction(model, tok)["accuracy"], 3), val_loss=round(loss, 3))
        print(json.dumps(dict(row, seconds=round(time.time() - started))), flush=True)

    def fresh():
        torch.manual_seed(args.seed)
        return Transformer(ModelConfig.from_depth(2, tok.vocab_size, 256))

    text = fresh()
    text_phase(text, tokens, args.text_steps, args.embedding_lr, args.muon_lr, args.seed, args.precision)
    report("text", text)
    copy_phase(text, tok, args.late_copy_steps, args.seed, args.precision)
    report("text, then copy", text)
    warm = fresh()
    copy_phase(warm, tok, args.copy_steps, args.seed, args.precision)
    report("copy", warm)
    text_phase(warm, tokens, args.text_steps, args.embedding_lr, args.muon_lr, args.seed, args.precision)
    report("copy, then text", warm)


if __name__ == "__main__":
    main()
