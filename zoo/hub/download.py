"""Fetch a URL into the cache: resumable, retried, verified, safe under concurrency."""
from __future__ import annotations

import hashlib
import http.client
import os
import random
import re
import secrets
import sys
import time
from pathlib import Path
from typing import IO, Iterator, Literal, Optional
from urllib.parse import urlsplit
from urllib.request import url2pathname

import requests
import urllib3
from tqdm import tqdm

from zoo.errors import DownloadError, IntegrityError, ZooError
from zoo.hub import cache

CANONICAL_PREFIX = "https://dl.fbaipublicfiles.com/detectron2/"
CHUNK = 256 * 1024  # also bounds what a killed process loses
CONNECT_TIMEOUT = 10.0
USER_AGENT = "zoo-hub/0.1"
_MAX_ATTEMPTS = 100  # hard stop even while every attempt makes progress
UNREACHABLE_RETRIES = 2  # default retries when the server was never reached (ZOO_RETRIES overrides)

Status = Literal["ok", "corrupt", "unpinned", "missing"]


def _env_flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("", "0", "false", "no", "off"):
        return False
    raise ZooError(f"{name}={raw!r} is neither on nor off; set it to 1 or 0, or unset it")


def _env_number(name: str, default: float, *, minimum: float = 0.0, integer: bool = False) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ZooError(f"{name}={raw!r} is not a number; fix or unset it") from None
    if not value >= minimum or (integer and value != int(value)) or value == float("inf"):
        kind = "a whole number" if integer else "a number"
        raise ZooError(f"{name}={raw!r} must be {kind} of at least {minimum:g}; fix or unset it")
    return value


def _is_quiet(quiet: Optional[bool]) -> bool:
    if quiet is not None:
        return quiet
    if _env_flag("ZOO_QUIET"):
        return True
    try:
        return not sys.stderr.isatty()
    except (AttributeError, ValueError):
        return True


def _norm_sha(sha256: Optional[str]) -> Optional[str]:
    if sha256 is None:
        return None
    s = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", s):
        raise ZooError(f"invalid sha256 {sha256!r}: expected 64 hex digits; fix the manifest entry")
    return s


def md5_prefix(filename: str) -> Optional[str]:
    """The md5 prefix a Detectron2 file name carries ('model_final_f10217.pkl' -> 'f10217'), else None."""
    stem = filename.rsplit(".", 1)[0] if "." in filename else filename
    if "_" not in stem:
        return None
    tail = stem.rsplit("_", 1)[1]
    return tail.lower() if re.fullmatch(r"[0-9a-fA-F]{6,32}", tail) else None


def hash_file(path: Path, *, md5: bool = False) -> tuple[str, Optional[str]]:
    """(sha256, md5 or None) hex digests of a file, read once."""
    sha = hashlib.sha256()
    m5 = hashlib.md5(usedforsecurity=False) if md5 else None
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            sha.update(block)
            if m5 is not None:
                m5.update(block)
    return sha.hexdigest(), (m5.hexdigest() if m5 is not None else None)


def _quarantine(path: Path, final: Path) -> str:
    """Move a bad file out of the way; returns what was done, for the error message."""
    q = Path(str(final) + cache.QUARANTINE)
    try:
        os.replace(path, q)
    except FileNotFoundError:
        pass  # another process already moved it
    except OSError:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        return "deleted it"
    return f"moved it to {q}"


# ---------------------------------------------------------------- sources


def _file_url_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise DownloadError(f"file URL {url!r} names a remote host; use file:///absolute/path")
    return Path(url2pathname(parts.path))


def _source(url: str) -> tuple[str, object, bool]:
    """(kind, location, mirrored): ('http', url) or ('file', Path) where the bytes come from."""
    mirror = os.environ.get("ZOO_MIRROR", "").strip()
    if mirror and url.startswith(CANONICAL_PREFIX):
        rest = url[len(CANONICAL_PREFIX):]
        base = mirror.rstrip("/")
        scheme = urlsplit(base).scheme.lower()
        if scheme in ("http", "https"):
            return "http", f"{base}/{rest}", True
        if scheme == "file":
            root = _file_url_path(base)
        elif len(scheme) > 1:  # one letter is a Windows drive
            raise DownloadError(f"ZOO_MIRROR={mirror!r} is not supported; use http(s)://..., file://... or a directory")
        else:
            root = Path(mirror).expanduser()
        # The cache path was already checked segment by segment, so this stays under root.
        rel = cache.relpath_for_url(url).split("/")[1:]
        return "file", root.joinpath(*rel), True
    if urlsplit(url).scheme.lower() == "file":
        return "file", _file_url_path(url), False
    return "http", url, False


