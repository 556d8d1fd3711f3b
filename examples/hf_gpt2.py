"""A tiny GPT-2 trained with the Hugging Face Trainer, checkpointed by AsymCheck.

    python examples/hf_gpt2.py                      # train (or resume) in ./checkpoints
    python examples/hf_gpt2.py --demo               # train, kill -9 mid-run, rerun, compare
    python examples/hf_gpt2.py --demo --nproc 2     # the same with 2 ranks (torchrun, DDP)
    torchrun --nproc_per_node 2 examples/hf_gpt2.py --dir /tmp/ckpt

Running the same command after a crash continues from the newest committed checkpoint; the
demo shows that the losses then equal an uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from hf_common import main
from transformers import GPT2Config, GPT2LMHeadModel


def build(args: argparse.Namespace) -> torch.nn.Module:
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=args.vocab,
                                      n_positions=args.seq_len, bos_token_id=0,
                                      eos_token_id=0))


if __name__ == "__main__":
    sys.exit(main(__doc__, __file__, build))
