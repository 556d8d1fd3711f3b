"""A tiny BLOOM (causal LM) trained with the Hugging Face Trainer, checkpointed by AsymCheck.

    python examples/hf_bloom.py                  # train (or resume) in ./checkpoints
    python examples/hf_bloom.py --demo           # train, kill -9 mid-run, rerun, compare losses

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
from transformers import BloomConfig, BloomForCausalLM


def build(args: argparse.Namespace) -> torch.nn.Module:
    return BloomForCausalLM(BloomConfig(vocab_size=args.vocab, hidden_size=64, n_layer=2,
                                        n_head=4))


if __name__ == "__main__":
    sys.exit(main(__doc__, __file__, build))