# ---------------------------------------------------------------- transfer


class _Retry(Exception):
    def __init__(self, reason: str, progressed: bool = False, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.progressed = progressed
        self.unreachable = unreachable  # the server was never reached (no DNS, refused, timed out)


def _connect_failure(src: str, e: requests.RequestException) -> str:
    """A one-phrase reason for a request that reached no server (requests' own text runs to 400 characters)."""
    host = urlsplit(src).netloc
    text = str(e)
    if isinstance(e, requests.Timeout):
        return f"no answer from {host} in time ({type(e).__name__})"
    if any(k in text for k in ("NameResolutionError", "Name or service not known", "getaddrinfo failed",
                                "nodename nor servname", "Temporary failure in name resolution")):
        return f"cannot resolve the host name {host}"
    if "Connection refused" in text or "ConnectionRefusedError" in text:
        return f"{host} refused the connection"
    return f"cannot connect to {host}: {text[:200]}"


class _Progress:
    """A tqdm bar created on first use, reused across retries."""

    def __init__(self, quiet: bool, label: str) -> None:
        self.quiet, self.label, self.bar = quiet, label, None

    def start(self, total: Optional[int], initial: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=self.label, file=sys.stderr, dynamic_ncols=True)
        else:
            self.bar.reset(total=total)
            self.bar.update(initial)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _open_partial(partial: Path) -> IO[bytes]:
    # No O_TRUNC and positional writes: concurrent writers (if locks fail) write the same
    # bytes at the same offsets, so they cannot corrupt each other.
    try:
        return os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT, 0o644), "wb")
    except OSError as e:
        raise _disk_error(partial, e) from None


def _disk_error(path: Path, e: OSError) -> DownloadError:
    return DownloadError(
        f"cannot write {path}: {e.strerror or e}; free disk space or point ZOO_HOME at a writable directory"
    )


def _write(f: IO[bytes], data: bytes, partial: Path) -> None:
    try:
        f.write(data)
    except OSError as e:
        raise _disk_error(partial, e) from None


def _finish(f: IO[bytes], partial: Path, total: int) -> None:
    try:
        f.flush()
        if os.fstat(f.fileno()).st_size > total:  # tail of an older, longer partial
            f.truncate(total)
        os.fsync(f.fileno())
    except OSError as e:
        raise _disk_error(partial, e) from None


def _copy_local(src: Path, partial: Path, progress: _Progress, url: str, mirrored: bool) -> int:
    try:
        fsrc = open(src, "rb")
    except FileNotFoundError:
        hint = "check the URL"
        if mirrored:
            hint = "check ZOO_MIRROR (the mirror must have the same layout below detectron2/)"
        raise DownloadError(f"{src} does not exist (needed for {url}); {hint}") from None
    except OSError as e:
        raise DownloadError(f"cannot read {src}: {e.strerror or e}; check the path and its permissions") from None
    with fsrc, _open_partial(partial) as f:
        total = os.fstat(fsrc.fileno()).st_size
        progress.start(total, 0)
        while block := fsrc.read(CHUNK):
            _write(f, block, partial)
            progress.update(len(block))
        _finish(f, partial, total)
    return total


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_NETWORK_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)


def _body_blocks(r: requests.Response) -> Iterator[bytes]:
    # read1 returns what has arrived; a full-size read() would discard it when the connection drops.
    raw = r.raw
    if not hasattr(raw, "read1"):  # urllib3 < 2
        yield from r.iter_content(chunk_size=64 * 1024)
        return
    while block := raw.read1(CHUNK, decode_content=True):
        yield block


