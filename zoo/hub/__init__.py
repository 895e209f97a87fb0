"""Pretrained-weights hub: fetch URLs into a verified local cache and load checkpoints safely."""
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
