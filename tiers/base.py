"""The storage tier contract: a small async key/value store of byte blobs.

Keys are ``/``-separated relative paths (``step-0000000042/data-00000.bin``).
A ``put`` is atomic: readers see the whole value or nothing, never a torn
write. Tiers know nothing about torch or checkpoints.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

BytesLike = bytes | bytearray | memoryview
Payload = BytesLike | Sequence[BytesLike]


class TierError(OSError):
    """A tier operation failed; the message names the tier and the key."""


class KeyNotFound(TierError, KeyError):
    """The key does not exist on this tier."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "key not found"


class CapacityError(TierError):
    """An item can never fit: it is larger than the tier's whole budget."""


@dataclass(frozen=True)
class TierStat:
    key: str
    size_bytes: int
    mtime_s: float


def validate_key(key: str) -> str:
    """Reject keys that could escape the tier's root or confuse a backend."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"tier key must be a non-empty string, got {key!r}")
    if "\x00" in key or "\\" in key:
        raise ValueError(f"tier key {key!r} contains a NUL or backslash")
    if key.startswith("/"):
        raise ValueError(f"tier key {key!r} is absolute")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"tier key {key!r} has an empty, '.' or '..' component")
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a key-shaped string (a trailing '/' is allowed)."""
    if prefix:
        validate_key(prefix.rstrip("/") or "x")
    return prefix


#: Query parameters whose values are secrets: a name containing one of these words.
_SECRET_WORDS = ("secret", "token", "password", "passwd", "key", "credential", "signature")
#: Schemes whose URL user name is a credential (an access key), not a plain name.
_USER_IS_SECRET = frozenset({"s3", "s3a", "gs", "gcs"})
REDACTED = "***"


def is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return lowered == "sig" or any(word in lowered for word in _SECRET_WORDS)


def redact_url(url: str) -> str:
    """``url`` with its secrets replaced by ``***``: the password of its user info (and the
    user name where it is an access key) and query values such as ``secret_key=...``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, sep, _ = userinfo.partition(":")
        if parts.scheme.lower() in _USER_IS_SECRET and user:
            user = REDACTED
        netloc = f"{user}{sep}{REDACTED if sep else ''}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = "&".join(f"{quote(k, safe='')}="
                         f"{REDACTED if is_secret_name(k) else quote(v, safe=':/,')}"
                         for k, v in pairs)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def payload_parts(data: Payload) -> list[memoryview]:
    """Normalise a payload to a list of flat byte views (no copies)."""
    parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    return [memoryview(p).cast("B") if memoryview(p).ndim != 1 or memoryview(p).format != "B"
            else memoryview(p) for p in parts]


def payload_size(parts: Sequence[memoryview]) -> int:
    return sum(p.nbytes for p in parts)


@dataclass(frozen=True)
class Capabilities:
    """What a tier offers, declared by its class: callers ask these, never the class itself."""

    #: a committed key outlives the process that wrote it (and, synced, a machine crash)
    durable: bool = True
    #: keys live in host memory and can be mapped (``view``, ``reserve``): the staging tier
    in_memory: bool = False
    #: ``get``/``readinto`` at an offset read only that range
    ranged_reads: bool = True
    #: a crashed write can leave tmp files behind, which ``remove_stale_tmp`` removes
    stale_tmp: bool = False


class Tier(abc.ABC):
    """One storage tier. Every method is a coroutine and never blocks the event loop."""

    #: URL scheme this tier serves, e.g. ``"file"``.
    scheme: str = ""
    #: what this tier offers (see ``Capabilities``)
    capabilities: Capabilities = Capabilities()
    #: How many puts of one flush may run at once: 2 lets a file be written while the
    #: previous one syncs; 1 keeps a single stream.
    concurrent_puts: int = 1
    #: Data of a step without a manifest is removed (at start-up, by ``asymcheck gc``) only
    #: once its newest key is older than this. 0: at once, the right thing where a crashed
    #: write leaves a tmp file rather than a visible key. Tiers without rename, whose data keys
    #: become visible one by one while a save is still writing, set a grace period.
    uncommitted_grace_s: float = 0.0

    def __init__(self, url: str, *, name: str | None = None,
                 capacity_bytes: int | None = None) -> None:
        self.url = url
        self.name = name or self.scheme or url
        self.capacity_bytes = capacity_bytes

    @abc.abstractmethod
    async def put(self, key: str, data: Payload) -> None:
        """Store ``data`` (one buffer or a sequence written back to back) atomically."""

    @abc.abstractmethod
    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read ``length`` bytes at ``offset`` (to the end when None). Raises KeyNotFound."""

    async def readinto(self, key: str, out: memoryview, offset: int = 0) -> None:
        """Fill ``out`` with the bytes at ``offset``; tiers override to skip a copy."""
        if out.ndim != 1 or out.format != "B":
            out = out.cast("B")
        data = await self.get(key, offset, out.nbytes)
        if len(data) != out.nbytes:
            raise TierError(f"{self.name}: short read of {key!r}: "
                            f"{len(data)} of {out.nbytes} bytes at offset {offset}")
        out[:] = data

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove ``key``. Raises KeyNotFound when it does not exist."""

    @abc.abstractmethod
    async def list(self, prefix: str = "") -> list[str]:
        """All committed keys starting with ``prefix``, sorted."""

    @abc.abstractmethod
    async def stat(self, key: str) -> TierStat:
        """Size and modification time. Raises KeyNotFound."""

    async def exists(self, key: str) -> bool:
        try:
            await self.stat(key)
        except KeyNotFound:
            return False
        return True

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; returns how many were removed."""
        keys = await self.list(prefix)
        await asyncio.gather(*(self.delete(k) for k in keys))
        return len(keys)

    @property
    def local_dir(self) -> Path | None:
        """The directory holding this tier's keys when it is a local file system path."""
        return None

    async def remove_stale_tmp(self, older_than_s: float = 3600.0) -> int:
        """Remove tmp files that crashed writes left behind (never a live write's); returns
        how many. Tiers whose capabilities declare ``stale_tmp`` override this."""
        return 0

    async def close(self) -> None:  # noqa: B027 - a no-op default, not abstract
        """Release clients, threads and handles. Idempotent."""

    async def __aenter__(self) -> Tier:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, url={self.url!r})"