def _http_attempt(session: requests.Session, src: str, partial: Path, progress: _Progress, url: str,
                  mirrored: bool) -> int:
    """One GET, resuming from the partial file; returns the total size once the partial is complete."""
    offset = _size(partial)
    headers = {"Accept-Encoding": "identity", "User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    read_timeout = _env_number("ZOO_TIMEOUT", 60.0, minimum=0.001)
    try:
        r = session.get(src, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT, read_timeout))
    except requests.exceptions.SSLError as e:  # a bad certificate does not heal by retrying
        raise DownloadError(
            f"TLS error for {src} ({e}); check the system clock and CA certificates (REQUESTS_CA_BUNDLE) "
            f"or use ZOO_MIRROR"
        ) from None
    except (requests.ConnectionError, requests.Timeout) as e:
        raise _Retry(_connect_failure(src, e), unreachable=True) from None
    except requests.RequestException as e:
        raise DownloadError(f"cannot request {src}: {e}; check the URL and ZOO_MIRROR") from None
    with r:
        status = r.status_code
        if status == 416:
            m = _CONTENT_RANGE.match(r.headers.get("Content-Range", "").replace("bytes */", "bytes 0-0/"))
            if m and m.group(3) != "*" and int(m.group(3)) == offset:
                return offset  # the partial already holds every byte
            partial.unlink(missing_ok=True)  # longer than the file: stale, start over
            raise _Retry("server refused the resume offset; restarting", progressed=True)
        if status in (408, 429) or status >= 500:
            raise _Retry(f"HTTP {status} {r.reason}")
        if status == 206:
            m = _CONTENT_RANGE.match(r.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) > offset or m.group(3) == "*":
                partial.unlink(missing_ok=True)
                raise _Retry("server sent an unusable partial response; restarting")
            start, total = int(m.group(1)), int(m.group(3))
        elif status == 200:
            start = 0  # fresh download, or a server that ignored Range: restart from byte 0
            length = r.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            where = f" (ZOO_MIRROR for {url}); check ZOO_MIRROR" if mirrored else "; check the URL"
            raise DownloadError(f"HTTP {status} {r.reason} for {src}{where} (not retried)")
        progress.start(total, start)
        pos = start
        with _open_partial(partial) as f:
            f.seek(start)
            chunks = _body_blocks(r)
            while True:
                try:
                    block = next(chunks)
                except StopIteration:
                    break
                except _NETWORK_ERRORS as e:
                    f.flush()
                    reason = f"connection lost after {pos} bytes ({type(e).__name__})"
                    raise _Retry(reason, progressed=pos > start) from None
                _write(f, block, partial)
                pos += len(block)
                progress.update(len(block))
            if total is not None and pos < total:
                f.flush()
                raise _Retry(f"connection closed after {pos} of {total} bytes", progressed=pos > start)
            total = pos if total is None else total
            _finish(f, partial, total)
        return total


def _download_http(src: str, partial: Path, progress: _Progress, url: str, mirrored: bool) -> int:
    retries = int(_env_number("ZOO_RETRIES", 5, integer=True))
    # A host that does not resolve or refuses rarely heals within seconds; without this an offline user waited
    # 31 s of back-off for the error. An explicit ZOO_RETRIES applies to every failure.
    unreachable_retries = retries if "ZOO_RETRIES" in os.environ else min(retries, UNREACHABLE_RETRIES)
    base_delay = _env_number("ZOO_RETRY_BASE_DELAY", 1.0)
    failures = attempts = 0
    with requests.Session() as session:
        while True:
            attempts += 1
            try:
                return _http_attempt(session, src, partial, progress, url, mirrored)
            except _Retry as e:
                # Progress resets the backoff: a flaky link that keeps moving is not a dead one.
                failures = 1 if e.progressed else failures + 1
                if failures > (unreachable_retries if e.unreachable else retries) or attempts >= _MAX_ATTEMPTS:
                    kept = partial.exists() and partial.stat().st_size > 0
                    if kept:
                        tail = ", the partial download is kept and resumes"
                    elif e.unreachable and not mirrored:
                        tail = ("; without network access, set ZOO_MIRROR to a local copy of the files (README, "
                                "Environment variables) or pass weights=PATH (--weights PATH on the command line)")
                    else:
                        tail = ""
                    raise DownloadError(
                        f"giving up on {src} after {attempts} attempt{'s' if attempts != 1 else ''} ({e.reason}); "
                        f"check the network and run again{tail}"
                    ) from None
                time.sleep(min(base_delay * 2 ** (failures - 1), 60.0) * (1 + 0.1 * random.random()))


