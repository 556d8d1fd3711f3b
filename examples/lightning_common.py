"""What the Lightning examples share: a LightningModule around a transformers image
classifier, seeded random images, training with AsymCheck, and the kill -9 demo.

The images come from the seed alone and the loader shuffles with its own generator, so a
resumed run sees the same batches; dropout draws from the global RNG, which the checkpoint
restores. ``--demo`` trains once uninterrupted, once killed with SIGKILL and resumed by the
same command, and compares the per-step losses bit for bit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable
from typing import Any

import kill_resume
import lightning.pytorch as pl
import torch
import transformers

import asymcheck
from asymcheck.integrations.lightning import AsymCheckCallback, ResumableDataLoader


class ImageClassifier(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, steps: int, log: str | None = None) -> None:
        super().__init__()
        self.model, self.steps, self.log_path = model, steps, log

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss: torch.Tensor = self.model(pixel_values=images, labels=labels).loss
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"step": self.global_step, "loss": loss.item().hex()}) + "\n")
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(self.steps, 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def images(args: argparse.Namespace, num_labels: int) -> ResumableDataLoader:
    g = torch.Generator().manual_seed(args.seed)
    data = torch.utils.data.TensorDataset(
        torch.randn(args.images, 3, args.image_size, args.image_size, generator=g),
        torch.randint(0, num_labels, (args.images,), generator=g))
    return ResumableDataLoader(data, batch_size=args.batch, shuffle=True, num_workers=0,
                               generator=torch.Generator().manual_seed(args.seed + 1))


class Report(pl.Callback):
    """One line per checkpoint; SIGKILL after ``crash_at`` optimizer steps, once the last
    checkpoint is durable, so the resumed run starts from a known step."""

    def __init__(self, ckpt: AsymCheckCallback, crash_at: int) -> None:
        self.ckpt, self.crash_at = ckpt, crash_at

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        h = self.ckpt.last_handle
        if h is not None and h.step == trainer.global_step:
            print(f"step {h.step:4d}  loss {float(outputs['loss']):.4f}  checkpoint stall "
                  f"{h.stall_s * 1e3:.1f} ms ({h.metrics['mode']})", flush=True)
        if trainer.global_step == self.crash_at:
            if h is not None:
                h.wait_all_sync(120)
            print(f"step {self.crash_at:4d}  simulating a crash: SIGKILL", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def train(args: argparse.Namespace, build: Callable[[argparse.Namespace], torch.nn.Module]
          ) -> int:
    pl.seed_everything(args.seed, verbose=False)
    model = build(args)
    ckpt = AsymCheckCallback(every=args.every, policy=asymcheck.default_policy(args.dir),
                             warmup_iterations=3)
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=args.dir,
                         callbacks=[ckpt, Report(ckpt, args.crash_at)])
    trainer.fit(ImageClassifier(model, args.steps, args.log),
                images(args, model.config.num_labels))
    return 0


def demo(args: argparse.Namespace, script: str) -> int:
    """Uninterrupted run vs. a run killed with SIGKILL and resumed: losses must match."""
    command = [sys.executable, script, "--steps", str(args.steps), "--every", str(args.every)]
    return kill_resume.demo(command, steps=args.steps, crash_at=args.crash_at, log_flag="--log")


def main(doc: str, build: Callable[[argparse.Namespace], torch.nn.Module], script: str,
         argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--demo", action="store_true", help="train, kill -9, resume, compare losses")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps")
    p.add_argument("--every", type=int, default=4, help="checkpoint every N optimizer steps")
    p.add_argument("--crash-at", type=int, default=-1, help="SIGKILL self after this step")
    p.add_argument("--dir", default="checkpoints", help="local checkpoint directory")
    p.add_argument("--log", default=None, help="append per-step losses (JSON lines) here")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("asymcheck.integrations.lightning").setLevel(logging.INFO)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.demo:
        return demo(args, script)
    return train(args, build)
