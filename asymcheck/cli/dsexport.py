"""``asymcheck restore --format deepspeed | deepspeed-universal``: a checkpoint saved through a
DeepSpeed engine (``asymcheck.integrations.deepspeed``) written out as DeepSpeed's own files.

``deepspeed`` writes every saved rank's files under ``DIR/<tag>/`` and ``DIR/latest``: the
checkpoint DeepSpeed's default engine would have written, for the same world size.
``deepspeed-universal`` converts those with DeepSpeed's ``ds_to_universal`` into ``DIR/<tag>/``
and ``DIR/latest_universal``: DeepSpeed loads that at any world size (``"checkpoint":
{"load_universal": true}``). Each rank's shard is read from the nearest tier with a good copy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import RestoreError, UsageError
from ..restore import LoadedCheckpoint
from ._output import EXIT_OK, fmt_bytes

DEEPSPEED_FORMATS = ("deepspeed", "deepspeed-universal")


def deepspeed_integration() -> Any:
    """``asymcheck.integrations.deepspeed``; a usage error naming the extra without it."""
    try:
        from ..integrations import deepspeed
    except ImportError as e:
        raise UsageError(str(e)) from None
    return deepspeed


def _files_by_rank(shards: list[LoadedCheckpoint], extra: str
                   ) -> tuple[str, list[dict[str, Any]], dict[str, int]]:
    """The DeepSpeed tag of one checkpoint, each saved rank's recorded files (``shards``: one
    per saved rank), and the tensors read per tier."""
    step = shards[0].step
    files: list[dict[str, Any]] = []
    sources: dict[str, int] = {}
    tag: str | None = None
    for rank, shard in enumerate(shards):
        state = shard.state["extras"].get(extra)
        if not isinstance(state, dict) or not isinstance(state.get("files"), dict):
            raise RestoreError(f"step {step} was not saved through a DeepSpeed engine "
                               "(asymcheck.integrations.deepspeed)")
        if tag is not None and state["tag"] != tag:
            raise RestoreError(f"step {step}: rank {rank} saved tag {state['tag']!r}, "
                               f"rank 0 {tag!r}")
        tag = str(state["tag"])
        files.append(state["files"])
        for name, count in shard.sources.items():
            sources[name] = sources.get(name, 0) + count
    assert tag is not None
    return tag, files, sources


def export_deepspeed(ds: Any, shards: list[LoadedCheckpoint], target: Path,
                     universal: bool) -> int:
    """Write the checkpoint of ``shards`` (every saved rank's) to ``target`` with the
    DeepSpeed integration ``ds``."""
    step = shards[0].step
    tag, files, sources = _files_by_rank(shards, ds.EXTRA)
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