# ---------------------------------------------------------------- verification


def _check_cached(final: Path, url: str, sha256: Optional[str]) -> Optional[Path]:
    """The cached file if it verifies, None if absent; raises IntegrityError (after quarantine) if not.
    The message ends with what was done to the file; callers add what happens next."""
    try:
        st = final.stat()
    except (FileNotFoundError, NotADirectoryError):  # the latter: ZOO_HOME or a folder in it is a file
        return None
    rel = cache.relpath_for_url(url)
    expected = sha256 or cache.get_pin(rel)
    if expected and cache.is_known_good(rel, st, expected):
        return final
    started = cache.now_ns()
    prefix = None if expected else md5_prefix(final.name)
    try:
        actual, md5 = hash_file(final, md5=prefix is not None)
    except FileNotFoundError:
        return None
    if expected and actual != expected:
        q = _quarantine(final, final)
        origin = "given by the manifest" if sha256 else "pinned locally"
        raise IntegrityError(
            f"cached {final.name} is corrupt: sha256 {actual}, expected {expected} ({origin}); {q}"
        )
    if prefix and not md5.startswith(prefix):
        q = _quarantine(final, final)
        raise IntegrityError(
            f"cached {final.name} is corrupt: md5 {md5} does not start with {prefix} as its name says; {q}"
        )
    if not expected:
        _pin_quietly(rel, actual)  # trust on first use
    after = _stat_or_none(final)
    if after is not None and cache._fingerprint(after) == cache._fingerprint(st):
        cache.record_good(rel, st, actual, started)
    return final


def _stat_or_none(path: Path) -> Optional[os.stat_result]:
    try:
        return path.stat()
    except OSError:
        return None


def _pin_quietly(rel: str, sha: str) -> None:
    try:
        cache.set_pin(rel, sha)
    except OSError as e:
        print(f"zoo: warning: cannot record the pin for {rel} ({e.strerror or e}); it will be retried", file=sys.stderr)


def _give_back(private: Path, partial: Path) -> None:
    """Return a privately renamed partial to the shared name, unless a newer one took it."""
    try:
        os.link(private, partial)  # unlike rename, fails instead of overwriting
    except OSError:
        pass
    private.unlink(missing_ok=True)


