"""The one exception family of tiermem: catch `TierMemError` to catch them all."""

from __future__ import annotations


class TierMemError(Exception):
    """Root of every error tiermem raises for a domain failure."""


class ConfigError(TierMemError):
    """A configuration value is invalid or inconsistent."""


class InvalidInputError(TierMemError):
    """A message, query or argument was rejected; nothing was stored."""


class StorageError(TierMemError):
    """The database could not be opened, read or written."""


class EmbeddingMismatchError(StorageError):
    """The database was built with another embedding model or dimension."""


class ModelError(TierMemError):
    """A model file is missing or corrupt, or a model call failed."""


class BudgetError(TierMemError):
    """A memory or model budget cannot be met."""


class NotFoundError(TierMemError):
    """An unknown session or snapshot was named."""


class ManagerClosedError(TierMemError):
    """The manager was used after `aclose()`."""
