"""The ``asymcheck`` command: list, inspect, verify, export and clean up checkpoints.

Tiers come from ``--policy FILE``, from ``--tier`` (a URL opens that tier, a name picks one of
the policy's), or from the embedded default policy (host shared memory + ``./checkpoints``).
Each command runs its tier I/O in one ``asyncio.run``. Exit codes: 0 ok, 1 a verification
fault, 2 a usage or user error (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO, TypeVar
from urllib.parse import urlsplit

import torch

from tiers._fsutil import TMP_RE, pid_alive
from tiers.base import Tier, TierError
from tiers.host import DEFAULT_ROOT, ENV_ROOT, HostTier
from tiers.local import LocalTier
from tiers.registry import open_tier

from . import __version__
from .errors import ManifestError, PolicyError, RestoreError, UsageError
from .layout import MANIFEST_NAME, parse_manifest_key
from .manifest import ChunkMeta, Manifest, TensorMeta, committed_steps, read_manifest
from .policy import default_policy, load_policy
from .restore import (
    LoadedCheckpoint,
    empty_tensor,
    load_checkpoint,
    read_base_tensor,
    read_tensor,
)
from .retention import delete_step

EXIT_OK, EXIT_FAULT, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # as if killed by SIGPIPE, like other command-line tools
_LOGGERS = ("asymcheck", "tiers")
T = TypeVar("T")
log = logging.getLogger(__name__)
_VERIFY_TENSORS = 4  # tensors buffered at once while verifying
_VERIFY_CHUNKS = 8  # chunk reads in flight


USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError, PolicyError, RestoreError, ManifestError, TierError, OSError, ValueError,
    ImportError)


# ------------------------------------------------------------------------------ tier selection

@dataclass(frozen=True)
class TierSpec:
    name: str
    url: str
    keep: int | None = None  # None: not from a policy, retention needs --keep
    options: dict[str, Any] = field(default_factory=dict)


def tier_specs(policy_file: str | None, selectors: Sequence[str]) -> list[TierSpec]:
    """``--tier`` values containing ':' are URLs; others name tiers of the policy."""
    policy = load_policy(policy_file) if policy_file else default_policy("checkpoints")
    by_name = {t.name: TierSpec(t.name, t.url, t.keep, dict(t.options)) for t in policy.tiers}
    if not selectors:
        return list(by_name.values())
    urls = [s for s in selectors if ":" in s]
    schemes = [urlsplit(u).scheme for u in urls]
    specs: list[TierSpec] = []
    for sel in selectors:
        if ":" in sel:
            scheme = urlsplit(sel).scheme
            specs.append(TierSpec(scheme if schemes.count(scheme) == 1 else sel, sel))
        elif sel in by_name:
            specs.append(by_name[sel])
        else:
            raise UsageError(f"no tier named {sel!r} in {policy.source} (tiers: "
                             f"{', '.join(by_name)}; a tier URL needs its scheme, e.g. "
                             "file:///path)")
    names = [s.name for s in specs]
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise UsageError(f"tier {dup!r} is selected twice")
    return specs


def missing_dir(tier: Tier) -> Path | None:
    """The directory of a file-backed tier when it does not exist (opening would create it)."""
    if isinstance(tier, HostTier):
        directory = tier.directory
    elif isinstance(tier, LocalTier):
        directory = tier.root
    else:
        return None
    return None if directory.exists() else directory


async def close_all(tiers: Sequence[Tier]) -> None:
    for t in tiers:
        with contextlib.suppress(Exception):
            await t.close()


def run_with_tiers(specs: Sequence[TierSpec], body: Callable[[list[Tier]], Awaitable[T]]) -> T:
    """Run ``body`` on the opened tiers in one event loop; the tiers are closed after it."""
    async def go() -> T:
        tiers: list[Tier] = []
        try:
            for s in specs:
                tiers.append(open_tier(s.url, name=s.name, **s.options))
            return await body(tiers)
        finally:
            await close_all(tiers)

    return asyncio.run(go())


# ----------------------------------------------------------------------------------- formatting

def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def fmt_time(created_s: float | None) -> str:
    if created_s is None:
        return "-"
    return datetime.fromtimestamp(created_s).astimezone().isoformat(timespec="seconds")


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = (),
          indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for row in [header, *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        out.append((indent + "  ".join(cells)).rstrip())
    return out


def json_default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return obj.hex()
    return str(obj)


def dump_json(doc: Any, out: TextIO) -> None:
    json.dump(doc, out, indent=2, default=json_default)
    out.write("\n")


def hex64(value: int | None) -> str | None:
    return None if value is None else f"{value:016x}"


def chunk_codecs(chunks: Sequence[ChunkMeta]) -> list[str]:
    names = {c.codec if c.base_step is None else f"{c.codec}(base {c.base_step})"
             for c in chunks}
    return sorted(names)


def manifest_codecs(manifest: Manifest) -> list[str]:
    return sorted({c.codec for t in manifest.tensors for c in t.chunks})


def progress(total: int, desc: str, quiet: bool) -> Any:
    """A byte progress bar on a terminal's stderr; otherwise a silent stand-in."""
    if quiet or not sys.stderr.isatty():
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # an optional extra: no bar then
        return _NoBar()

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, leave=False)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------ ls

