"""Open a tier from its URL: the scheme picks the class from a lazy-import table."""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit

from tiers.base import Tier, redact_url

#: scheme -> (module, class name, install hint shown when the module cannot be imported)
TIER_CLASSES: dict[str, tuple[str, str, str]] = {
    "shm": ("tiers.host", "HostTier", ""),
    "file": ("tiers.local", "LocalTier", ""),
    "hdfs": ("tiers.hdfs", "HdfsTier", "pip install 'asymcheck[hdfs]'"),
    # object stores through pyarrow.fs (the pyarrow URI goes to FileSystem.from_uri as it is)
    "s3": ("tiers.arrowfs", "ArrowFsTier", "pip install 'asymcheck[s3]'"),
    "gs": ("tiers.arrowfs", "ArrowFsTier", "pip install 'asymcheck[s3]'"),
    "gcs": ("tiers.arrowfs", "ArrowFsTier", "pip install 'asymcheck[s3]'"),
    "abfs": ("tiers.arrowfs", "ArrowFsTier", "pip install 'asymcheck[s3]'"),
    "abfss": ("tiers.arrowfs", "ArrowFsTier", "pip install 'asymcheck[s3]'"),
}


def known_schemes() -> list[str]:
    return sorted(TIER_CLASSES)


def tier_class(scheme: str) -> type[Tier]:
    """The Tier subclass serving ``scheme``, imported on first use."""
    try:
        module_name, class_name, hint = TIER_CLASSES[scheme]
    except KeyError:
        raise ValueError(f"unknown tier URL scheme {scheme!r}; known schemes: "
                         f"{', '.join(known_schemes())}") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        how = f"; install it with: {hint}" if hint else ""
        raise ImportError(f"the {scheme}:// tier needs {module_name}, which failed to import "
                          f"({exc}){how}") from exc
    cls = getattr(module, class_name)
    if not (isinstance(cls, type) and issubclass(cls, Tier)):
        raise TypeError(f"{module_name}.{class_name} is not a Tier")
    return cls


def open_tier(url: str, *, name: str | None = None, capacity_bytes: int | None = None,
              **options: Any) -> Tier:
    """A tier for ``url`` (``shm://``, ``file://``, ``hdfs://``, ``s3://``, ``gs://``,
    ``abfs://``); options go to its class."""
    scheme = urlsplit(url).scheme
    if not scheme:
        raise ValueError(f"tier URL {redact_url(url)!r} has no scheme; known schemes: "
                         f"{', '.join(known_schemes())}")
    return tier_class(scheme.lower())(url, name=name, capacity_bytes=capacity_bytes, **options)
