"""Train a tiny ResNet through PyTorch Lightning with AsymCheck; survive a kill -9 and resume.

    python examples/lightning_resnet.py --demo       # train, kill -9 mid-run, resume, compare
    python examples/lightning_resnet.py --steps 40 --every 5 --dir ckpt   # run it again: resumes

The model is a transformers ``ResNetForImageClassification`` from a ``ResNetConfig`` (no
torchvision, no download); its BatchNorm statistics are buffers, copied at save time. It is
trained on random images made from the seed; see ``lightning_common.py``.
"""

from __future__ import annotations

import argparse
import sys

import torch
from lightning_common import main
from transformers import ResNetConfig, ResNetForImageClassification


def build(args: argparse.Namespace) -> torch.nn.Module:
    config = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 64],
                          depths=[1, 1, 1], layer_type="basic", num_labels=10)
    return ResNetForImageClassification(config)


if __name__ == "__main__":
    sys.exit(main(__doc__, build, __file__))
