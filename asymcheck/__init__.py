"""AsymCheck: asynchronous, tiered, crash-consistent checkpointing for PyTorch."""

from __future__ import annotations

import logging

from .checkpointer import Checkpointer, CheckpointError
from .handle import Completion, SaveHandle
from .manifest import Manifest, ManifestError
from .policy import CompressionPolicy, Policy, PolicyError, TierPolicy, default_policy, load_policy
from .restore import RestoreError
from .schedule import TierSkipped

__all__ = [
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
