"""The on-disk cache: layout, local sha256 pins, verification records, housekeeping."""
from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional
from urllib.parse import unquote, urlsplit

from filelock import FileLock, Timeout

from zoo.errors import ZooError

PINS_FILE = "pins.json"
_STATE_FILE = ".verified.json"  # size/mtime/ctime/inode of files whose hash was checked
_META_LOCK = ".meta.lock"
_RESERVED = {PINS_FILE, _STATE_FILE, _META_LOCK}

PARTIAL = ".incomplete"
QUARANTINE = ".corrupt"
LOCK = ".lock"
VERIFYING = ".verifying-"  # a finished partial, renamed privately while it is hashed
_INTERNAL_SUFFIXES = (PARTIAL, QUARANTINE, LOCK)

# A verification record is only trusted once the file had been left alone for this long
# before it was hashed; a later change then always moves ctime (timestamps are coarse).
RACY_NS = 2_000_000_000


def cache_root() -> Path:
    """The cache directory: $ZOO_HOME, else $XDG_CACHE_HOME/zoo, else ~/.cache/zoo."""
    home = os.environ.get("ZOO_HOME")
    if home:
        return Path(home).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).expanduser().is_absolute():  # the XDG spec says to ignore relative values
        return Path(xdg).expanduser() / "zoo"
    return Path.home() / ".cache" / "zoo"


