"""Train a tiny GPT-2 sharded by FSDP2 on CPU, checkpointed by AsymCheck; resume at any world size.

    torchrun --nproc-per-node 2 examples/fsdp2_gpt2.py --dir /tmp/fsdp2 --steps 20
    torchrun --nproc-per-node 3 examples/fsdp2_gpt2.py --dir /tmp/fsdp2 --steps 30  # resharded
    python examples/fsdp2_gpt2.py --dir /tmp/fsdp2 --steps 40    # one process, a plain model

Under torchrun every rank joins a gloo group, builds the same model and shards it with
``fully_shard`` (each transformer block, then the root) over a CPU device mesh of all ranks; each
rank saves its own shards. Started again, the run continues from the newest committed
checkpoint, whatever the world size now: each rank reads the parts of the saved shards that
overlap its new ones. Without torchrun the model is not sharded at all and restores the same
checkpoint whole.

Every step trains on one global batch of ``--batch`` sequences drawn from (seed, step), split
evenly over the ranks (``--batch`` must be divisible by the world size), and dropout is off, so
every world size trains the same model on the same data (up to the order of floating-point
sums). A digest of the full parameters and AdamW moments is stored with each checkpoint (as an
extra) and compared after a restore: a resharded restore is bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

import asymcheck


def build(args: argparse.Namespace, world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The same initial model on every rank, sharded over ``world`` ranks when distributed."""
    torch.manual_seed(args.seed)
    config = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=4,
                        vocab_size=args.vocab, n_positions=args.seq_len, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    if dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # embeddings, final norm and the tied LM head
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    return model, optimizer


def local_batch(step: int, args: argparse.Namespace, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of the global batch of ``step``."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g)
    per_rank = args.batch // world
    return batch[rank * per_rank:(rank + 1) * per_rank]


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor is gathered (collective: every rank calls it, in order)."""
    if hasattr(t, "full_tensor"):
        return t.full_tensor()
    return t


def digest(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """SHA-256 (first 16 hex digits) of every full parameter and its AdamW moments."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        tensors = [p.detach(), *(optimizer.state.get(p, {}).get(k) for k in
                                 ("exp_avg", "exp_avg_sq"))]
        for t in tensors:
            if t is not None:
                h.update(full(t).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class RunInfo:
    """Checkpointed with the model (an extra): how the model was laid out and the state digest
    of each save."""

    def __init__(self, layout: str) -> None:
        self.layout = layout
        self.digest = ""

    def state_dict(self) -> dict[str, Any]:
        return {"layout": self.layout, "digest": self.digest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.layout, self.digest = str(state["layout"]), str(state["digest"])


def train(args: argparse.Namespace) -> int:
    distributed = "WORLD_SIZE" in os.environ  # started by torchrun (any number of ranks)
    if distributed:
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    say = print if rank == 0 else (lambda *a, **k: None)
    if args.batch % world:
        say(f"--batch {args.batch} does not split evenly over {world} ranks")
        return 2
    model, optimizer = build(args, world)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.steps, 1))
    layout = f"FSDP2 over {world} rank(s)" if distributed else "a plain model (one process)"
    info = RunInfo(layout)
    # --- the AsymCheck part: one Checkpointer per rank, after fully_shard
    policy = args.policy or asymcheck.default_policy(args.dir)
    with asymcheck.Checkpointer(model, optimizer, policy=policy, mode=args.mode,
                                extras={"scheduler": scheduler, "run": info}) as ckpt:
        t0 = time.perf_counter()
        restored = ckpt.restore_sync()  # collective: every rank restores the same step
        start = 1
        if restored is None:
            say(f"no committed checkpoint in {args.dir}: {layout} starts from step 1",
                flush=True)
        else:
            start = restored + 1
            now = digest(model, optimizer)
            same = "matches" if now == info.digest else "DIFFERS FROM"
            say(f"restored step {restored} saved by {info.layout} into {layout} in "
                f"{time.perf_counter() - t0:.2f} s; state digest {now} {same} the saved one",
                flush=True)
            info.layout = layout
        for step in range(start, args.steps + 1):
            batch = local_batch(step, args, rank, world)
            loss = model(batch, labels=batch).loss
            loss.backward()
            optimizer.step()  # waits for the rest of a pending snapshot, if any
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            mean = loss.detach().clone()
            if distributed:
                dist.all_reduce(mean)
                mean /= world
            if step % args.every == 0 or step == args.steps:
                info.digest = digest(model, optimizer)
                handle = ckpt.save_sync(step)  # local shards copied during the next step
                say(f"step {step:4d}  loss {mean.item():.4f}  saved (stall "
                    f"{handle.stall_s * 1e3:.1f} ms, digest {info.digest})", flush=True)
        if start > args.steps:
            say(f"nothing left to train: --steps {args.steps}", flush=True)
    say(f"done: step {args.steps}, {layout}", flush=True)
    if distributed:
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="train up to this step")
    p.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    p.add_argument("--dir", default="checkpoints", help="local checkpoint directory")
    p.add_argument("--policy", default=None, help="tier policy file (TOML)")
    p.add_argument("--mode", default="asym", choices=("asym", "naive"))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=12, help="global batch (sequences per step)")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    if args.every < 1:
        p.error(f"--every must be >= 1, got {args.every}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_error()
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