@dataclass
class Entry:
    """One step directory on one tier."""

    step: int
    status: str  # committed | uncommitted | corrupt
    created_s: float | None = None
    stored_bytes: int | None = None
    tensor_bytes: int | None = None
    codecs: list[str] = field(default_factory=list)
    world_size: int | None = None
    job: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "status": self.status, "committed": self.status == "committed",
                "created": fmt_time(self.created_s) if self.created_s else None,
                "created_s": self.created_s, "stored_bytes": self.stored_bytes,
                "tensor_bytes": self.tensor_bytes, "codecs": self.codecs,
                "world_size": self.world_size, "job": self.job, "error": self.error}


def group_step_dirs(keys: Sequence[str]) -> dict[int, list[str]]:
    """Keys grouped by the step of their ``step-<12 digits>`` directory."""
    groups: dict[int, list[str]] = {}
    for key in keys:
        head = key.split("/", 1)[0]
        step = parse_manifest_key(f"{head}/{MANIFEST_NAME}")
        if step is not None:
            groups.setdefault(step, []).append(key)
    return groups


async def describe_step(tier: Tier, step: int, keys: Sequence[str]) -> Entry:
    if any(k.endswith("/" + MANIFEST_NAME) for k in keys):
        try:
            m = await read_manifest(tier, step)
        except Exception as e:
            entry = Entry(step, "corrupt", error=str(e))
        else:
            return Entry(step, "committed", m.created_s, m.stored_bytes, m.nbytes,
                         manifest_codecs(m), m.world_size, m.job)
    else:
        entry = Entry(step, "uncommitted")
    stats = await asyncio.gather(*(tier.stat(k) for k in keys), return_exceptions=True)
    found = [s for s in stats if not isinstance(s, BaseException)]
    entry.stored_bytes = sum(s.size_bytes for s in found)
    entry.created_s = max((s.mtime_s for s in found), default=None)
    return entry


async def scan_tier(tier: Tier) -> list[Entry]:
    """Every step directory of ``tier``, newest first."""
    groups = group_step_dirs(await tier.list("step-"))
    entries = await asyncio.gather(*(describe_step(tier, s, k) for s, k in groups.items()))
    return sorted(entries, key=lambda e: e.step, reverse=True)


def cmd_ls(args: argparse.Namespace) -> int:
    async def body(tiers: list[Tier]) -> int:
        report, failed = [], []
        for tier in tiers:
            absent = missing_dir(tier)
            doc: dict[str, Any] = {"name": tier.name, "url": tier.url, "exists": absent is None,
                                   "checkpoints": [], "error": None}
            if absent is None:
                try:
                    doc["checkpoints"] = await scan_tier(tier)
                except Exception as e:
                    doc["error"] = str(e)
                    failed.append(f"tier {tier.name}: {e}")
            report.append(doc)
        if args.json:
            dump_json({"tiers": [{**d, "checkpoints": [e.to_json() for e in d["checkpoints"]]}
                                 for d in report]}, sys.stdout)
        else:
            print_ls(report)
        if failed:
            raise UsageError("; ".join(failed))
        return EXIT_OK

    return run_with_tiers(args.specs, body)


