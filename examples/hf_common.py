"""What the Hugging Face Trainer examples share: random token data, the loss log, the crash,
the command line and the kill-and-resume demo. Each ``hf_*.py`` example builds its model from
a config made in code (no downloads) and calls ``main``.

The training itself is an ordinary ``Trainer`` run; AsymCheck adds two things to it: the class
``asymcheck_trainer(Trainer)`` (resume) and the callback ``AsymCheckCallback`` (save).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kill_resume
import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments

import asymcheck
from asymcheck.integrations.transformers import AsymCheckCallback, asymcheck_trainer


class RandomTokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """``n`` sequences of random tokens drawn from ``seed``. For masked LM (``mask_id`` set)
    15% of the positions are replaced by ``mask_id`` and only those carry labels; the mask is
    drawn here too, so batches do not depend on the global RNG."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int,
                 mask_id: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab - 1, (n, seq_len), generator=g)
        self.labels = self.ids.clone()
        if mask_id is not None:
            masked = torch.rand(n, seq_len, generator=g) < 0.15
            masked[:, 0] = True  # at least one label per sequence
            self.labels[~masked] = -100
            self.ids = self.ids.masked_fill(masked, mask_id)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.labels[i]}


class LossLog(TrainerCallback):
    """Appends every logged loss (``logging_steps=1``: each step's) to a JSON-lines file, as
    the hex of the float, so runs compare bit for bit."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if self.path and state.is_world_process_zero and logs and "loss" in logs:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step,
                                    "loss": float(logs["loss"]).hex()}) + "\n")


class CrashAt(TrainerCallback):
    """SIGKILL this process after step ``step``, once that step's checkpoint is durable (on
    every rank), so the resumed run starts from a known step."""

    def __init__(self, step: int, ckpt: AsymCheckCallback) -> None:
        self.step, self.ckpt = step, ckpt

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step != self.step:
            return
        if self.ckpt.handles:
            self.ckpt.handles[-1].wait_all_sync(120)
        if state.is_world_process_zero:
            print(f"step {state.global_step:4d}  simulating a crash: SIGKILL", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def parser(doc: str, *, steps: int = 16, every: int = 4) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    p.add_argument("--every", type=int, default=every, help="checkpoint every N steps")
    p.add_argument("--dir", default="checkpoints", help="local checkpoint directory")
    p.add_argument("--policy", default=None, help="tier policy file (TOML)")
    p.add_argument("--mode", default="asym", choices=("asym", "naive"))
    p.add_argument("--loss-log", default=None, help="append per-step losses (JSON lines) here")
    p.add_argument("--crash-at", type=int, default=-1, help="SIGKILL self after this step")
    p.add_argument("--grad-accum", type=int, default=2, help="gradient accumulation steps")
    p.add_argument("--batch", type=int, default=4, help="batch size per device")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--examples", type=int, default=96, help="dataset size")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--demo", action="store_true",
                   help="train, kill -9 mid-run, run the same command again, compare losses")
    p.add_argument("--nproc", type=int, default=1,
                   help="--demo only: ranks per run (torchrun, gloo, DistributedDataParallel)")
    return p


def train(args: argparse.Namespace, build: Callable[[argparse.Namespace], torch.nn.Module],
          mask_id: int | None = None) -> int:
    transformers.set_seed(args.seed)
    model = build(args)
    data = RandomTokens(args.examples, args.seq_len, args.vocab, args.seed, mask_id)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    targs = TrainingArguments(
        output_dir=str(Path(args.dir) / "trainer"), max_steps=args.steps,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.grad_accum,
        learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=2, logging_steps=1,
        save_strategy="no", report_to="none", seed=args.seed, dataloader_num_workers=0,
        use_cpu=True, disable_tqdm=True, ddp_backend="gloo" if distributed else None)
    # --- the AsymCheck part: a callback that saves, a Trainer class that resumes
    ckpt = AsymCheckCallback(args.policy or asymcheck.default_policy(args.dir),
                             every=args.every, mode=args.mode)
    callbacks: list[Any] = [ckpt, LossLog(args.loss_log)]
    if args.crash_at >= 0:
        callbacks.append(CrashAt(args.crash_at, ckpt))
    trainer = asymcheck_trainer(Trainer)(model=model, args=targs, train_dataset=data,
                                         callbacks=callbacks)
    out = trainer.train()
    if trainer.is_world_process_zero():
        if ckpt.restored_step is not None:
            print(f"restored step {ckpt.restored_step}")
        stalls = [h.stall_s for h in ckpt.handles]
        modes = sorted({str(h.metrics.get("mode")) for h in ckpt.handles})
        print(f"trained to step {out.global_step}, mean loss of this run {out.training_loss:.4f}; "
              f"{len(stalls)} checkpoint(s) ({'/'.join(modes)}), "
              f"max stall {max(stalls, default=0) * 1e3:.1f} ms", flush=True)
    return 0


def demo(args: argparse.Namespace, script: str) -> int:
    """Uninterrupted run vs. a run killed with SIGKILL and started again with the same
    command: the losses must match bit for bit."""
    launch = [sys.executable]
    if args.nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={args.nproc}"]
    command = [*launch, script, "--steps", str(args.steps), "--every", str(args.every),
               "--grad-accum", str(args.grad_accum), "--batch", str(args.batch),
               "--mode", args.mode, "--seed", str(args.seed)]
    return kill_resume.demo(command, steps=args.steps, crash_at=args.crash_at,
                            log_flag="--loss-log", env={**os.environ, "OMP_NUM_THREADS": "1"},
                            inspect=model_bytes_per_rank if args.nproc > 1 else None)


def model_bytes_per_rank(directory: Path) -> None:
    """The replicated model is written by rank 0 alone: show each rank's model bytes."""
    shown = subprocess.run([sys.executable, "-m", "asymcheck.cli", "inspect", "latest",
                            "--tier", directory.as_uri(), "--json"],
                           capture_output=True, text=True, check=True)
    sections = [r["sections"] for r in json.loads(shown.stdout)["info"]["ranks"]]
    print("model bytes per rank in the newest checkpoint: "
          + ", ".join(str(s.get("model", 0)) for s in sections), flush=True)


def main(doc: str, script: str, build: Callable[[argparse.Namespace], torch.nn.Module], *,
         mask_id: Callable[[argparse.Namespace], int] | None = None,
         argv: list[str] | None = None) -> int:
    args = parser(doc).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1 if int(os.environ.get("WORLD_SIZE", "1")) > 1 else
                          torch.get_num_threads())
    if args.demo:
        return demo(args, script)
    return train(args, build, mask_id(args) if mask_id else None)
