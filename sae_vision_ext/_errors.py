"""Exceptions shared across the package (no heavy imports, so the CLI can catch them cheaply)."""


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGINT/SIGTERM after a complete step; a resumable checkpoint was saved."""


class CorruptShardError(ValueError):
    """An activation-cache shard is missing, truncated or fails its checksum (the message names it)."""


class DiskFullError(ValueError):
    """A write failed (or would fail) for lack of disk space, a quota or a file-size limit; the message
    names the folder, what was written and needed, and what was kept to resume from."""