def print_ls(report: Sequence[dict[str, Any]]) -> None:
    for i, doc in enumerate(report):
        entries: list[Entry] = doc["checkpoints"]
        committed = sum(e.status == "committed" for e in entries)
        print(("\n" if i else "") + f"{doc['name']}  {doc['url']}  ({committed} committed)")
        if doc["error"]:
            print(f"  cannot list: {doc['error']}")
        elif not doc["exists"]:
            print("  no checkpoints (the directory does not exist)")
        elif not entries:
            print("  no checkpoints")
        else:
            rows = [[str(e.step), fmt_time(e.created_s), e.status, fmt_bytes(e.stored_bytes),
                     ",".join(e.codecs) or "-", str(e.world_size or "-")] for e in entries]
            for line in table(["STEP", "CREATED", "STATUS", "STORED", "CODECS", "WORLD"], rows,
                              right=(0, 3, 5)):
                print(line)
            for e in entries:
                if e.error:
                    print(f"  step {e.step}: {e.error}")


# ------------------------------------------------------------------------------------- inspect

async def steps_on(tiers: Sequence[Tier]) -> dict[str, list[int]]:
    """Committed steps per tier; tiers whose directory does not exist hold none."""
    out: dict[str, list[int]] = {}
    for tier in tiers:
        out[tier.name] = [] if missing_dir(tier) else await committed_steps(tier)
    return out


def pick_step(step: int | None, found: dict[str, list[int]]) -> int:
    everywhere = sorted({s for steps in found.values() for s in steps})
    if not everywhere:
        raise UsageError(f"no committed checkpoint on tier(s) {', '.join(found)}")
    if step is None:
        return everywhere[-1]
    if step not in everywhere:
        raise UsageError(f"step {step} is not committed on tier(s) {', '.join(found)} "
                         f"(committed: {', '.join(map(str, everywhere))})")
    return step


