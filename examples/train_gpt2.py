"""Train a small GPT-2 on CPU with AsymCheck checkpoints; survive a kill -9 and resume.

    python examples/train_gpt2.py --demo            # train, kill -9 mid-run, resume, compare
    python examples/train_gpt2.py --steps 40 --every 5
    python examples/train_gpt2.py --steps 40 --every 5 --resume
    python examples/train_gpt2.py --nproc 2 --steps 40 --every 5 [--resume] [--crash-at 12]

The data for step s is generated from (seed, s, rank), so a resumed run sees the same
batches; dropout draws from the global RNG, which the checkpoint restores. The
demo proves the resumed losses equal an uninterrupted run's, bit for bit.

``--nproc N`` trains with N processes (torch.multiprocessing, gloo on loopback,
DistributedDataParallel): every rank checkpoints its shard, rank 0 alone writes the
replicated model, and a checkpoint commits once every rank's shard is durable.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

import asymcheck


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.optim.Optimizer,
                                              torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(args.seed)
    config = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=4,
                        vocab_size=args.vocab, n_positions=args.seq_len,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.steps, 1))
    return model, optimizer, scheduler


def batch_for(step: int, args: argparse.Namespace, rank: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step + rank * 1_000_000_007)
    return torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g)


def train(args: argparse.Namespace, rank: int = 0) -> int:
    model, optimizer, scheduler = build(args)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    policy = args.policy or asymcheck.default_policy(args.dir)
    log_file = open(args.log, "a") if args.log and rank == 0 else None  # noqa: SIM115
    say = print if rank == 0 else (lambda *a, **k: None)
    with asymcheck.Checkpointer(model, optimizer, policy=policy,
                                extras={"scheduler": scheduler},
                                replicated=("model",) if distributed else ()) as ckpt:
        start = 0
        if args.resume:
            t0 = time.perf_counter()
            restored = ckpt.restore_sync()  # with several ranks: all restore the same step
            if restored is None:
                say("no committed checkpoint found: starting from step 0")
            else:
                start = restored + 1
                say(f"restored step {restored} in {time.perf_counter() - t0:.2f} s")
        for step in range(start, args.steps):
            batch = batch_for(step, args, rank)
            loss = model(batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if log_file:
                log_file.write(json.dumps({"step": step, "loss": loss.item().hex()}) + "\n")
                log_file.flush()
            if step % args.every == 0 or step == args.steps - 1:
                handle = ckpt.save_sync(step)
                say(f"step {step:4d}  loss {loss.item():.4f}  checkpoint stall "
                    f"{handle.stall_s * 1e3:.1f} ms", flush=True)
            if step == args.crash_at:
                say(f"step {step:4d}  simulating a crash: SIGKILL", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
    if log_file:
        log_file.close()
    return 0


def _rank_main(rank: int, args: argparse.Namespace, store: str) -> None:
    logging.basicConfig(level=logging.WARNING, format=f"rank {rank} %(levelname)s %(name)s: "
                        "%(message)s")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.nproc))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=args.nproc)
    try:
        train(args, rank)
    finally:
        dist.destroy_process_group()


def train_ranks(args: argparse.Namespace) -> int:
    """Train with ``args.nproc`` processes; a rank killed by SIGKILL takes this process too."""
    import torch.multiprocessing as mp

    work = Path(tempfile.mkdtemp(prefix="asymcheck-pg-"))
    killed = False
    try:
        mp.spawn(_rank_main, args=(args, str(work / "store")), nprocs=args.nproc)
    except mp.ProcessExitedException as e:
        if e.signal_name != "SIGKILL":
            raise
        killed = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if killed:
        os.kill(os.getpid(), signal.SIGKILL)
    return 0


def read_losses(path: Path) -> dict[int, str]:
    losses: dict[int, str] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        losses[rec["step"]] = rec["loss"]  # a re-run step overwrites the lost one
    return losses


def demo(args: argparse.Namespace) -> int:
    """Uninterrupted run vs. a run killed with SIGKILL and resumed: losses must match."""
    work = Path(tempfile.mkdtemp(prefix="asymcheck-demo-"))
    common = [sys.executable, __file__, "--steps", str(args.steps), "--every", str(args.every),
              "--layers", str(args.layers), "--width", str(args.width),
              "--nproc", str(args.nproc)]
    try:
        print(f"== uninterrupted run of {args.steps} steps")
        subprocess.run([*common, "--dir", str(work / "ref"), "--log", str(work / "ref.jsonl")],
                       check=True)
        crash_at = args.crash_at if args.crash_at >= 0 else args.steps // 2 + 1
        print(f"== run killed with SIGKILL after step {crash_at}")
        crashed = subprocess.run([*common, "--dir", str(work / "run"), "--log",
                                  str(work / "run.jsonl"), "--crash-at", str(crash_at)])
        if crashed.returncode != -signal.SIGKILL:
            print(f"expected the run to die of SIGKILL, got exit code {crashed.returncode}")
            return 1
        print("== resumed run")
        subprocess.run([*common, "--dir", str(work / "run"), "--log", str(work / "run.jsonl"),
                        "--resume"], check=True)
        ref, run = read_losses(work / "ref.jsonl"), read_losses(work / "run.jsonl")
        same = ref == run
        print(f"== {len(ref)} steps compared: losses of the resumed run "
              f"{'EQUAL' if same else 'DIFFER FROM'} the uninterrupted run's (bit for bit)")
        return 0 if same else 1
    finally:
        for d in ("ref", "run"):
            if (work / d).exists():
                name = asymcheck.default_policy(work / d).staging.url.removeprefix("shm://")
                root = Path(os.environ.get("ASYMCHECK_SHM_ROOT", "/dev/shm"))
                for shm in root.glob(f"{name}*"):  # with several ranks, NAME-rank<r> too
                    shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", action="store_true", help="train, kill -9, resume, compare losses")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--every", type=int, default=2, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="restore the newest checkpoint first")
    p.add_argument("--crash-at", type=int, default=-1, help="SIGKILL self after this step")
    p.add_argument("--dir", default="checkpoints", help="local checkpoint directory")
    p.add_argument("--policy", default=None, help="tier policy file (TOML)")
    p.add_argument("--log", default=None, help="append per-step losses (JSON lines) here")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--nproc", type=int, default=1,
                   help="train with N processes (gloo, DistributedDataParallel)")
    args = p.parse_args(argv)
    if args.nproc < 1:
        p.error(f"--nproc must be >= 1, got {args.nproc}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_error()
    if args.demo:
        return demo(args)
    return train_ranks(args) if args.nproc > 1 else train(args)


if __name__ == "__main__":
    sys.exit(main())