def _publish(partial: Path, final: Path, url: str, sha256: Optional[str], total: int, mirrored: bool) -> bool:
    """Verify the finished partial and move it to `final`; False if it was not ours to publish."""
    # Rename first: whatever we verify is then exactly what we publish, even without locks.
    private = final.with_name(f"{final.name}{cache.VERIFYING}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.replace(partial, private)
    except FileNotFoundError:
        return False  # another process published it
    if _size(private) != total:  # someone else's newer partial (only possible without locks)
        _give_back(private, partial)
        return False
    rel = cache.relpath_for_url(url)
    pinned = None if sha256 else cache.get_pin(rel)
    expected = sha256 or pinned
    started = cache.now_ns()
    prefix = md5_prefix(final.name)
    try:
        actual, md5 = hash_file(private, md5=prefix is not None)
    except BaseException:  # e.g. Ctrl-C while hashing: keep the bytes for the next run
        _give_back(private, partial)
        raise
    source = "the mirror (check ZOO_MIRROR)" if mirrored else "the server"
    if prefix and not md5.startswith(prefix):
        q = _quarantine(private, final)
        raise IntegrityError(
            f"downloaded {final.name} has md5 {md5}, but its name says it starts with {prefix}; {q}; "
            f"run again, and if it repeats {source} has a damaged or different file"
        )
    if expected and actual != expected:
        q = _quarantine(private, final)
        if pinned:
            raise IntegrityError(
                f"downloaded {final.name} has sha256 {actual}, but the local pin expects {expected}; {q}; "
                f"{source} now serves a different file: if you trust it, forget the pin (zoo cache rm) "
                f"and download again"
            )
        raise IntegrityError(
            f"downloaded {final.name} has sha256 {actual}, expected {expected}; {q}; "
            f"run again, and if it repeats {source} has a damaged or different file"
        )
    os.replace(private, final)
    if not expected:
        _pin_quietly(rel, actual)  # trust on first use
    st = _stat_or_none(final)
    if st is not None:
        cache.record_good(rel, st, actual, started)
    return True


# ---------------------------------------------------------------- public API


def fetch(url: str, *, sha256: Optional[str] = None, quiet: Optional[bool] = None) -> Path:
    """Return the verified cached file for `url`, downloading it first if needed."""
    cache.check_cache_root()
    final = cache.cache_path(url)
    sha256 = _norm_sha(sha256)

    try:
        hit = _check_cached(final, url, sha256)
    except IntegrityError as e:  # the bad copy is out of the way now: fetch a fresh one, unless offline
        if _source(url)[0] == "http" and _env_flag("ZOO_OFFLINE"):
            raise IntegrityError(f"{e}; unset ZOO_OFFLINE to download a fresh copy") from None
        print(f"zoo: {e}; downloading a fresh copy", file=sys.stderr)
        hit = None
    if hit is not None:
        return hit
    kind, location, mirrored = _source(url)
    if kind == "http" and _env_flag("ZOO_OFFLINE"):
        raise DownloadError(
            f"ZOO_OFFLINE=1 and {url} is not cached; unset ZOO_OFFLINE, or set ZOO_MIRROR to a local directory "
            f"holding the files under detectron2/ (the folder that contains COCO-Detection/ ...), or copy the "
            f"file to {final}"
        )
    quiet_ = _is_quiet(quiet)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _disk_error(final.parent, e) from None
    partial = Path(str(final) + cache.PARTIAL)

    def waiting() -> None:
        if not quiet_:
            print(f"zoo: waiting for another process downloading {final.name}", file=sys.stderr)

    def check_again() -> Optional[Path]:
        try:
            return _check_cached(final, url, sha256)
        except IntegrityError as e:  # damaged while we waited for the lock
            raise IntegrityError(f"{e}; run again to download a fresh copy") from None

    with cache.file_lock(Path(str(final) + cache.LOCK), on_wait=waiting):
        for _ in range(3):  # more than one round only if locks do not work and processes race
            hit = check_again()
            if hit is not None:
                return hit
            progress = _Progress(quiet_, final.name)
            try:
                if kind == "file":
                    total = _copy_local(location, partial, progress, url, mirrored)
                else:
                    total = _download_http(location, partial, progress, url, mirrored)
            finally:
                progress.close()
            if _publish(partial, final, url, sha256, total, mirrored):
                return final
        hit = check_again()
        if hit is not None:
            return hit
    raise DownloadError(
        f"{final} kept changing while it was downloaded (several processes without working file locks?); run again"
    )


def verify(url: str, sha256: Optional[str] = None) -> Status:
    """Check a cached file by re-hashing it: 'ok', 'corrupt', 'unpinned' or 'missing'; changes nothing on disk."""
    final = cache.cache_path(url)
    sha256 = _norm_sha(sha256)
    rel = cache.relpath_for_url(url)
    expected = sha256 or cache.get_pin(rel)
    prefix = None if expected else md5_prefix(final.name)
    st = _stat_or_none(final)
    if st is None:
        return "missing"
    started = cache.now_ns()
    try:
        actual, md5 = hash_file(final, md5=prefix is not None)
    except FileNotFoundError:
        return "missing"
    if expected:
        if actual != expected:
            cache.forget_good(rel)
            return "corrupt"
        after = _stat_or_none(final)
        if after is not None and cache._fingerprint(after) == cache._fingerprint(st):
            cache.record_good(rel, st, actual, started)
        return "ok"
    if prefix and not md5.startswith(prefix):
        return "corrupt"
    return "unpinned"


def pin(url: str) -> str:
    """Pin the cached file of `url` to its current sha256 (after checking its md5 prefix); returns the hash."""
    final = cache.cache_path(url)
    if not final.is_file():
        raise ZooError(f"{url} is not cached ({final} is missing); download it first")
    prefix = md5_prefix(final.name)
    st = final.stat()
    started = cache.now_ns()
    actual, md5 = hash_file(final, md5=prefix is not None)
    if prefix and not md5.startswith(prefix):
        q = _quarantine(final, final)
        raise IntegrityError(
            f"cached {final.name} has md5 {md5}, but its name says it starts with {prefix}; not pinned; "
            f"{q}; download it again"
        )
    rel = cache.relpath_for_url(url)
    cache.set_pin(rel, actual)
    cache.record_good(rel, st, actual, started)
    return actual
