"""The tier policy file (TOML) as validated, frozen dataclasses.

Every error is one line naming the file and the key, e.g.
``tiers.toml: tier[1].keep: must be an integer >= 1 (0 only on the shm:// host tier), got 0``.

A policy whose first tier is not in shared memory gets a host stage in front of it, so a
policy of one ``file://`` tier is enough to save to local disk.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from tiers.registry import known_schemes

from .errors import PolicyError

log = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9,
          "GB": 10**9, "T": 10**12, "TB": 10**12, "P": 10**15, "PB": 10**15,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "PIB": 2**50}

_TIER_KEYS = {"name", "url", "capacity", "keep", "every", "on_full", "batch", "options"}
_COMPRESSION_KEYS = {"mode", "full_every", "level", "min_bytes"}
_TOP_KEYS = {"tier", "compression"}



@dataclass(frozen=True)
class TierPolicy:
    name: str
    url: str
    capacity_bytes: int | None = None
    keep: int = 1
    every: int = 1
    on_full: str = "wait"
    batch_bytes: int | str = "auto"  # "auto" (cost model), "off" (a file per tensor) or bytes
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        return urlparse(self.url).scheme

    @property
    def retained(self) -> int:
        """How many committed checkpoints retention keeps here: ``keep``, and never fewer than
        the newest. The host tier's ``keep = 0`` keeps its newest copy only until the next
        save takes its block (once a tier below holds it, see ``hoststage``)."""
        return max(self.keep, 1)


@dataclass(frozen=True)
class CompressionPolicy:
    mode: str = "auto"  # off | auto | always
    full_every: int = 10
    level: int = 1
    min_bytes: int = 1 << 20  # smaller tensors are always stored raw


@dataclass(frozen=True)
class Policy:
    tiers: tuple[TierPolicy, ...]
    compression: CompressionPolicy = CompressionPolicy()
    source: str = "<default>"

    @property
    def staging(self) -> TierPolicy:
        return self.tiers[0]

    def tier(self, name: str) -> TierPolicy:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(f"no tier named {name!r} in {self.source} "
                       f"(tiers: {', '.join(t.name for t in self.tiers)})")


def parse_size(value: Any) -> int:
    """``"8GiB"`` -> 8589934592; ints pass through. Raises ValueError."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"must be > 0, got {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be a size such as \"8GiB\", got {value!r}")
    m = _SIZE.match(value)
    unit = (m.group(2) or "").upper() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"must be a size such as \"8GiB\" or \"512MB\", got {value!r}")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"must be > 0, got {value!r}")
    return size


def default_policy(directory: str | os.PathLike[str] = "checkpoints") -> Policy:
    """Host shared memory (named after the directory, so a new process finds it) + local files."""
    local = Path(directory).absolute()
    return Policy(tiers=(
        TierPolicy(name="host", url=f"shm://asymcheck-{_shm_tag(str(local))}", keep=2),
        TierPolicy(name="local", url=f"file://{local}", keep=3),
    ))


def _shm_tag(*keys: str) -> str:
    """A short name part derived from ``keys``: the same keys (a restarted process with the
    same policy) name the same shared memory."""
    return hashlib.sha1("\n".join(keys).encode()).hexdigest()[:12]


def _host_stage(tiers: list[TierPolicy]) -> TierPolicy:
    """The host tier put in front of a policy whose first tier is not in shared memory:
    one checkpoint in the default budget (half of /dev/shm), named after the tiers."""
    names = {t.name for t in tiers}
    candidates = itertools.chain(("host", "host-stage"),
                                 (f"host-stage-{i}" for i in itertools.count(2)))
    name = next(n for n in candidates if n not in names)
    tag = _shm_tag(*(t.url for t in tiers))
    return TierPolicy(name=name, url=f"shm://asymcheck-{tag}", capacity_bytes=None, keep=1)


def load_policy(path: str | os.PathLike[str]) -> Policy:
    source = str(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise PolicyError(f"{source}: policy file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{source}: not valid TOML: {e}") from None
    return parse_policy(doc, source=source, base_dir=Path(path).parent)


def parse_policy(doc: dict[str, Any], *, source: str = "<policy>",
                 base_dir: Path | None = None) -> Policy:
    def fail(key: str, msg: str) -> PolicyError:
        return PolicyError(f"{source}: {key}: {msg}")

    for key in doc:
        if key not in _TOP_KEYS:
            raise fail(key, f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})")
    raw_tiers = doc.get("tier")
    if not isinstance(raw_tiers, list) or not raw_tiers:
        raise fail("tier", "at least one [[tier]] table is required")
    tiers = []
    for i, raw in enumerate(raw_tiers):
        tiers.append(_parse_tier(raw, f"tier[{i}]", fail, base_dir))
    names = [t.name for t in tiers]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise fail(f"tier[{i}].name", f"duplicate tier name {n!r}")
    if any(t.scheme == "shm" for t in tiers[1:]):
        raise fail("tier", "only the first tier may be a shm:// tier")
    if tiers[0].scheme != "shm":  # checkpoints are staged in memory: add a host stage
        stage = _host_stage(tiers)
        tiers.insert(0, stage)
        log.info("%s: the first tier is not in shared memory; added the host stage %r (%s)",
                 source, stage.name, stage.url)
    return Policy(tiers=tuple(tiers), compression=_parse_compression(doc.get("compression", {}),
                                                                     fail), source=source)


