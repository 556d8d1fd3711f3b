"""``asymcheck restore``: export one checkpoint to a ``.pt`` or ``.safetensors`` file, to a
Hugging Face model folder (``--format hf``: ``model.safetensors`` + ``config.json``, which
``AutoModel*.from_pretrained(DIR)`` loads; the config comes from the checkpoint's ``hf_config``
extra, which the transformers integration saves), or to a torch Distributed Checkpoint folder
(``--format dcp``: ``{"model", "optim", "step"}``, which ``torch.distributed.checkpoint.load``
reads; see ``asymcheck.dcpinterop``), or, for a checkpoint saved through DeepSpeed
(``asymcheck.integrations.deepspeed``), to DeepSpeed's own or universal format (``dsexport``).

Each tensor is read from the fastest tier with a good copy (``asymcheck.restore``). A
multi-rank checkpoint is exported from rank 0's shard, read on the tiers where it is the shard
the global manifest records: state that was replicated (``replicated=("model",)``) is whole
there, the rest is rank 0's own; the output says which.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from tiers.base import Tier

from ..dcpinterop import METADATA_FILE, dcp_state, save_dcp
from ..errors import RestoreError, UsageError
from ..manifest import Manifest, read_manifest
from ..reshard import Placer, has_shards
from ..restore import LoadedCheckpoint, load_checkpoint, steps_by_tier
from ._output import EXIT_OK, fmt_bytes
from ._ranks import shard_records
from ._tiers import Session, first_readable_manifest, missing_dir, run_with_tiers
from .dsexport import DEEPSPEED_FORMATS, deepspeed_integration, export_deepspeed

Meta = dict[str, int]


def export_pt(state: dict[str, Any], step: int, path: Path, meta: Meta | None = None) -> int:
    try:
        torch.save({"model": state["model"], "optimizers": state["optimizers"], "step": step,
                    **(meta or {})}, path)
    except RuntimeError as e:  # the zip writer reports a failed write so
        raise UsageError(f"cannot write {path}: {e}") from None
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


def export_safetensors(state: dict[str, Any], step: int, path: Path,
                       meta: Meta | None = None) -> int:
    try:
        from safetensors import SafetensorError
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
    metadata = {"step": str(step), **{k: str(v) for k, v in (meta or {}).items()}}
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:  # a failed write comes as this
        raise UsageError(f"cannot write {path}: {e}") from None
    return len(tensors)


HF_CONFIG = "hf_config"  # the extra holding the model's config (see integrations.transformers)
HF_WEIGHTS, HF_CONFIG_FILE = "model.safetensors", "config.json"


def _hf_state(state: dict[str, Any]) -> dict[str, Any]:
    """The model's state as ``save_pretrained`` names it: a ``module.`` prefix of a wrapped
    model (DistributedDataParallel) dropped."""
    model = state["model"]
    if model and all(str(k).startswith("module.") for k in model):
        model = {str(k)[len("module."):]: v for k, v in model.items()}
    return {**state, "model": model}


def export_hf(state: dict[str, Any], step: int, path: Path, meta: Meta | None = None) -> int:
    """A ``from_pretrained`` folder: ``model.safetensors`` and ``config.json``. Tied weights
    are written under every name (as the ``.safetensors`` export does); ``from_pretrained``
    ties them again as the config says."""
    config = (state.get("extras") or {}).get(HF_CONFIG)
    if not isinstance(config, dict) or not isinstance(config.get("json"), str):
        raise UsageError(f"step {step} holds no model config (extra {HF_CONFIG!r}, saved by "
                         "asymcheck.integrations.transformers): --format hf needs it")
    try:
        path.mkdir()
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e}") from None
    count = export_safetensors(_hf_state(state), step, path / HF_WEIGHTS,
                               {**(meta or {}), "format": "pt"})  # type: ignore[dict-item]
    (path / HF_CONFIG_FILE).write_text(
        json.dumps(json.loads(config["json"]), indent=2, sort_keys=True) + "\n")
    return count


def export_dcp(state: dict[str, Any], step: int, path: Path, meta: Meta | None = None) -> int:
    """A torch Distributed Checkpoint folder (``.metadata`` + ``__0_0.distcp``) holding
    ``{"model": ..., "optim": ..., "step": N}``: the first optimizer's state as ``optim``,
    optimizer ``i`` >= 1 as ``optim_<i>``, none for one that had not stepped (see
    ``asymcheck.dcpinterop``); of a multi-rank export also ``rank`` and ``world_size``."""
    doc = dcp_state({**state, "step": step}, meta)
    try:
        save_dcp(doc, path)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e}") from None
    return sum(1 for _ in iter_tensors(doc))


EXPORTERS: dict[str, Callable[[dict[str, Any], int, Path, Meta | None], int]] = {
    ".pt": export_pt, ".safetensors": export_safetensors, "hf": export_hf, "dcp": export_dcp}
#: what each format holds of a checkpoint's state
EXPORTED = {".pt": ("model", "optimizers"), ".safetensors": ("model",), "hf": ("model",),
            "dcp": ("model", "optimizers")}
#: ``--format`` names
FORMATS = {"pt": ".pt", "safetensors": ".safetensors", "hf": "hf", "dcp": "dcp",
           **{f: f for f in DEEPSPEED_FORMATS}}
#: formats written as a folder
FOLDERS = ("hf", "dcp", *DEEPSPEED_FORMATS)


async def load(session: Session, step: int | None) -> tuple[LoadedCheckpoint, Manifest]:
    """The checkpoint and a (global) manifest of it. Of a multi-rank checkpoint: sharded tensors
    whole, put together from every rank's shard; the other state from rank 0's shard."""
    shards, m = await load_shards(session, step, every_rank=False)
    return shards[0], m


async def load_shards(session: Session, step: int | None, *, every_rank: bool
                      ) -> tuple[list[LoadedCheckpoint], Manifest]:
    """As ``load``; with ``every_rank``, one per saved rank (in rank order), each with that
    rank's own state."""
    present = [t for t in session.tiers if missing_dir(t) is None]
    found = await steps_by_tier(present)
    if step is None and not found:
        raise UsageError(f"no committed checkpoint on tier(s) "
                         f"{', '.join(t.name for t in session.tiers)}")
    step = max(found) if step is None else step
    if step not in found:
        raise RestoreError(f"step {step} is not committed on any tier (committed: "
                           f"{', '.join(map(str, sorted(found))) or 'none'})")
    _, m = await first_readable_manifest(found[step], step)
    if m.world_size == 1:
        loaded = await load_checkpoint(found[step], step)
        assert loaded is not None
        return [loaded], m
    digests: dict[str, list[int]] = {}
    for tier in found[step]:
        with contextlib.suppress(Exception):
            global_manifest = await read_manifest(tier, step)
            digests[tier.name] = [r.xxh64 for r in shard_records(global_manifest)]

    def views(rank: int) -> list[Tier]:
        shards = (session.shard(t, rank) for t in found[step] if t.name in digests)
        return [t for t in shards if t is not None]

    ranks = range(m.world_size) if every_rank else range(1)
    return [await Placer(step, m.world_size, views, rank=rank, world=1, targets=None,
                         digests=digests).load() for rank in ranks], m