def manifest_json(tier: Tier, m: Manifest) -> dict[str, Any]:
    return {
        "tier": tier.name, "url": tier.url, "step": m.step, "created": fmt_time(m.created_s),
        "created_s": m.created_s, "job": m.job, "world_size": m.world_size,
        "tensor_bytes": m.nbytes, "stored_bytes": m.stored_bytes, "info": m.info,
        "files": [{"key": f.key, "size": f.size} for f in m.files],
        "tensors": [{"path": t.path, "dtype": t.dtype, "shape": list(t.shape),
                     "nbytes": t.nbytes,
                     "chunks": [{"file": c.file, "offset": c.offset, "stored_len": c.stored_len,
                                 "raw_offset": c.raw_offset, "raw_len": c.raw_len,
                                 "xxh64": f"{c.xxh64:016x}",
                                 "stored_xxh64": hex64(getattr(c, "stored_xxh64", None)),
                                 "codec": c.codec,
                                 "elem_size": c.elem_size, "base_step": c.base_step}
                                for c in t.chunks]} for t in m.tensors],
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    async def body(tiers: list[Tier]) -> int:
        found = await steps_on(tiers)
        step = pick_step(args.step, found)
        tier, m = await first_readable_manifest([t for t in tiers if step in found[t.name]],
                                                step)
        if args.json:
            dump_json(manifest_json(tier, m), sys.stdout)
        else:
            for line in inspect_lines(tier, m):
                print(line)
        return EXIT_OK

    return run_with_tiers(args.specs, body)


async def first_readable_manifest(holders: Sequence[Tier], step: int) -> tuple[Tier, Manifest]:
    """The manifest of the fastest tier whose copy reads; warns about the ones skipped."""
    errors: list[str] = []
    for tier in holders:
        try:
            manifest = await read_manifest(tier, step)
        except Exception as e:
            errors.append(str(e))
            continue
        for error in errors:
            log.warning("skipped an unreadable manifest: %s", error)
        return tier, manifest
    raise ManifestError(f"step {step}: no readable manifest: {'; '.join(errors)}")


def inspect_lines(tier: Tier, m: Manifest) -> Iterator[str]:
    info = dict(m.info)
    yield f"step {m.step} on {tier.name} ({tier.url})"
    yield f"  created     {fmt_time(m.created_s)}"
    yield f"  job         {m.job}    world size {m.world_size}"
    yield (f"  state       {len(m.tensors)} tensors, {fmt_bytes(m.nbytes)}; stored "
           f"{fmt_bytes(m.stored_bytes)} in {len(m.files)} file(s)")
    yield f"  codecs      {', '.join(manifest_codecs(m)) or '-'}"
    if "save_id" in info:
        yield f"  save id     {info.pop('save_id')}"
    if isinstance(info.get("stall_s"), (int, float)):
        yield f"  stall       {info.pop('stall_s') * 1e3:.1f} ms"
    yield ""
    yield "tensors"
    rows = [[t.path, t.dtype, str(list(t.shape)), fmt_bytes(t.nbytes), str(len(t.chunks)),
             ",".join(chunk_codecs(t.chunks)) or "-"] for t in m.tensors]
    yield from table(["PATH", "DTYPE", "SHAPE", "BYTES", "CHUNKS", "CODECS"], rows, right=(3, 4))
    plan = info.pop("plan", None)
    if isinstance(plan, dict):
        yield ""
        yield from plan_lines(plan)
    compression = info.pop("compression", None)
    if isinstance(compression, dict):
        yield ""
        yield from compression_lines(compression)
    yield ""
    yield "files"
    yield from table(["FILE", "SIZE"], [[f.key, fmt_bytes(f.size)] for f in m.files], right=(1,))
    if info:
        yield ""
        yield "info"
        for key, value in sorted(info.items()):
            if isinstance(value, dict) and value:
                yield f"  {key}:"
                for k, v in value.items():
                    yield f"    {k}: {json.dumps(v, default=json_default)}"
            else:
                yield f"  {key}: {json.dumps(value, default=json_default)}"


def compression_lines(comp: dict[str, Any]) -> Iterator[str]:
    raw, stored = comp.get("raw_bytes"), comp.get("stored_bytes")
    ratio = f"{raw / stored:.3f}x" if isinstance(raw, int) and isinstance(stored, int) and stored \
        else "-"
    kind = "full" if comp.get("full") else f"delta on step(s) {comp.get('base_steps')}"
    yield (f"compression ({comp.get('mode')}, {kind}): {fmt_bytes(raw)} -> {fmt_bytes(stored)}, "
           f"{ratio}")
    rows = [[str(path), str(codec), "-" if est is None else f"{est:.3f}", f"{real:.3f}"]
            for path, codec, est, real in comp.get("decisions", [])
            if isinstance(real, (int, float))]
    if rows:
        yield from table(["PATH", "CODEC", "ESTIMATED", "ACHIEVED"], rows, right=(2, 3))


def plan_lines(plan: dict[str, Any]) -> Iterator[str]:
    windows = [w for w in plan.get("windows", []) if isinstance(w, (list, tuple)) and len(w) == 4]
    by_kind: dict[str, list[int]] = {}
    for _, kind, _, nbytes in windows:
        by_kind.setdefault(str(kind), []).append(int(nbytes))
    yield f"partitions ({fmt_bytes(plan.get('total_bytes'))} planned in {len(windows)} windows)"
    for kind, sizes in by_kind.items():
        yield f"  {kind:<9} {len(sizes):4d} partitions  {fmt_bytes(sum(sizes))}"
    rows = [[str(w), str(kind), fmt_bytes(int(n)), str(name)] for w, kind, name, n in windows]
    if rows:
        yield from table(["WINDOW", "KIND", "BYTES", "NAME"], rows, right=(0, 2))


# -------------------------------------------------------------------------------------- verify

@dataclass(frozen=True)
class Fault:
    tier: str
    step: int | None  # None: the tier itself failed
    kind: str  # tier | manifest | file | tensor
    name: str  # the file key or tensor path ("" for tier and manifest faults)
    error: str
    chunk: ChunkMeta | None = None

    def line(self) -> str:
        step = "" if self.step is None else f"  step {self.step}"
        what = f"  {self.kind} {self.name}".rstrip()
        at = (f"  chunk {self.chunk.file}@{self.chunk.offset} ({self.chunk.stored_len} bytes)"
              if self.chunk else "")
        return f"FAULT  {self.tier}{step}{what}{at}: {self.error}"

    def to_json(self) -> dict[str, Any]:
        c = self.chunk
        return {"tier": self.tier, "step": self.step, "kind": self.kind, "name": self.name,
                "file": c.file if c else None, "offset": c.offset if c else None,
                "stored_len": c.stored_len if c else None, "error": self.error}


async def verify_copy(tier: Tier, m: Manifest, bar: Any) -> list[Fault]:
    """Read every chunk of one tier's copy; each checked by ``read_tensor``."""
    faults: list[Fault] = []
    for f in m.files:
        key = f"step-{m.step:012d}/{f.key}"
        try:
            size = (await tier.stat(key)).size_bytes
        except Exception as e:
            faults.append(Fault(tier.name, m.step, "file", f.key, str(e)))
            continue
        if size != f.size:
            faults.append(Fault(tier.name, m.step, "file", f.key,
                                f"{size} bytes, the manifest says {f.size}"))
    tensor_slots = asyncio.Semaphore(_VERIFY_TENSORS)
    chunk_slots = asyncio.Semaphore(_VERIFY_CHUNKS)

    async def check_chunk(meta: TensorMeta, out: torch.Tensor, chunk: ChunkMeta) -> None:
        async with chunk_slots:
            try:
                await read_tensor(tier, m.step, replace(meta, chunks=(chunk,)), out,
                                  locate=m.locate)
            except Exception as e:
                file, offset = m.locate(chunk)  # where the bytes are on this tier
                faults.append(Fault(tier.name, m.step, "tensor", meta.path, str(e),
                                    chunk._replace(file=file, offset=offset)))
            finally:
                bar.update(chunk.stored_len)

    async def read_base(base_step: int, meta: TensorMeta) -> memoryview:
        return await read_base_tensor([tier], base_step, meta)

    async def check_coded(meta: TensorMeta, out: torch.Tensor) -> None:
        """Coded chunks decode together (a delta needs its base): checked as one tensor."""
        async with chunk_slots:
            try:
                await read_tensor(tier, m.step, meta, out, base=read_base, locate=m.locate)
            except Exception as e:
                faults.append(Fault(tier.name, m.step, "tensor", meta.path, str(e)))
            finally:
                bar.update(sum(c.stored_len for c in meta.chunks))

    async def check_tensor(meta: TensorMeta) -> None:
        async with tensor_slots:
            out = empty_tensor(meta)
            if any(c.codec != "raw" for c in meta.chunks):
                await check_coded(meta, out)
            else:
                await asyncio.gather(*(check_chunk(meta, out, c) for c in meta.chunks))

    await asyncio.gather(*(check_tensor(t) for t in m.tensors))
    order = {t.path: i for i, t in enumerate(m.tensors)}
    return sorted(faults, key=lambda f: (f.kind == "tensor", order.get(f.name, -1),
                                         f.chunk.raw_offset if f.chunk else -1))


def cmd_verify(args: argparse.Namespace) -> int:
    async def body(tiers: list[Tier]) -> int:
        faults: list[Fault] = []
        found: dict[str, list[int]] = {}
        for tier in tiers:
            try:
                found[tier.name] = [] if missing_dir(tier) else await committed_steps(tier)
            except Exception as e:
                faults.append(Fault(tier.name, None, "tier", "", f"cannot list: {e}"))
                found[tier.name] = []
        everywhere = sorted({s for steps in found.values() for s in steps})
        if args.all:
            if not everywhere and not faults:
                raise UsageError(f"no committed checkpoint on tier(s) {', '.join(found)}")
            steps = everywhere
        else:
            steps = [pick_step(args.step, found)]
        copies: list[tuple[Tier, Manifest]] = []
        for step in steps:
            for tier in tiers:
                if step in found[tier.name]:
                    try:
                        copies.append((tier, await read_manifest(tier, step)))
                    except Exception as e:
                        faults.append(Fault(tier.name, step, "manifest", "", str(e)))
        bar = progress(sum(c.stored_len for _, m in copies for t in m.tensors for c in t.chunks),
                       "verify", args.quiet)
        results = []
        try:
            for tier, m in copies:
                bad = await verify_copy(tier, m, bar)
                results.append((tier, m, bad))
                faults.extend(bad)
        finally:
            bar.close()
        report_verify(args, steps, results, faults)
        return EXIT_FAULT if faults else EXIT_OK

    return run_with_tiers(args.specs, body)


def report_verify(args: argparse.Namespace, steps: Sequence[int],
                  results: Sequence[tuple[Tier, Manifest, list[Fault]]],
                  faults: Sequence[Fault]) -> None:
    if args.json:
        dump_json({"ok": not faults, "steps": list(steps),
                   "copies": [{"tier": t.name, "step": m.step, "tensors": len(m.tensors),
                               "stored_bytes": m.stored_bytes, "ok": not bad}
                              for t, m, bad in results],
                   "faults": [f.to_json() for f in faults]}, sys.stdout)
        return
    for f in faults:
        if f.step is None or not any(f.tier == t.name and f.step == m.step for t, m, _ in results):
            print(f.line())  # a tier or manifest fault: no copy to report it under
    for tier, m, bad in results:
        if not bad and not args.quiet:
            print(f"ok     {tier.name}  step {m.step}  {len(m.tensors)} tensors, "
                  f"{fmt_bytes(m.stored_bytes)} in {len(m.files)} file(s)")
        for f in bad:
            print(f.line())
    if not args.quiet or faults:
        copies = len(results) + sum(f.kind == "manifest" for f in faults)
        print(f"verified {len(steps)} checkpoint(s), {copies} cop{'y' if copies == 1 else 'ies'}:"
              f" {len(faults)} fault(s)")


# ------------------------------------------------------------------------------------- restore

def export_pt(state: dict[str, Any], step: int, path: Path) -> int:
    torch.save({"model": state["model"], "optimizers": state["optimizers"], "step": step}, path)
    return sum(1 for _ in iter_tensors(state["model"])) + sum(
        1 for o in state["optimizers"] for _ in iter_tensors(o))


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from iter_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_tensors(v)


def export_safetensors(state: dict[str, Any], step: int, path: Path) -> int:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UsageError("writing .safetensors needs safetensors: "
                         "pip install 'asymcheck[export]'") from None
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    skipped = []
    for key, value in state["model"].items():
        if not isinstance(value, torch.Tensor):
            skipped.append(str(key))
            continue
        t = value.detach().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()  # tied weights: safetensors stores every name on its own
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        tensors[str(key)] = t
    if skipped:
        print(f"asymcheck: skipped {len(skipped)} non-tensor model entries: "
              f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}", file=sys.stderr)
    save_file(tensors, str(path), metadata={"step": str(step)})
    return len(tensors)


EXPORTERS: dict[str, Callable[[dict[str, Any], int, Path], int]] = {
    ".pt": export_pt, ".safetensors": export_safetensors}


def cmd_restore(args: argparse.Namespace) -> int:
    target = Path(args.to)
    exporter = EXPORTERS.get(target.suffix)
    if exporter is None:
        raise UsageError(f"--to {args.to}: the file must end in .pt or .safetensors")
    if target.exists() and not args.force:
        raise UsageError(f"{target} exists (use --force to overwrite it)")
    if not target.parent.is_dir():
        raise UsageError(f"--to {args.to}: directory {target.parent} does not exist")

    async def body(tiers: list[Tier]) -> LoadedCheckpoint:
        present = [t for t in tiers if missing_dir(t) is None]
        loaded = await load_checkpoint(present, args.step) if present else None
        if loaded is None:
            raise UsageError(f"no committed checkpoint on tier(s) "
                             f"{', '.join(t.name for t in tiers)}")
        return loaded

    loaded = run_with_tiers(args.specs, body)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        count = exporter(loaded.state, loaded.step, tmp)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    sources = ", ".join(f"{k}: {v}" for k, v in sorted(loaded.sources.items()))
    print(f"wrote {target}: step {loaded.step}, {count} tensors, "
          f"{fmt_bytes(target.stat().st_size)} (tensors read from {sources or 'no tier'})")
    return EXIT_OK


# ------------------------------------------------------------------------------------------ gc

async def retention_plan(tiers: Sequence[Tier], keeps: dict[str, int]
                         ) -> list[tuple[Tier, int, str]]:
    """(tier, step, why) to delete: committed steps beyond ``keep``, and uncommitted step
    directories older than the tier's newest committed step (newer ones may be in flight).
    On a shared-memory tier, steps newer than every durable tier's newest are kept: a
    running job may still be flushing them."""
    listing: dict[str, dict[int, list[str]]] = {}
    for tier in tiers:
        listing[tier.name] = {} if missing_dir(tier) else group_step_dirs(
            await tier.list("step-"))
    committed = {name: sorted(s for s, keys in groups.items()
                              if any(k.endswith("/" + MANIFEST_NAME) for k in keys))
                 for name, groups in listing.items()}
    durable = [committed[t.name][-1] for t in tiers
               if not isinstance(t, HostTier) and committed[t.name]]
    plan = []
    for tier in tiers:
        steps = committed[tier.name]
        if not steps:
            continue
        keep = keeps[tier.name]
        limit = max(durable) if isinstance(tier, HostTier) and durable else None
        needed: set[int] = set()  # delta bases of the checkpoints kept
        for s in steps[-keep:]:
            man = await read_manifest(tier, s)
            needed.update(man.info.get("compression", {}).get("base_steps", []))
        for s in steps[:-keep]:
            if s not in needed and (limit is None or s <= limit):
                plan.append((tier, s, f"beyond keep={keep}"))
        plan.extend((tier, s, "uncommitted") for s in sorted(listing[tier.name])
                    if s < steps[-1] and s not in steps)
    return plan


def cmd_gc(args: argparse.Namespace) -> int:
    keeps: dict[str, int] = {}
    for s in args.specs:
        keep = args.keep if args.keep is not None else s.keep
        if keep is None:
            raise UsageError(f"tier {s.name} comes from a URL and has no keep: pass --keep N "
                             "or use --policy FILE")
        keeps[s.name] = keep
    verb = "would remove" if args.dry_run else "removed"

    async def body(tiers: list[Tier]) -> int:
        plan = await retention_plan(tiers, keeps)
        for tier, step, why in plan:
            if not args.dry_run:
                await delete_step(tier, step)
            print(f"{verb} {tier.name} step {step} ({why})")
        await close_all(tiers)  # before the shared-memory sweep below removes directories
        swept = await asyncio.to_thread(sweep_stale_shm, args.dry_run) if args.stale_shm else []
        for line in swept:
            print(line)
        if not args.quiet:
            removed = len(plan) + sum(line.startswith(verb) for line in swept)
            print(f"gc: {removed} {'to remove' if args.dry_run else 'removed'}")
        return EXIT_OK

    return run_with_tiers(args.specs, body)


def shm_root() -> Path:
    return Path(os.environ.get(ENV_ROOT) or DEFAULT_ROOT)


def tier_dirs(top: Path, depth: int = 6) -> Iterator[Path]:
    """Directories below ``top`` that hold step directories or a free pool (tier roots)."""
    try:
        children = sorted(p for p in top.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return
    names = {p.name for p in children}
    if ".free" in names or any(group_step_dirs([n]) for n in names):
        yield top
        return
    if depth:
        for child in children:
            yield from tier_dirs(child, depth - 1)


def job_owner(job: str) -> tuple[str, int] | None:
    """(nodename, pid) of a job id ``<nodename>-<pid>-<hex>``; None if it is not one."""
    parts = job.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[0]:
        return None
    try:
        int(parts[2], 16)
    except ValueError:
        return None
    return parts[0], int(parts[1])


def stale_reason(directory: Path) -> tuple[bool, str, list[int]]:
    """(remove?, why, committed steps) for one shared-memory tier directory."""
    node = os.uname().nodename
    jobs: set[str] = set()
    steps: list[int] = []
    for path in sorted(directory.glob(f"step-*/{MANIFEST_NAME}")):
        try:
            m = Manifest.from_bytes(path.read_bytes(), source=str(path))
        except (OSError, ManifestError):
            return False, f"unreadable manifest {path.parent.name}", steps
        jobs.add(m.job)
        steps.append(m.step)
    for _, _, files in os.walk(directory):
        for name in files:
            tmp = TMP_RE.search(name)
            if tmp and pid_alive(int(tmp.group(1))):
                return False, f"a write of live pid {tmp.group(1)} is in progress", steps
    if not jobs:
        return False, "no manifest names its job", steps
    for job in sorted(jobs):
        owner = job_owner(job)
        if owner is None:
            return False, f"job {job!r} is not <nodename>-<pid>-<hex>", steps
        if owner[0] != node:
            return False, f"job {job} runs on another host", steps
        if pid_alive(owner[1]):
            return False, f"job {job} is alive", steps
    return True, f"job {', '.join(sorted(jobs))} is dead", steps


def dir_bytes(directory: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def sweep_stale_shm(dry_run: bool) -> list[str]:
    """Remove shared-memory tier directories (``asymcheck*`` under the root) of dead jobs."""
    root = shm_root()
    lines = []
    try:
        tops = sorted(p for p in root.iterdir() if p.name.startswith("asymcheck")
                      and p.is_dir() and not p.is_symlink())
    except OSError as e:
        raise UsageError(f"cannot read the shared-memory root {root}: {e}") from None
    for top in tops:
        for directory in list(tier_dirs(top)):
            remove, why, steps = stale_reason(directory)
            listed = f"steps {', '.join(map(str, steps))}" if steps else "no steps"
            if not remove:
                lines.append(f"kept shm {directory} ({why})")
                continue
            size = dir_bytes(directory)
            if not dry_run:
                shutil.rmtree(directory)
                parent = directory.parent
                while parent != root and parent.is_relative_to(root):
                    try:
                        parent.rmdir()
                    except OSError:
                        break
                    parent = parent.parent
            lines.append(f"{'would remove' if dry_run else 'removed'} shm {directory} "
                         f"({why}; {listed}; {fmt_bytes(size)})")
    return lines


# ------------------------------------------------------------------------------------- parsing

def step_arg(value: str) -> int | None:
    """A step number, or ``latest`` (None)."""
    if value == "latest":
        return None
    try:
        step = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a step number or 'latest': {value!r}") from None
    if not 0 <= step < 10**12:
        raise argparse.ArgumentTypeError(f"step must be in [0, 1e12), got {step}")
    return step


def keep_arg(value: str) -> int:
    try:
        keep = int(value)
    except ValueError:
        keep = 0
    if keep < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value!r}")
    return keep


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--policy", dest="sub_policy", metavar="FILE",
                        help="tier policy file (TOML); default: host shm + ./checkpoints")
    common.add_argument("--tier", dest="sub_tiers", action="append", default=[],
                        metavar="URL|NAME", help="a tier URL (repeatable), or the name of a "
                        "policy tier; default: every tier of the policy")
    common.add_argument("--quiet", "-q", dest="sub_quiet", action="store_true",
                        help="no progress bars, warnings or summaries")
    p = argparse.ArgumentParser(prog="asymcheck", description="Inspect, verify, export and "
                                "clean up AsymCheck checkpoints.")
    p.add_argument("--version", action="version", version=f"asymcheck {__version__}")
    p.add_argument("--policy", metavar="FILE", help="tier policy file (TOML)")
    p.add_argument("--tier", dest="tiers", action="append", default=[], metavar="URL|NAME",
                   help="a tier URL (repeatable), or the name of a policy tier")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or warnings")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = sub.add_parser("ls", parents=[common], help="list checkpoints per tier, newest first")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_ls)

    ins = sub.add_parser("inspect", parents=[common], help="show one checkpoint's manifest")
    ins.add_argument("step", type=step_arg, metavar="STEP", help="step number or 'latest'")
    ins.add_argument("--json", action="store_true", help="the whole manifest, checksums too")
    ins.set_defaults(func=cmd_inspect)

    ver = sub.add_parser("verify", parents=[common],
                         help="read and check every chunk (exit code 1 on any fault)")
    which = ver.add_mutually_exclusive_group()
    which.add_argument("step", type=step_arg, nargs="?", default=None, metavar="STEP",
                       help="step number or 'latest' (default: the newest committed)")
    which.add_argument("--all", action="store_true", help="every committed checkpoint")
    ver.add_argument("--json", action="store_true", help="machine-readable output")
    ver.set_defaults(func=cmd_verify)

    res = sub.add_parser("restore", parents=[common],
                         help="export a checkpoint to a .pt or .safetensors file")
    res.add_argument("step", type=step_arg, metavar="STEP", help="step number or 'latest'")
    res.add_argument("--to", required=True, metavar="FILE",
                     help="FILE.pt (model + optimizers + step) or FILE.safetensors (model)")
    res.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    res.set_defaults(func=cmd_restore)

    gc = sub.add_parser("gc", parents=[common], help="apply retention now; remove stale shm")
    gc.add_argument("--keep", type=keep_arg, metavar="N",
                    help="keep the N newest committed checkpoints per tier (default: policy)")
    gc.add_argument("--stale-shm", action="store_true",
                    help="also remove shared-memory checkpoints of dead jobs on this host")
    gc.add_argument("--dry-run", "-n", action="store_true", help="only print what would go")
    gc.set_defaults(func=cmd_gc)
    return p


@contextlib.contextmanager
def log_to_stderr(quiet: bool) -> Iterator[None]:
    """Library warnings as one line each on stderr, for the duration of one command."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.ERROR if quiet else logging.WARNING)
    handler.setFormatter(logging.Formatter("asymcheck: %(levelname)s: %(message)s"))
    loggers = [logging.getLogger(n) for n in _LOGGERS]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    args.quiet = args.quiet or args.sub_quiet
    if args.policy and args.sub_policy and args.policy != args.sub_policy:
        print("asymcheck: error: --policy given twice", file=sys.stderr)
        return EXIT_USAGE
    with log_to_stderr(args.quiet):
        try:
            args.specs = tier_specs(args.policy or args.sub_policy, args.tiers + args.sub_tiers)
            code: int = args.func(args)
            return code
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_BROKEN_PIPE
        except USER_ERRORS as e:
            message = " ".join(str(e).split()) or type(e).__name__
            print(f"asymcheck: error: {message}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("asymcheck: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