def _parse_tier(raw: Any, where: str, fail: Any, base_dir: Path | None) -> TierPolicy:
    if not isinstance(raw, dict):
        raise fail(where, "must be a table")
    for key in raw:
        if key not in _TIER_KEYS:
            raise fail(f"{where}.{key}", f"unknown key (known: {', '.join(sorted(_TIER_KEYS))})")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise fail(f"{where}.name", f"must be a name of letters, digits, '_', '.', '-', "
                   f"got {name!r}")
    url = raw.get("url")
    if not isinstance(url, str) or not url:
        raise fail(f"{where}.url", "is required")
    scheme = urlparse(url).scheme
    if scheme not in known_schemes():
        raise fail(f"{where}.url", f"unknown scheme {scheme!r} in {url!r} "
                   f"(known: {', '.join(known_schemes())})")
    if scheme == "file":
        url = _resolve_file_url(url, base_dir, fail, f"{where}.url")
    if scheme == "shm":
        parsed = urlparse(url)
        if ".." in unquote(parsed.netloc + parsed.path).split("/"):
            raise fail(f"{where}.url", f"{url!r} must not contain '..'")
    capacity = None
    if "capacity" in raw:
        try:
            capacity = parse_size(raw["capacity"])
        except ValueError as e:
            raise fail(f"{where}.capacity", str(e)) from None
    ints = {}
    for key, default in (("keep", 1), ("every", 1)):
        v = raw.get(key, default)
        least = 0 if key == "keep" and scheme == "shm" else 1
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            hint = " (0 only on the shm:// host tier)" if key == "keep" and least else ""
            raise fail(f"{where}.{key}", f"must be an integer >= {least}{hint}, got {v!r}")
        ints[key] = v
    on_full = raw.get("on_full", "wait")
    if on_full not in ("wait", "skip"):
        raise fail(f"{where}.on_full", f"must be \"wait\" or \"skip\", got {on_full!r}")
    batch: int | str = raw.get("batch", "auto")
    if batch not in ("auto", "off"):
        try:
            batch = parse_size(batch)
        except ValueError as e:
            raise fail(f"{where}.batch", f"must be \"auto\", \"off\" or a size: {e}") from None
    options = raw.get("options", {})
    if not isinstance(options, dict):
        raise fail(f"{where}.options", "must be a table")
    return TierPolicy(name=name, url=url, capacity_bytes=capacity, keep=ints["keep"],
                      every=ints["every"], on_full=on_full, batch_bytes=batch,
                      options=dict(options))


def _resolve_file_url(url: str, base_dir: Path | None, fail: Any, where: str) -> str:
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise fail(where, f"file URLs name a local path, got host {parsed.netloc!r}")
    path = Path(parsed.path)
    if ".." in Path(unquote(parsed.path)).parts:
        raise fail(where, f"path {parsed.path!r} must not contain '..'")
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    return f"file://{path.absolute()}"


def _parse_compression(raw: Any, fail: Any) -> CompressionPolicy:
    if not isinstance(raw, dict):
        raise fail("compression", "must be a table")
    for key in raw:
        if key not in _COMPRESSION_KEYS:
            raise fail(f"compression.{key}",
                       f"unknown key (known: {', '.join(sorted(_COMPRESSION_KEYS))})")
    defaults = CompressionPolicy()
    mode = raw.get("mode", defaults.mode)
    if mode not in ("off", "auto", "always"):
        raise fail("compression.mode", f"must be off, auto or always, got {mode!r}")
    full_every = raw.get("full_every", defaults.full_every)
    if not isinstance(full_every, int) or isinstance(full_every, bool) or full_every < 1:
        raise fail("compression.full_every", f"must be an integer >= 1, got {full_every!r}")
    level = raw.get("level", defaults.level)
    if not isinstance(level, int) or isinstance(level, bool) or not 1 <= level <= 22:
        raise fail("compression.level", f"must be an integer in [1, 22], got {level!r}")
    min_bytes = defaults.min_bytes
    if "min_bytes" in raw:
        try:
            min_bytes = parse_size(raw["min_bytes"])
        except ValueError as e:
            raise fail("compression.min_bytes", str(e)) from None
    return CompressionPolicy(mode=mode, full_every=full_every, level=level, min_bytes=min_bytes)
