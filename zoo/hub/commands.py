"""The hub's CLI subcommands: download, verify, cache, pin."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Optional, Sequence

from zoo.errors import ZooError
from zoo.hub import cache, download

Resolver = Callable[[Sequence[str], bool], "list[tuple[str, str, Optional[str]]]"]


def _err(msg: str) -> None:
    print(f"zoo: error: {msg}", file=sys.stderr)


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _resolve(resolve: Resolver, names: Sequence[str], all_models: bool) -> Optional[list]:
    try:
        return list(resolve(list(names), all_models))
    except ZooError as e:
        _err(str(e))
        return None


def cmd_download(args: argparse.Namespace, resolve: Resolver) -> int:
    """Fetch each named checkpoint into the cache and print its path."""
    items = _resolve(resolve, args.names, args.all)
    if items is None:
        return 1
    cache.check_cache_root()
    failed = 0
    for name, url, sha in items:
        try:
            path = download.fetch(url, sha256=sha, quiet=True if args.quiet else None)
        except ZooError as e:
            _err(f"{name}: {e}")
            failed += 1
            continue
        print(f"{name}\t{path}")
    return 1 if failed else 0


def cmd_verify(args: argparse.Namespace, resolve: Resolver) -> int:
    """Re-hash cached checkpoints and print ok / corrupt / unpinned / missing for each."""
    named = bool(args.names)
    items = _resolve(resolve, args.names, not named)
    if items is None:
        return 1
    cache.check_cache_root()
    corrupt = shown = 0
    for name, url, sha in items:
        try:
            status = download.verify(url, sha)
        except ZooError as e:
            _err(f"{name}: {e}")
            corrupt += 1
            continue
        if status == "missing" and not named:
            continue  # without names, report only what is cached
        shown += 1
        corrupt += status == "corrupt"
        print(f"{status:<9} {name}\t{cache.cache_path(url)}")
    if not shown:
        print(f"no cached checkpoints under {cache.cache_root()}")
    if corrupt:
        print("corrupt files are replaced by running `zoo download NAME` again", file=sys.stderr)
    return 1 if corrupt else 0


def _known(resolve: Resolver) -> dict[str, tuple[str, Optional[str]]]:
    """cache-relative path -> (model name, manifest sha256) for every registered model."""
    try:
        return {cache.relpath_for_url(url): (name, sha) for name, url, sha in resolve([], True)}
    except ZooError:
        return {}


def cmd_cache(args: argparse.Namespace, resolve: Resolver) -> int:
    """Show, list, remove or prune what is in the cache."""
    if args.cache_command == "path":
        print(cache.cache_root())
        return 0
    cache.check_cache_root()
    if args.cache_command == "ls":
        files = cache.cached_files()
        if not files:
            print(f"cache {cache.cache_root()} is empty")
            return 0
        known = _known(resolve)
        for f in files:
            name, manifest_sha = known.get(f.rel, (None, None))
            # How a complete file is checked on use: manifest sha256, local pin, or nothing yet.
            state = f.state
            if state == "complete":
                state = "manifest" if manifest_sha else ("pinned" if f.pin else "unpinned")
            where = f.rel if f.state == "complete" else cache._rel(f.path)  # the file's real name: .corrupt, ...
            print(f"{state:<11} {_human(f.size):>10}  {where}" + (f"  ({name})" if name else ""))
        total = _human(sum(f.size for f in files))
        print(f"{len(files)} file{'s' if len(files) != 1 else ''}, {total} in {cache.cache_root()}")
        return 0
    if args.cache_command == "rm":
        items = _resolve(resolve, args.names, False)
        if items is None:
            return 1
        status = 0
        for name, url, _ in items:
            try:
                removed = cache.remove(url)
            except ZooError as e:
                _err(f"{name}: {e}")
                status = 1
                continue
            print(f"removed {name} ({len(removed)} files)" if removed else f"{name} was not cached")
        return status
    removed = cache.prune()
    for p in removed:
        print(f"removed {p}")
    print(f"pruned {len(removed)} file{'s' if len(removed) != 1 else ''}" if removed else "nothing to prune")
    return 0


def cmd_pin(args: argparse.Namespace, resolve: Resolver) -> int:
    """Record the sha256 of each named cached checkpoint as its local pin."""
    items = _resolve(resolve, args.names, False)
    if items is None:
        return 1
    cache.check_cache_root()
    failed = 0
    for name, url, _ in items:
        try:
            print(f"{download.pin(url)}  {name}")
        except ZooError as e:
            _err(f"{name}: {e}")
            failed += 1
    return 1 if failed else 0


def add_commands(subparsers: Any, resolve: Resolver) -> None:
    """Register download, verify, cache and pin on an argparse subparsers object (handlers in args.func)."""

    def bind(handler: Callable[[argparse.Namespace, Resolver], int]) -> Callable[[argparse.Namespace], int]:
        return lambda args: handler(args, resolve)

    p = subparsers.add_parser("download", help="download checkpoints into the cache")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--all", action="store_true", help="every registered model")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=bind(cmd_download))

    p = subparsers.add_parser("verify", help="re-hash cached checkpoints (exit 1 if any is corrupt)")
    p.add_argument("names", nargs="*", metavar="NAME", help="default: every cached checkpoint")
    p.set_defaults(func=bind(cmd_verify))

    p = subparsers.add_parser("cache", help="inspect or clean the download cache")
    sub = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    sub.add_parser("path", help="print the cache directory")
    sub.add_parser("ls", help="list cached files with size and pin state")
    rm = sub.add_parser("rm", help="delete cached checkpoints and their pins")
    rm.add_argument("names", nargs="+", metavar="NAME")
    sub.add_parser("prune", help="delete partial downloads, quarantined files and stale locks")
    p.set_defaults(func=bind(cmd_cache))

    p = subparsers.add_parser("pin", help="pin cached checkpoints to their current sha256")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=bind(cmd_pin))
