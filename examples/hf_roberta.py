"""A tiny RoBERTa (masked LM) trained with the Hugging Face Trainer, checkpointed by AsymCheck.

    python examples/hf_roberta.py                  # train (or resume) in ./checkpoints
    python examples/hf_roberta.py --demo           # train, kill -9 mid-run, rerun, compare losses

The config is built in code and the data are random tokens drawn from a seed (no downloads);
see hf_common.py for what the examples share.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from hf_common import main
from transformers import RobertaConfig, RobertaForMaskedLM


def build(args: argparse.Namespace) -> torch.nn.Module:
    return RobertaForMaskedLM(RobertaConfig(vocab_size=args.vocab, hidden_size=64,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=128, pad_token_id=1,
                                            max_position_embeddings=args.seq_len + 2))


if __name__ == "__main__":
    sys.exit(main(__doc__, __file__, build, mask_id=lambda args: args.vocab - 1))
