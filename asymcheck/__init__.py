"""AsymCheck: asynchronous, tiered, crash-consistent checkpointing for PyTorch."""

from __future__ import annotations

import logging

from .checkpointer import Checkpointer
from .errors import (
    AsymCheckError,
    CheckpointError,
    ManifestError,
    PolicyError,
    RestoreError,
    TierSkipped,
)
from .handle import Completion, SaveHandle
from .manifest import Manifest
from .policy import CompressionPolicy, Policy, TierPolicy, default_policy, load_policy

__all__ = [
    "AsymCheckError",
    "CheckpointError",
    "Checkpointer",
    "Completion",
    "CompressionPolicy",
    "Manifest",
    "ManifestError",
    "Policy",
    "PolicyError",
    "RestoreError",
    "SaveHandle",
    "TierPolicy",
    "TierSkipped",
    "default_policy",
    "load_policy",
]
__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
