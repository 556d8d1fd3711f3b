"""Train a tiny ViT through PyTorch Lightning with AsymCheck; survive a kill -9 and resume.

    python examples/lightning_vit.py --demo          # train, kill -9 mid-run, resume, compare
    python examples/lightning_vit.py --steps 40 --every 5 --dir ckpt   # run it again: resumes

The model is built from a transformers ``ViTConfig`` (no download) and trained on random
images made from the seed; see ``lightning_common.py``.
"""

from __future__ import annotations

import argparse
import sys

import torch
from lightning_common import main
from transformers import AutoModelForImageClassification, ViTConfig


def build(args: argparse.Namespace) -> torch.nn.Module:
    config = ViTConfig(image_size=args.image_size, patch_size=8, num_channels=3, hidden_size=64,
                       num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       hidden_dropout_prob=0.1, num_labels=10)
    return AutoModelForImageClassification.from_config(config)


if __name__ == "__main__":
    sys.exit(main(__doc__, build, __file__))
