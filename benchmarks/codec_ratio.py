"""Lossless ratio and throughput of the partition codecs on a real AdamW training state.

Trains a small GPT-2 on CPU (a seeded synthetic Markov-chain language, so the weights
learn real structure), first a "pre-training" phase at a high learning rate, then a
"fine-tuning" phase at a low one on a different chain. From each phase it takes two
states one optimizer step apart (weights + AdamW exp_avg + exp_avg_sq, all fp32),
codes the whole state as one flat partition and reports:

* ratios of zstd, byte-shuffle + zstd (a full checkpoint), XOR delta + zstd,
  XOR delta + shuffle + zstd (``delta``) and subtractive delta (``delta_sub``);
* compress and decompress throughput with a thread pool;
* what zstd levels, chunk sizes, per-byte-plane coding change, and how far a base
  that replays the AdamW step (a prediction, so still lossless) takes the delta.

    python benchmarks/codec_ratio.py            # about 2 minutes on 2 cores
    python benchmarks/codec_ratio.py --quick    # a smoke run of a few seconds

Writes ``benchmarks/results/codec_ratio.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asymcheck.codec import DEFAULT_LEVEL, decode_into, encode, estimate_ratio

KINDS = ("weights", "exp_avg", "exp_avg_sq")
State = dict[str, np.ndarray]  # kind -> flat fp32 bytes of every tensor of that kind

# (label, codec, elem_size): elem_size 1 turns "delta" into XOR + zstd without shuffle.
SCHEMES = (
    ("zstd", "zstd", 4),
    ("shuffle+zstd", "shuffle", 4),
    ("xor+zstd", "delta", 1),
    ("xor+shuffle+zstd (delta)", "delta", 4),
    ("sub+shuffle+zstd (delta_sub)", "delta_sub", 4),
)
TARGET_DELTA, TARGET_FULL = 1.7, 1.2
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "codec_ratio.json"


# ---------------------------------------------------------------------------- training


def markov_batches(seed: int, vocab: int, batch: int, seq: int) -> Iterator[torch.Tensor]:
    """Token batches from a seeded sparse Markov chain with Zipf-like transitions."""
    rng = np.random.default_rng(seed)
    fanout = 16
    successors = (rng.zipf(1.3, size=(vocab, fanout)) + rng.integers(0, vocab, (vocab, 1))) % vocab
    weights = 1.0 / np.arange(1, fanout + 1) ** 1.2
    weights /= weights.sum()
    while True:
        tokens = np.empty((batch, seq), dtype=np.int64)
        tokens[:, 0] = rng.integers(0, vocab, batch)
        for t in range(1, seq):
            pick = rng.choice(fanout, size=batch, p=weights)
            tokens[:, t] = successors[tokens[:, t - 1], pick]
        yield torch.from_numpy(tokens)


def capture(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> State:
    parts: dict[str, list[np.ndarray]] = {kind: [] for kind in KINDS}
    for p in model.parameters():
        moments = optimizer.state[p]
        for kind, tensor in zip(KINDS, (p, moments["exp_avg"], moments["exp_avg_sq"]), strict=True):
            parts[kind].append(
                tensor.detach().contiguous().view(torch.uint8).numpy().reshape(-1).copy()
            )
    return {kind: np.concatenate(arrays) for kind, arrays in parts.items()}


def train(args: argparse.Namespace) -> tuple[dict[str, tuple[State, State]], dict[str, Any]]:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=args.layers,
        n_embd=args.width,
        n_head=4,
        vocab_size=args.vocab,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    info: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    pairs: dict[str, tuple[State, State]] = {}
    phases = (
        ("pretrain", 1, args.pretrain_steps, args.lr, 20),
        ("finetune", 2, args.finetune_steps, args.finetune_lr, 0),
    )
    for phase, seed, steps, lr, warmup in phases:
        batches = markov_batches(seed, args.vocab, args.batch, args.seq)
        start = time.perf_counter()
        previous: State | None = None
        loss = float("nan")
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
            x = next(batches)
            out = model(input_ids=x, labels=x)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = out.loss.item()
            if step == steps - 2:
                previous = capture(model, optimizer)
            if step % 50 == 0:
                print(f"  {phase} step {step:4d} loss {loss:.3f}", flush=True)
        assert previous is not None, "each phase needs at least 2 steps"
        pairs[phase] = (previous, capture(model, optimizer))
        group = optimizer.param_groups[0]
        first = next(iter(optimizer.state.values()))
        info[phase] = {
            "steps": steps,
            "final_loss": round(loss, 4),
            "train_s": round(time.perf_counter() - start, 1),
            "adamw": {
                "lr": group["lr"],
                "weight_decay": group["weight_decay"],
                "betas": list(group["betas"]),
                "eps": group["eps"],
                "step": int(first["step"]),
            },
        }
    return pairs, info


# ---------------------------------------------------------------------------- measuring


def flat(state: State, kinds: tuple[str, ...] = KINDS) -> np.ndarray:
    return np.concatenate([state[k] for k in kinds])


def code(
    data: np.ndarray,
    base: np.ndarray,
    codec: str,
    elem_size: int,
    pool: ThreadPoolExecutor,
    *,
    level: int = DEFAULT_LEVEL,
    chunk_bytes: int = 4 << 20,
    decode: bool = False,
) -> dict[str, float]:
    """Ratio (and throughput) of one codec over one flat partition, round trip checked."""
    use_base = base if codec.startswith("delta") else None
    start = time.perf_counter()
    part = encode(
        data,
        codec=codec,
        elem_size=elem_size,
        base=use_base,
        level=level,
        chunk_bytes=chunk_bytes,
        executor=pool,
    )
    result = {
        "ratio": round(part.ratio, 4),
        "compress_gbps": round(data.nbytes / (time.perf_counter() - start) / 1e9, 3),
    }
    if decode:
        out = np.zeros_like(data)  # restores go into reused, already-faulted buffers
        out.fill(1)
        start = time.perf_counter()
        decode_into(part, out, base=use_base, executor=pool)
        result["decompress_gbps"] = round(data.nbytes / (time.perf_counter() - start) / 1e9, 3)
        if not np.array_equal(out, data):
            raise AssertionError(f"{codec} round trip is not bit-exact")
    return result


def plane_ratios(data: np.ndarray, base: np.ndarray, pool: ThreadPoolExecutor) -> dict[str, Any]:
    """Per byte plane (0 = low mantissa ... 3 = sign + exponent) after each delta."""
    found: dict[str, Any] = {}
    for label, codec in (("xor", "delta"), ("sub", "delta_sub")):
        # encode with raw-size chunks at level 3, then split the shuffled planes apart
        count = data.nbytes // 4
        transformed = np.empty_like(data)
        if codec == "delta":
            np.bitwise_xor(data, base, out=transformed)
        else:
            diff = data.view(np.int32) - base.view(np.int32)
            transformed = ((diff << 1) ^ (diff >> 31)).view(np.uint8)
        planes = [np.ascontiguousarray(transformed.reshape(count, 4)[:, k]) for k in range(4)]
        ratios = [code(plane, plane, "zstd", 1, pool)["ratio"] for plane in planes]
        zstd_all = sum(p.nbytes / r for p, r in zip(planes, ratios, strict=True))
        low_raw = (
            planes[0].nbytes
            + planes[1].nbytes
            + sum(p.nbytes / r for p, r in zip(planes[2:], ratios[2:], strict=True))
        )
        found[label] = {
            "plane_ratios": ratios,
            "each_plane_own_frame": round(data.nbytes / zstd_all, 4),
            "planes_0_1_raw": round(data.nbytes / low_raw, 4),
        }
    return found


def measure_pair(prev: State, cur: State, pool: ThreadPoolExecutor) -> dict[str, Any]:
    data, base = flat(cur), flat(prev)
    whole = {
        label: code(data, base, codec, elem, pool, decode=True) for label, codec, elem in SCHEMES
    }
    for label, codec, elem in SCHEMES:  # what the cost model would have guessed
        use_base = base if codec.startswith("delta") else None
        estimate = estimate_ratio(data, codec=codec, elem_size=elem, base=use_base)
        whole[label]["estimated_ratio"] = round(estimate, 4)
    by_kind = {
        kind: {
            label: code(cur[kind], prev[kind], codec, elem, pool)["ratio"]
            for label, codec, elem in SCHEMES
        }
        for kind in KINDS
    }
    return {"state_bytes": data.nbytes, "whole_state": whole, "by_kind": by_kind}


def investigate(
    prev: State, cur: State, adamw: dict[str, Any], pool: ThreadPoolExecutor
) -> dict[str, Any]:
    data, base = flat(cur), flat(prev)
    levels = {
        str(level): {
            codec: code(data, base, codec, 4, pool, level=level)
            for codec in ("shuffle", "delta", "delta_sub")
        }
        for level in range(1, 7)
    }
    chunks = {
        f"{size >> 10}KiB": code(data, base, "delta", 4, pool, chunk_bytes=size)["ratio"]
        for size in (256 << 10, 1 << 20, 4 << 20, 16 << 20)
    }
    return {
        "levels": levels,
        "chunk_sizes_delta": chunks,
        "byte_planes": plane_ratios(data, base, pool),
        "adamw_predicted_base": adamw_prediction(prev, cur, adamw, pool),
    }


def adamw_bases(prev: State, cur: State, adamw: dict[str, Any]) -> State:
    """Bases that replay AdamW's step from the previous checkpoint (decoupled weight decay).

    A restore decodes exp_avg (against its previous value: it carries the new gradient,
    which nothing predicts), then exp_avg_sq against beta2 * v + (1 - beta2) * g^2 with g
    recovered from the two exp_avg, then the weights against the recomputed update, so
    every input of a base is exact when it is needed. The bases are elementwise IEEE
    float32 arithmetic, reproducible bit for bit; the codec still verifies each chunk.
    """
    beta1, beta2 = adamw["betas"]
    lr, decay, eps, step = adamw["lr"], adamw["weight_decay"], adamw["eps"], adamw["step"]
    f32 = np.float32
    w0 = prev["weights"].view(np.float32)
    m0, m1 = prev["exp_avg"].view(np.float32), cur["exp_avg"].view(np.float32)
    v0, v1 = prev["exp_avg_sq"].view(np.float32), cur["exp_avg_sq"].view(np.float32)
    # the same operations, in the same order, as torch's single-tensor AdamW
    grad = m0 + (m1 - m0) / f32(1 - beta1)  # inverts exp_avg.lerp_(grad, 1 - beta1)
    v_pred = v0 * f32(beta2) + f32(1 - beta2) * grad * grad
    step_size = lr / (1 - beta1**step)
    denom = np.sqrt(v1) / f32((1 - beta2**step) ** 0.5) + f32(eps)
    w_pred = w0 * f32(1 - lr * decay) + f32(-step_size) * m1 / denom
    return {
        "weights": w_pred.astype(np.float32).view(np.uint8),
        "exp_avg": prev["exp_avg"],
        "exp_avg_sq": v_pred.astype(np.float32).view(np.uint8),
    }


def adamw_prediction(
    prev: State, cur: State, adamw: dict[str, Any], pool: ThreadPoolExecutor
) -> dict[str, Any]:
    start = time.perf_counter()
    bases = adamw_bases(prev, cur, adamw)
    bases_s = time.perf_counter() - start
    by_kind = {
        kind: {
            "delta_sub_ratio": code(cur[kind], bases[kind], "delta_sub", 4, pool)["ratio"],
            "exactly_predicted": round(
                float(np.mean(cur[kind].view(np.uint32) == bases[kind].view(np.uint32))), 5
            ),
        }
        for kind in KINDS
    }
    whole = code(flat(cur), flat(bases), "delta_sub", 4, pool, decode=True)
    whole["bases_gbps"] = round(flat(cur).nbytes / bases_s / 1e9, 3)  # one thread
    return {"whole_state_delta_sub": whole, "by_kind": by_kind}


def report(phase: str, found: dict[str, Any]) -> None:
    print(f"\n{phase}: state {found['state_bytes'] / 1e6:.1f} MB, one step apart")
    print(
        f"  {'scheme':31s} {'ratio':>6s} {'(est.)':>7s} {'comp GB/s':>10s} {'decomp GB/s':>12s}"
        f"   {'weights':>8s} {'exp_avg':>8s} {'exp_avg_sq':>10s}"
    )
    for label, _, _ in SCHEMES:
        r = found["whole_state"][label]
        kinds = [found["by_kind"][k][label] for k in KINDS]
        print(
            f"  {label:31s} {r['ratio']:6.3f} {r['estimated_ratio']:7.3f} "
            f"{r['compress_gbps']:10.3f} {r['decompress_gbps']:12.3f}   "
            f"{kinds[0]:8.3f} {kinds[1]:8.3f} {kinds[2]:10.3f}"
        )


def report_investigation(found: dict[str, Any]) -> None:
    print("\ninvestigation (fine-tune pair, whole state)")
    for level, by_codec in found["levels"].items():
        cells = "  ".join(
            f"{c} {v['ratio']:.3f} @ {v['compress_gbps']:.2f} GB/s" for c, v in by_codec.items()
        )
        print(f"  zstd level {level}: {cells}")
    print("  delta ratio by chunk size:", found["chunk_sizes_delta"])
    for label, planes in found["byte_planes"].items():
        print(
            f"  {label} delta byte planes (low..high) {planes['plane_ratios']}; "
            f"each plane its own frame {planes['each_plane_own_frame']:.3f}; "
            f"planes 0-1 raw {planes['planes_0_1_raw']:.3f}"
        )
    aware = found["adamw_predicted_base"]
    whole = aware["whole_state_delta_sub"]
    print(
        f"  AdamW-predicted bases, delta_sub: whole state {whole['ratio']:.3f} "
        f"(compress {whole['compress_gbps']:.2f} GB/s, decompress "
        f"{whole['decompress_gbps']:.2f} GB/s; computing the bases "
        f"{whole['bases_gbps']:.2f} GB/s on one thread)"
    )
    for kind, found_kind in aware["by_kind"].items():
        print(
            f"    {kind:10s} ratio {found_kind['delta_sub_ratio']:9.3f}, "
            f"{100 * found_kind['exactly_predicted']:.2f}% of elements predicted exactly"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--finetune-steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--finetune-lr", type=float, default=5e-5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default results/codec_ratio.json; none for --quick)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.finetune_steps, args.layers, args.width = 4, 3, 1, 64
        args.vocab = 512
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"training GPT-2 ({args.layers} layers, {args.width} wide, vocab {args.vocab}) on CPU")
    pairs, info = train(args)
    results: dict[str, Any] = {
        "model": {
            "kind": "gpt2",
            "layers": args.layers,
            "width": args.width,
            "vocab": args.vocab,
            "batch": args.batch,
            "seq": args.seq,
            **info,
        },
        "threads": args.threads,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
    }
    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        for phase, (prev, cur) in pairs.items():
            results[phase] = measure_pair(prev, cur, pool)
            report(phase, results[phase])
        adamw = info["finetune"]["adamw"]
        results["investigation_finetune"] = investigate(*pairs["finetune"], adamw, pool)
    report_investigation(results["investigation_finetune"])
    finetune = results["finetune"]["whole_state"]
    results["targets"] = {
        "delta_ratio_target": TARGET_DELTA,
        "full_ratio_target": TARGET_FULL,
        "delta_met": finetune["xor+shuffle+zstd (delta)"]["ratio"] >= TARGET_DELTA,
        "delta_sub_met": finetune["sub+shuffle+zstd (delta_sub)"]["ratio"] >= TARGET_DELTA,
        "adamw_predicted_delta_sub_met": results["investigation_finetune"]["adamw_predicted_base"][
            "whole_state_delta_sub"
        ]["ratio"]
        >= TARGET_DELTA,
        "full_met": finetune["shuffle+zstd"]["ratio"] >= TARGET_FULL,
    }
    results["total_s"] = round(time.perf_counter() - started, 1)
    print(f"\ntargets: {results['targets']}; {results['total_s']} s in all")
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