def check_cache_root() -> Path:
    """The cache root, once it is known to be usable: a folder, or nothing yet below one (it is made on first
    write), with a readable pins file. One clear error here instead of one per model further on."""
    root = cache_root()
    for p in (root, *root.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                what = "it" if p == root else f"{p} (on its path)"
                raise ZooError(f"the cache {root} cannot be used: {what} is a file, not a folder; point ZOO_HOME at "
                               "a folder (or unset it for ~/.cache/zoo)")
            break
    read_pins()
    return root


def relpath_for_url(url: str) -> str:
    """The cache-relative path (POSIX style) that `url` is stored under: its URL path."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https", "file"):
        raise ZooError(f"cannot cache {url!r}: only http://, https:// and file:// URLs are supported")
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if not segments:
        raise ZooError(f"cannot cache {url!r}: the URL has no file path")
    for s in segments:
        # Decoding first so that %2e%2e or %2f cannot sneak out of the cache.
        if s in (".", "..") or "/" in s or "\\" in s or "\x00" in s:
            raise ZooError(f"refusing URL {url!r}: its path segment {s!r} would escape the cache directory")
    if segments[0] in _RESERVED or segments[-1].endswith(_INTERNAL_SUFFIXES) or VERIFYING in segments[-1]:
        raise ZooError(f"refusing URL {url!r}: its file name collides with the cache's own bookkeeping files")
    return "/".join(segments)


def cache_path(url: str) -> Path:
    """Where `url` is (or would be) cached; a mirror fills the same slot as the original URL."""
    return cache_root().joinpath(*relpath_for_url(url).split("/"))


def _rel(path: Path) -> str:
    return path.relative_to(cache_root()).as_posix()


# ---------------------------------------------------------------- locking


@contextlib.contextmanager
def file_lock(
    path: Path, *, on_wait: Optional[Callable[[], None]] = None, blocking: bool = True
) -> Iterator[bool]:
    """Hold an advisory lock on `path`; yields False if it could not be taken (never for blocking=True)."""
    # Locks only save work: on filesystems where they fail we go on without one.
    lock = FileLock(str(path))
    try:
        try:
            lock.acquire(timeout=0.5 if blocking else 0)
        except Timeout:
            if not blocking:
                yield False
                return
            if on_wait is not None:
                on_wait()
            lock.acquire()
    except (OSError, NotImplementedError):
        yield blocking
        return
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            lock.release()


# ---------------------------------------------------------------- JSON metadata


def _load_json(path: Path, *, strict: bool) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        if strict:
            raise ZooError(f"cannot read {path} ({e}); fix or delete it (deleting forgets all local pins)") from None
        return {}
    if not isinstance(data, dict):
        if strict:
            raise ZooError(f"{path} is not a JSON object; fix or delete it (deleting forgets all local pins)")
        return {}
    return data


def write_file_atomic(path: Path, write: Callable[[BinaryIO], None], *, fsync: bool = True) -> None:
    """Call write(f) on a temporary file beside `path`, then rename it over `path`: readers see the old file or
    the new one, whole (fsync=True: also after a power loss)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # not mkstemp: its files are private (0600), and a result should get the usual permissions (umask)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: Any, *, indent: Optional[int] = 1) -> None:
    """Write JSON through a temporary file and a rename: readers see the old file or the new one, whole."""
    text = json.dumps(data, indent=indent, sort_keys=True) + "\n"
    write_file_atomic(path, lambda f: f.write(text.encode("utf-8")))


def _update_json(name: str, change: Callable[[dict], None], *, strict: bool) -> None:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    # Without a working lock two writers can lose each other's update, never corrupt the file.
    with file_lock(root / _META_LOCK):
        data = _load_json(root / name, strict=strict)
        change(data)
        write_json_atomic(root / name, data)


def read_pins() -> dict[str, str]:
    """All local pins: cache-relative path -> sha256."""
    return {k: v for k, v in _load_json(cache_root() / PINS_FILE, strict=True).items() if isinstance(v, str)}


def get_pin(rel: str) -> Optional[str]:
    """The pinned sha256 of a cache-relative path, if any."""
    return read_pins().get(rel)


def set_pin(rel: str, sha256: str) -> None:
    """Pin a cache-relative path to a sha256."""
    _update_json(PINS_FILE, lambda d: d.__setitem__(rel, sha256), strict=True)


def drop_pin(rel: str) -> bool:
    """Forget the pin of a cache-relative path; True if there was one."""
    if rel not in read_pins():
        return False
    _update_json(PINS_FILE, lambda d: d.pop(rel, None), strict=True)
    return True


# ---------------------------------------------------------------- verification records


def _fingerprint(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def is_known_good(rel: str, st: os.stat_result, sha256: str) -> bool:
    """True if `rel` was hashed to `sha256` before and its stat shows no change since."""
    rec = _load_json(cache_root() / _STATE_FILE, strict=False).get(rel)
    return (
        isinstance(rec, dict)
        and rec.get("trusted") is True
        and rec.get("sha256") == sha256
        and rec.get("stat") == _fingerprint(st)
    )


def record_good(rel: str, st: os.stat_result, sha256: str, hashed_at_ns: int) -> None:
    """Remember that the file with stat `st` hashed to `sha256` (hashing began at hashed_at_ns)."""
    trusted = max(st.st_mtime_ns, st.st_ctime_ns) < hashed_at_ns - RACY_NS
    rec = {"sha256": sha256, "stat": _fingerprint(st), "trusted": trusted}
    with contextlib.suppress(OSError):  # only a speed-up; a read-only cache just re-hashes
        _update_json(_STATE_FILE, lambda d: d.__setitem__(rel, rec), strict=False)


def forget_good(rel: str) -> None:
    """Drop the verification record of `rel`."""
    if rel in _load_json(cache_root() / _STATE_FILE, strict=False):
        with contextlib.suppress(OSError):
            _update_json(_STATE_FILE, lambda d: d.pop(rel, None), strict=False)


def now_ns() -> int:
    """Wall-clock time in ns (the clock file timestamps use)."""
    return time.time_ns()


# ---------------------------------------------------------------- listing and cleanup


@dataclass(frozen=True)
class CachedFile:
    """One file in the cache: `state` is complete, partial or quarantined; `pin` is its pinned sha256."""

    rel: str
    path: Path
    size: int
    pin: Optional[str]
    state: str


def _classify(name: str) -> tuple[str, str]:
    """(state, name of the final file) for a cache entry's file name."""
    if name.endswith(PARTIAL):
        return "partial", name[: -len(PARTIAL)]
    if VERIFYING in name:
        return "partial", name.split(VERIFYING)[0]
    if name.endswith(QUARANTINE):
        return "quarantined", name[: -len(QUARANTINE)]
    if name.endswith(LOCK):
        return "lock", name[: -len(LOCK)]
    return "complete", name


def _walk() -> Iterator[tuple[Path, str, str]]:
    """(path, state, final rel) of every file in the cache except the metadata at the root."""
    root = cache_root()
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        for name in sorted(filenames):
            if here == root and (name in _RESERVED or name.startswith(".")):
                continue
            state, final = _classify(name)
            yield here / name, state, _rel(here / final)


def cached_files() -> list[CachedFile]:
    """Every checkpoint file in the cache, including partial and quarantined ones."""
    pins = read_pins()
    out = []
    for path, state, rel in _walk():
        if state == "lock":
            continue
        try:
            size = path.stat().st_size
        except OSError:
            continue  # removed while we looked
        out.append(CachedFile(rel=rel, path=path, size=size, pin=pins.get(rel), state=state))
    return out


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


def _remove_empty_dirs(start: Path) -> None:
    root = cache_root()
    d = start
    while d != root and root in d.parents:
        try:
            d.rmdir()
        except OSError:
            return
        d = d.parent


def remove(url: str) -> list[Path]:
    """Delete a URL's cached file, leftovers and pin; returns what was removed."""
    final = cache_path(url)
    rel = _rel(final)
    removed: list[Path] = []
    with file_lock(Path(str(final) + LOCK), blocking=False) as locked:
        if not locked:
            raise ZooError(f"{final.name} is being downloaded by another process; try again when it has finished")
        candidates = [final, Path(str(final) + PARTIAL), Path(str(final) + QUARANTINE)]
        if final.parent.is_dir():
            candidates += sorted(final.parent.glob(f"{final.name}{VERIFYING}*"))
        removed += [p for p in candidates if _unlink(p)]
    if drop_pin(rel):
        removed.append(cache_root() / PINS_FILE)
    forget_good(rel)
    _unlink(Path(str(final) + LOCK))
    _remove_empty_dirs(final.parent)
    return removed


def prune() -> list[Path]:
    """Delete partial downloads, quarantined files and unused lock files; returns what was removed."""
    removed: list[Path] = []
    # Leftovers first, each under its download lock so an active download is left alone.
    for path, state, rel in list(_walk()):
        if state in ("partial", "quarantined"):
            lock_path = Path(str(cache_root().joinpath(*rel.split("/"))) + LOCK)
            with file_lock(lock_path, blocking=False) as free:
                if free and _unlink(path):
                    removed.append(path)
    # Walk again: taking those locks may have created lock files.
    for path, state, _ in list(_walk()):
        if state == "lock":
            with file_lock(path, blocking=False) as free:
                pass
            if free and _unlink(path):
                removed.append(path)
        _remove_empty_dirs(path.parent)
    return removed
