"""Several real processes (and threads) fetching at once, with and without working locks; a download killed mid-way."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from httpserver import REPO_ROOT, hub_env, make_blob, server  # noqa: F401  (fixtures)

from zoo.hub import cache, fetch

pytestmark = pytest.mark.timeout(60)

CHILD = r"""
import contextlib, hashlib, json, sys, time
from zoo.hub import cache, download
url, start_at, no_lock = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
if no_lock:  # what a filesystem with silently broken locks looks like
    @contextlib.contextmanager
    def file_lock(path, **kwargs):
        yield True
    cache.file_lock = file_lock
while time.time() < start_at:
    time.sleep(0.002)
p = download.fetch(url)
print(json.dumps({"path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}))
"""


def spawn(url: str, start_at: float = 0.0, no_lock: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, url, str(start_at), "1" if no_lock else "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def run_four(url: str, no_lock: bool) -> list[dict]:
    start_at = time.time() + 1.5  # after every interpreter has started
    procs = [spawn(url, start_at, no_lock) for _ in range(4)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=45)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    return results


def leftovers(final: Path) -> list[str]:
    return sorted(p.name for p in final.parent.iterdir() if p.name not in (final.name, final.name + ".lock"))


def test_four_processes_download_once(server, hub_env):
    size = 1_000_000
    data, name = make_blob(size, 11)
    path = "/detectron2/COCO-Detection/x/1/" + name
    url = server.add(path, data, always={"rate": 2_000_000})  # ~0.5 s: the four overlap
    results = run_four(url, no_lock=False)
    want = hashlib.sha256(data).hexdigest()
    assert {r["sha256"] for r in results} == {want}
    assert len({r["path"] for r in results}) == 1
    full = [r for r in server.requests(path) if r.status == 200]
    assert len(full) == 1 and server.bytes_sent(path) == size
    assert leftovers(Path(results[0]["path"])) == []
    assert cache.read_pins() == {path.strip("/"): want}


def test_four_threads_download_once(server, hub_env):
    # a server's request threads may ask for one model at once: the lock must hold between threads of one process
    size = 1_000_000
    data, name = make_blob(size, 14)
    path = "/detectron2/COCO-Detection/x/4/" + name
    url = server.add(path, data, always={"rate": 2_000_000})  # ~0.5 s: the four overlap
    start = threading.Barrier(4)

    def get(_):
        start.wait()
        return fetch(url)

    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(get, range(4)))
    assert len(set(paths)) == 1 and paths[0].read_bytes() == data
    full = [r for r in server.requests(path) if r.status == 200]
    assert len(full) == 1 and server.bytes_sent(path) == size
    assert leftovers(paths[0]) == []


def test_four_processes_without_working_locks_still_agree(server, hub_env):
    size = 1_000_000
    data, name = make_blob(size, 12)
    path = "/detectron2/COCO-Detection/x/2/" + name
    url = server.add(path, data, always={"rate": 2_000_000})
    results = run_four(url, no_lock=True)
    want = hashlib.sha256(data).hexdigest()
    assert {r["sha256"] for r in results} == {want}
    final = Path(results[0]["path"])
    assert final.read_bytes() == data
    assert not any(".verifying-" in n or n.endswith(".corrupt") for n in leftovers(final))
    assert fetch(url).read_bytes() == data


def test_killed_download_resumes_from_partial_bytes(server, hub_env):
    size = 4_000_000
    data, name = make_blob(size, 13)
    path = "/detectron2/COCO-Detection/x/3/" + name
    url = server.add(path, data, faults=[{"rate": 1_000_000}])  # only the first transfer is slow
    partial = Path(str(hub_env.joinpath(*path.strip("/").split("/"))) + ".incomplete")
    child = spawn(url)
    deadline = time.time() + 30
    while (partial.stat().st_size if partial.exists() else 0) < size // 4:
        assert child.poll() is None, child.communicate()[1]
        assert time.time() < deadline, "the child never got going"
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    kept = partial.stat().st_size
    assert size // 4 <= kept < size
    assert partial.read_bytes() == data[:kept]

    assert fetch(url).read_bytes() == data
    reqs = server.requests(path)
    assert len(reqs) == 2
    assert reqs[1].range == f"bytes={kept}-" and reqs[1].status == 206
    assert server.bytes_sent(path) < 2 * size
    assert not partial.exists()
