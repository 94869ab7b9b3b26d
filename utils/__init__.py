"""Infrastructure shared by every part of semcorr: atomic file I/O, checksummed shard stores, the cache folder."""

from .cache import cache_dir
from .file_io import (
    atomic_directory,
    atomic_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_writable,
    json_safe,
    read_json,
    replace_directory,
    sha256_bytes,
    sha256_file,
)
from .shard_store import ShardStore

__all__ = [
    "ShardStore",
    "atomic_directory",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "cache_dir",
    "check_writable",
    "json_safe",
    "read_json",
    "replace_directory",
    "sha256_bytes",
    "sha256_file",
]
