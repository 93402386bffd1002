"""The store's exceptions, one class per status a caller maps to its own error.

Every part raises these, and callers (the wasm host functions) catch them by
kind, so they live apart from any one part.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of the store's errors."""


class StoreFull(StoreError):
    """No room (eviction="none", queue items, or a fixed table is full): callers map it to an error status."""


class TooLarge(StoreError, ValueError):
    """A key, value, namespace or metric name over the store's limits."""


class NotFound(StoreError, LookupError):
    """No such queue or metric."""


class Empty(StoreError):
    """Dequeue from an empty queue."""
