"""``asymcheck restore --format deepspeed | deepspeed-universal``: a checkpoint saved through a
DeepSpeed engine (``asymcheck.integrations.deepspeed``) written out as DeepSpeed's own files.

``deepspeed`` writes every saved rank's files under ``DIR/<tag>/`` and ``DIR/latest``: the
checkpoint DeepSpeed's default engine would have written, for the same world size.
``deepspeed-universal`` converts those with DeepSpeed's ``ds_to_universal`` into ``DIR/<tag>/``
and ``DIR/latest_universal``: DeepSpeed loads that at any world size (``"checkpoint":
{"load_universal": true}``). Each rank's shard is read from the nearest tier with a good copy.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import RestoreError, UsageError
from ._output import EXIT_OK, fmt_bytes
from ._tiers import Session, run_with_tiers

DEEPSPEED_FORMATS = ("deepspeed", "deepspeed-universal")


def _integration() -> Any:
    try:
        from ..integrations import deepspeed
    except ImportError as e:
        raise UsageError(str(e)) from None
    return deepspeed


async def _files_by_rank(session: Session, step: int | None, extra: str
                         ) -> tuple[int, str, list[dict[str, Any]], dict[str, int]]:
    """The step, its DeepSpeed tag, each saved rank's recorded files, and the tensors read
    per tier."""
    from .restore import load

    loaded, m = await load(session, step)
    shards = [loaded]
    for rank in range(1, m.world_size):
        shards.append((await load(session, loaded.step, rank=rank))[0])
    files: list[dict[str, Any]] = []
    sources: dict[str, int] = {}
    tag: str | None = None
    for rank, shard in enumerate(shards):
        state = shard.state["extras"].get(extra)
        if not isinstance(state, dict) or not isinstance(state.get("files"), dict):
            raise RestoreError(f"step {loaded.step} was not saved through a DeepSpeed engine "
                               "(asymcheck.integrations.deepspeed)")
        if tag is not None and state["tag"] != tag:
            raise RestoreError(f"step {loaded.step}: rank {rank} saved tag {state['tag']!r}, "
                               f"rank 0 {tag!r}")
        tag = str(state["tag"])
        files.append(state["files"])
        for name, count in shard.sources.items():
            sources[name] = sources.get(name, 0) + count
    assert tag is not None
    return loaded.step, tag, files, sources


def export_deepspeed(args: argparse.Namespace, target: Path, universal: bool) -> int:
    ds = _integration()
    step, tag, files, sources = run_with_tiers(
        args.specs, lambda session: _files_by_rank(session, args.step, ds.EXTRA))
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} is a file: --format deepspeed writes a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        written = ds.write_files(files, tag, tmp / "ds")
        source = tmp / "ds"
        if universal:
            ds.to_universal(tmp / "ds", tag, tmp / "universal")
            source = tmp / "universal"
        target.mkdir(exist_ok=True)
        if (target / tag).exists():  # --force (check_target refused it otherwise)
            shutil.rmtree(target / tag)
        os.replace(source / tag, target / tag)
        latest = "latest_universal" if universal else "latest"
        os.replace(source / latest, target / latest)
    except OSError as e:
        raise UsageError(f"cannot write {target}: {e}") from None
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
    size = sum(f.stat().st_size for f in (target / tag).rglob("*") if f.is_file())
    read = ", ".join(f"{k}: {v}" for k, v in sorted(sources.items()))
    kind = "DeepSpeed universal checkpoint (load_universal, any world size)" if universal \
        else f"DeepSpeed checkpoint of {len(files)} rank(s)"
    print(f"wrote {target / tag}: step {step}, {kind}, {len(written)} rank files, "
          f"{fmt_bytes(size)} (tensors read from {read or 'no tier'})")
    return EXIT_OK
