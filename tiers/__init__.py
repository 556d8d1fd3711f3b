"""Generic asyncio storage tiers: host shared memory, local disk, HDFS (lazy)."""

from tiers.base import Capabilities, CapacityError, KeyNotFound, Tier, TierError, TierStat
from tiers.host import HostBlock, HostTier
from tiers.local import LocalTier
from tiers.registry import known_schemes, open_tier

__all__ = [
    "Capabilities",
    "CapacityError",
    "HostBlock",
    "HostTier",
    "KeyNotFound",
    "LocalTier",
    "Tier",
    "TierError",
    "TierStat",
    "known_schemes",
    "open_tier",
]