def shard_note(target: Path, m: Manifest, fmt: str, sharded: bool) -> str:
    """What of a multi-rank checkpoint the file holds."""
    replicated = m.info.get("replicated") or []
    parts = [f"{name}: {'whole (replicated)' if name in replicated else 'rank 0 only'}"
             for name in EXPORTED[fmt]]
    if sharded:
        return (f"step {m.step} was saved by {m.world_size} ranks: {target.name} holds its "
                "sharded tensors whole, put together from every rank's shard, and rank 0's "
                "other state")
    return (f"step {m.step} was saved by {m.world_size} ranks: {target.name} holds rank 0's "
            f"shard ({'; '.join(parts)})")


def check_target(args: argparse.Namespace) -> tuple[Path, str]:
    """The target and its format (``.pt``, ``.safetensors``, ``hf`` or ``dcp``)."""
    target = Path(args.to)
    fmt = FORMATS[args.format] if getattr(args, "format", None) else target.suffix
    if fmt not in EXPORTERS and fmt not in DEEPSPEED_FORMATS:
        raise UsageError(f"--to {args.to}: the file must end in .pt or .safetensors "
                         "(or pass --format pt|safetensors|hf|dcp)")
    if target.exists() and not args.force:
        raise UsageError(f"{target} exists (use --force to overwrite it)")
    if fmt in FOLDERS and target.exists() and not target.is_dir():
        raise UsageError(f"--to {args.to}: --format {fmt} writes a directory; {target} is a "
                         "file")
    if not target.parent.is_dir():
        raise UsageError(f"--to {args.to}: directory {target.parent} does not exist")
    return target, fmt


def _replace(tmp: Path, target: Path) -> list[str] | None:
    """Move the export into place; of a folder, the names of the files it holds. ``--force``
    on a folder replaces its exported files (a DCP checkpoint's ``.metadata`` last, after the
    data files it names; data files of an earlier DCP export there are removed)."""
    if not tmp.is_dir():
        os.replace(tmp, target)
        return None
    names = sorted((f.name for f in tmp.iterdir()), key=lambda n: (n == METADATA_FILE, n))
    if not target.is_dir():
        os.replace(tmp, target)
        return names
    if METADATA_FILE in names:  # not a checkpoint until the new .metadata is in place
        target.joinpath(METADATA_FILE).unlink(missing_ok=True)
        for old in target.glob("*.distcp"):
            if old.name not in names:
                old.unlink()
    for name in names:
        os.replace(tmp / name, target / name)
    tmp.rmdir()
    return names


def _size(path: Path, names: list[str] | None) -> int:
    if names is None:
        return path.stat().st_size
    return sum(path.joinpath(n).stat().st_size for n in names)


def cmd_restore(args: argparse.Namespace) -> int:
    target, fmt = check_target(args)
    if fmt in DEEPSPEED_FORMATS:
        ds = deepspeed_integration()  # before reading: a missing extra is one usage line
        shards, _ = run_with_tiers(
            args.specs, lambda session: load_shards(session, args.step, every_rank=True))
        return export_deepspeed(ds, shards, target, fmt == "deepspeed-universal")

    async def body(session: Session) -> tuple[LoadedCheckpoint, Manifest]:
        return await load(session, args.step)

    loaded, m = run_with_tiers(args.specs, body)
    meta = {"rank": 0, "world_size": m.world_size} if m.world_size > 1 else None
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        count = EXPORTERS[fmt](loaded.state, loaded.step, tmp, meta)
        size = _size(target, _replace(tmp, target))
    except OSError as e:
        raise UsageError(f"cannot write {target}: {e}") from None
    finally:
        with contextlib.suppress(OSError):
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
    sources = ", ".join(f"{k}: {v}" for k, v in sorted(loaded.sources.items()))
    print(f"wrote {target}: step {loaded.step}, {count} tensors, "
          f"{fmt_bytes(size)} (tensors read from {sources or 'no tier'})")
    if m.world_size > 1:
        print(shard_note(target, m, fmt, has_shards(loaded.manifest)))
    return EXIT_OK
