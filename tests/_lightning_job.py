"""A tiny Lightning training job for the integration tests, in process or as a script.

    python tests/_lightning_job.py --dir D --log losses.jsonl --state state.jsonl
        [--steps 14] [--every 3] [--accumulate 2] [--crash-at STEP]

Each micro-batch's loss is appended to ``--log`` as ``{"key": "epoch:batch_idx", "loss": hex}``
(a re-run batch overwrites the lost one when read); ``--state`` gets the loop state at every
save and, after a resume, the restored one. Dropout draws from the global RNG; the data order
from the loader's own generator.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

import asymcheck
from asymcheck.integrations.lightning import AsymCheckCallback, ResumableDataLoader


class TinyModule(pl.LightningModule):
    def __init__(self, width: int = 32, log: str | None = None) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(),
                                       torch.nn.Dropout(0.2), torch.nn.Linear(width, width),
                                       torch.nn.GELU(), torch.nn.Linear(width, 3))
        self.log_path = log

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"key": f"{self.current_epoch}:{batch_idx}",
                                    "loss": loss.item().hex()}) + "\n")
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(n: int = 40, width: int = 32, batch: int = 4, seed: int = 7) -> ResumableDataLoader:
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(n, width, generator=g),
                                          torch.randint(0, 3, (n,), generator=g))
    return ResumableDataLoader(data, batch_size=batch, shuffle=True,
                               generator=torch.Generator().manual_seed(seed + 1))


class Record(pl.Callback):
    """Loop state at each save (and, after a resume, the restored one); SIGKILL at a step."""

    def __init__(self, ckpt: AsymCheckCallback, state: str | None, crash_at: int) -> None:
        self.ckpt, self.state, self.crash_at = ckpt, state, crash_at
        self.saved: list[int] = []

    def _write(self, rec: dict[str, Any]) -> None:
        if self.state:
            with open(self.state, "a") as f:
                f.write(json.dumps(rec) + "\n")

    @staticmethod
    def _loop(trainer: pl.Trainer) -> dict[str, int]:
        return {"global_step": trainer.global_step, "epoch": trainer.current_epoch,
                "batch_idx": trainer.fit_loop.batch_idx}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ckpt.restored_step is not None:
            self._write({"restored": self.ckpt.restored_step, **self._loop(trainer)})

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        h = self.ckpt.last_handle
        if h is not None and h.step == trainer.global_step and h.step not in self.saved:
            self.saved.append(h.step)
            self._write({"saved": h.step, **self._loop(trainer)})
        if trainer.global_step == self.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)


def make_trainer(directory: Path | str, *, steps: int, every: int, accumulate: int = 1,
                 crash_at: int = -1, state: str | None = None,
                 policy: asymcheck.Policy | str | None = None, extra: list[Any] | None = None,
                 **options: Any) -> tuple[pl.Trainer, AsymCheckCallback, Record]:
    ckpt = AsymCheckCallback(every=every,
                             policy=policy or asymcheck.default_policy(directory), **options)
    rec = Record(ckpt, state, crash_at)
    trainer = pl.Trainer(max_steps=steps, accumulate_grad_batches=accumulate, accelerator="cpu",
                         devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ckpt, rec, *(extra or [])],
                         default_root_dir=str(directory))
    return trainer, ckpt, rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--state", default=None)
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--crash-at", type=int, default=-1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("asymcheck.integrations.lightning").setLevel(logging.INFO)
    torch.set_num_threads(1)
    pl.seed_everything(1234, verbose=False)
    trainer, _, _ = make_trainer(args.dir, steps=args.steps, every=args.every,
                                 accumulate=args.accumulate, crash_at=args.crash_at,
                                 state=args.state, warmup_iterations=3)
    trainer.fit(TinyModule(log=args.log), loader())
    return 0


if __name__ == "__main__":
    sys.exit(main())
