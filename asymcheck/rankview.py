"""One rank's shards on a tier the ranks share, seen as a tier of their own.

Rank r's ``step-<N>/KEY`` is the shared tier's ``step-<N>/rank-<r>/KEY`` (``layout.rank_key``),
so everything written for one process (the flush pipeline, the restore path, the CLI's
readers) serves a rank's shard unchanged.
"""

from __future__ import annotations

from tiers.base import Payload, Tier, TierStat, validate_prefix

from .layout import parse_step_dir, rank_key, unrank_key


class RankScopedTier(Tier):
    """Rank ``rank``'s view of ``inner``. Closing the view leaves the shared tier open."""

    def __init__(self, inner: Tier, rank: int) -> None:
        super().__init__(inner.url, name=inner.name, capacity_bytes=inner.capacity_bytes)
        self.scheme = inner.scheme
        self.capabilities = inner.capabilities
        self.concurrent_puts = inner.concurrent_puts
        self.uncommitted_grace_s = inner.uncommitted_grace_s
        self.inner = inner
        self.rank = rank

    def _key(self, key: str) -> str:
        try:
            return rank_key(key, self.rank)
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None

    async def put(self, key: str, data: Payload) -> None:
        await self.inner.put(self._key(key), data)

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return await self.inner.get(self._key(key), offset, length)

    async def readinto(self, key: str, out: memoryview, offset: int = 0) -> None:
        await self.inner.readinto(self._key(key), out, offset)

    async def delete(self, key: str) -> None:
        await self.inner.delete(self._key(key))

    async def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        head, sep, _ = prefix.partition("/")
        if sep and parse_step_dir(head) is None:
            return []
        keys = await self.inner.list(self._key(prefix) if sep else prefix)
        found = (unrank_key(k, self.rank) for k in keys)
        return sorted(k for k in found if k is not None and k.startswith(prefix))

    async def stat(self, key: str) -> TierStat:
        st = await self.inner.stat(self._key(key))
        return TierStat(key=key, size_bytes=st.size_bytes, mtime_s=st.mtime_s)

    async def close(self) -> None:
        """The shared tier is closed by its owner."""
