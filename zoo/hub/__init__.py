"""Pretrained-weights hub: fetch URLs into a verified local cache and load checkpoints safely.

Environment: ZOO_HOME (cache root), ZOO_MIRROR (base replacing https://dl.fbaipublicfiles.com/detectron2/:
http(s)://, file:// or a directory), ZOO_OFFLINE=1 (never use the network), ZOO_QUIET=1 (no progress bar),
ZOO_RETRIES / ZOO_RETRY_BASE_DELAY / ZOO_TIMEOUT (retry count, first backoff and read timeout in seconds).
"""
from zoo.hub.cache import CachedFile, cache_path, cache_root, cached_files, prune, read_pins, remove
from zoo.hub.checkpoint import load_checkpoint
from zoo.hub.download import fetch, pin, verify

__all__ = [
    "CachedFile",
    "cache_path",
    "cache_root",
    "cached_files",
    "fetch",
    "load_checkpoint",
    "pin",
    "prune",
    "read_pins",
    "remove",
    "verify",
]
