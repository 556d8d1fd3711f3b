"""How the commands print: sizes, times, tables, JSON, a progress bar, and their exit codes."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

from ..manifest import ChunkMeta, Manifest

EXIT_OK, EXIT_FAULT, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # as if killed by SIGPIPE, like other command-line tools
EXIT_INTERRUPTED = 130


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
