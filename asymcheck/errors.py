"""Every error asymcheck raises derives from ``AsymCheckError``.

Each class also keeps the builtin base it always had (``ValueError`` for bad input,
``RuntimeError`` for failed operations), so existing ``except`` clauses keep working.
The storage tiers have their own root, ``tiers.TierError``: that package stands alone.
"""

from __future__ import annotations


class AsymCheckError(Exception):
    """Root of every asymcheck error."""


class CheckpointError(AsymCheckError, RuntimeError):
    """Background work of the checkpointer failed."""


class PolicyError(AsymCheckError, ValueError):
    """A policy file is invalid; the message names the file and the key."""


class ManifestError(AsymCheckError, ValueError):
    """A manifest is corrupt, of an unknown version, or refers to things it must not."""


class RestoreError(AsymCheckError, RuntimeError):
    """No tier holds a good copy of what was asked for."""


class ChunkError(AsymCheckError, ValueError):
    """A chunk failed verification on one tier."""


class ChecksumError(AsymCheckError, ValueError):
    """Decoded bytes do not match their recorded checksum."""


class TierSkipped(AsymCheckError, RuntimeError):
    """The checkpoint was not persisted to a tier whose queue was full (``on_full = skip``)."""


class CommitError(AsymCheckError, RuntimeError):
    """A checkpoint was not committed on a tier because a rank's shard is not durable there."""


class UsageError(AsymCheckError):
    """A mistake of the caller of the command line: reported as one line, exit code 2."""
