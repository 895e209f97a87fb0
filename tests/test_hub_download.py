"""zoo.hub.fetch against a real local HTTP server: resume, retry, integrity, offline, mirrors."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import pytest
from httpserver import hub_env, make_blob, random_bytes, server  # noqa: F401  (fixtures)

from zoo.errors import DownloadError, IntegrityError, ZooError
from zoo.hub import cache, download, fetch

pytestmark = pytest.mark.timeout(60)

CANON = "https://dl.fbaipublicfiles.com/detectron2/"
SIZE = 300_000


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def serve(server, size=SIZE, seed=0, faults=(), always=None, name=None, prefix="/detectron2/COCO-Detection/x/1/"):
    data, default_name = make_blob(size, seed)
    path = prefix + (name or default_name)
    url = server.add(path, data, faults=faults, always=always)
    return data, path, url


def cached(root: Path, path: str) -> Path:
    return root.joinpath(*path.strip("/").split("/"))


def test_layout_mirrors_url_path_and_second_fetch_is_local(server, hub_env):
    data, path, url = serve(server)
    got = fetch(url)
    assert got == cached(hub_env, path)
    assert got.read_bytes() == data
    assert fetch(url) == got
    assert len(server.requests(path)) == 1
    assert json.loads((hub_env / "pins.json").read_text()) == {path.strip("/"): sha(data)}
    assert [p.name for p in got.parent.iterdir() if p.name != got.name] == [got.name + ".lock"]


def test_http_mirror_fills_the_canonical_cache_slot(server, hub_env, monkeypatch):
    data, path, _ = serve(server, prefix="/m/d2/COCO-Detection/x/1/")
    name = path.rsplit("/", 1)[1]
    monkeypatch.setenv("ZOO_MIRROR", server.base + "/m/d2/")
    got = fetch(CANON + "COCO-Detection/x/1/" + name)
    assert got == hub_env / "detectron2" / "COCO-Detection" / "x" / "1" / name
    assert got.read_bytes() == data
    assert [r.path for r in server.requests()] == [path]


def test_http_mirror_missing_file_names_the_mirror(server, hub_env, monkeypatch):
    monkeypatch.setenv("ZOO_MIRROR", server.base + "/m")
    url = CANON + "COCO-Detection/x/1/model_final_abcdef.pkl"
    with pytest.raises(DownloadError, match="HTTP 404") as ei:
        fetch(url)
    assert "ZOO_MIRROR" in str(ei.value) and url in str(ei.value)
    assert [r.path for r in server.requests()] == ["/m/COCO-Detection/x/1/model_final_abcdef.pkl"]


def test_file_url_without_mirror(tmp_path, hub_env):
    data, name = make_blob(5_000, 10)
    src = tmp_path / "src" / name
    src.parent.mkdir()
    src.write_bytes(data)
    got = fetch(src.as_uri())
    assert got == hub_env.joinpath(*src.parts[1:]) and got.read_bytes() == data


def test_dropped_connection_resumes_with_range(server, hub_env):
    data, path, url = serve(server, faults=[{"drop_after": SIZE // 3}, {"drop_after": SIZE // 3}])
    assert fetch(url).read_bytes() == data
    reqs = server.requests(path)
    assert [r.status for r in reqs] == [200, 206, 206]
    assert reqs[0].range is None
    assert reqs[1].range == f"bytes={SIZE // 3}-"
    assert reqs[2].range == f"bytes={2 * (SIZE // 3)}-"
    assert server.bytes_sent(path) == SIZE < 2 * SIZE
    assert not Path(str(cached(hub_env, path)) + ".incomplete").exists()


def test_stalled_body_times_out_and_resumes(server, hub_env, monkeypatch):
    monkeypatch.setenv("ZOO_TIMEOUT", "0.3")
    data, path, url = serve(server, faults=[{"stall_after": SIZE // 2, "stall": 1.5}])
    assert fetch(url).read_bytes() == data
    reqs = server.requests(path)
    assert len(reqs) == 2 and reqs[1].range is not None and reqs[1].status == 206


def test_chunked_response_without_length_resumes(server, hub_env):
    data, path, url = serve(server, always={"chunked": True}, faults=[{"drop_after": SIZE // 2}])
    assert fetch(url).read_bytes() == data
    reqs = server.requests(path)
    assert [r.status for r in reqs] == [200, 206]
    assert reqs[1].range is not None and server.bytes_sent(path) < 2 * SIZE


def test_server_ignoring_range_restarts_cleanly(server, hub_env):
    data, path, url = serve(server, faults=[{"drop_after": SIZE // 2}, {"ignore_range": True}])
    assert fetch(url).read_bytes() == data
    reqs = server.requests(path)
    assert reqs[1].range == f"bytes={SIZE // 2}-" and reqs[1].status == 200


def test_complete_partial_answered_416_is_published(server, hub_env):
    data, path, url = serve(server)
    final = cached(hub_env, path)
    final.parent.mkdir(parents=True)
    Path(str(final) + ".incomplete").write_bytes(data)
    assert fetch(url).read_bytes() == data
    assert [(r.status, r.sent) for r in server.requests(path)] == [(416, 0)]


def test_stale_oversized_partial_is_discarded(server, hub_env):
    data, path, url = serve(server)
    final = cached(hub_env, path)
    final.parent.mkdir(parents=True)
    Path(str(final) + ".incomplete").write_bytes(random_bytes(SIZE + 10, 9))
    assert fetch(url).read_bytes() == data
    assert [r.status for r in server.requests(path)] == [416, 200]


def test_default_retries_are_fewer_for_a_server_never_reached(server, hub_env, monkeypatch):
    # offline, the default five retries only made the user wait ~31 s for the same error; a server that answers
    # 5xx keeps all five (hub_env leaves ZOO_RETRIES unset)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/detectron2/COCO-Detection/x/1/model_final.pkl"
    with pytest.raises(DownloadError, match=r" after 3 attempts \(127\.0\.0\.1:\d+ refused the connection\)"):
        fetch(dead)
    _, path, url = serve(server, always={"status": 502})
    with pytest.raises(DownloadError, match=r" after 6 attempts \(HTTP 502"):
        fetch(url)
    assert len(server.requests(path)) == 6
    monkeypatch.setenv("ZOO_RETRIES", "4")  # an explicit count applies to every failure
    with pytest.raises(DownloadError, match=r" after 5 attempts \(127\.0\.0\.1:\d+ refused the connection\)"):
        fetch(dead)


def test_500_then_200_is_retried(server, hub_env):
    data, path, url = serve(server, faults=[{"status": 500}, {"status": 503}])
    assert fetch(url).read_bytes() == data
    assert [r.status for r in server.requests(path)] == [500, 503, 200]


def test_persistent_5xx_gives_up_with_clear_error(server, hub_env, monkeypatch):
    monkeypatch.setenv("ZOO_RETRIES", "2")
    _, path, url = serve(server, always={"status": 502})
    with pytest.raises(DownloadError, match=r"giving up on .* after 3 attempts \(HTTP 502[^)]*\); check the network and "
                                            r"run again$"):  # nothing came, so no partial file is promised
        fetch(url)
    assert len(server.requests(path)) == 3


def test_giving_up_after_some_bytes_keeps_them_for_the_next_run(server, hub_env, monkeypatch):
    monkeypatch.setenv("ZOO_RETRIES", "2")
    monkeypatch.setenv("ZOO_RETRY_BASE_DELAY", "0.01")
    data, path, url = serve(server, faults=[{"drop_after": SIZE // 3}, {"status": 502}, {"status": 502}])
    with pytest.raises(DownloadError, match=r"after 3 attempts .*run again, the partial download is kept and resumes$"):
        fetch(url)
    partial = Path(str(cached(hub_env, path)) + ".incomplete")
    assert partial.read_bytes() == data[:SIZE // 3]
    assert fetch(url).read_bytes() == data and server.requests(path)[-1].range == f"bytes={SIZE // 3}-"


@pytest.mark.parametrize("status", [404, 403])
def test_client_errors_are_not_retried(server, hub_env, status):
    _, path, url = serve(server, always={"status": status})
    with pytest.raises(DownloadError) as ei:
        fetch(url)
    msg = str(ei.value)
    assert f"HTTP {status}" in msg and url in msg and "\n" not in msg
    assert len(server.requests(path)) == 1
    assert not cached(hub_env, path).exists()


def test_unknown_path_is_404(server, hub_env):
    url = server.base + "/detectron2/nope/model_final_abcdef.pkl"
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(url)
    assert len(server.requests()) == 1


def test_wrong_sha256_is_rejected_and_quarantined(server, hub_env):
    data, path, url = serve(server)
    wrong = sha(b"something else")
    with pytest.raises(IntegrityError) as ei:
        fetch(url, sha256=wrong)
    msg = str(ei.value)
    assert wrong in msg and sha(data) in msg and "\n" not in msg
    final = cached(hub_env, path)
    assert not final.exists()
    assert not Path(str(final) + ".incomplete").exists()
    assert Path(str(final) + ".corrupt").read_bytes() == data
    assert "pins.json" not in os.listdir(hub_env)
    # The right hash then works, and the manifest hash is not written as a pin.
    assert fetch(url, sha256=sha(data).upper()).read_bytes() == data
    assert not (hub_env / "pins.json").exists()


def test_wrong_md5_prefix_is_rejected(server, hub_env):
    data = random_bytes(SIZE, 3)
    assert not hashlib.md5(data).hexdigest().startswith("000000")
    path = "/detectron2/COCO-Detection/x/1/model_final_000000.pkl"
    url = server.add(path, data)
    with pytest.raises(IntegrityError, match="000000"):
        fetch(url)
    assert not cached(hub_env, path).exists()
    assert not (hub_env / "pins.json").exists()


def test_name_without_md5_suffix_skips_that_check(server, hub_env):
    data = random_bytes(1000, 4)
    url = server.add("/detectron2/ImageNetPretrained/MSRA/R-50.pkl", data)
    assert fetch(url).read_bytes() == data


def test_md5_prefix_parsing():
    assert download.md5_prefix("model_final_f10217.pkl") == "f10217"
    assert download.md5_prefix("model_final_280758.pkl") == "280758"
    assert download.md5_prefix("R-50.pkl") is None
    assert download.md5_prefix("model_final.pkl") is None
    assert download.md5_prefix("X-101-32x8d.pkl") is None


def test_tofu_pin_then_corruption_is_detected_and_replaced(server, hub_env, capfd, monkeypatch):
    data, path, url = serve(server)
    got = fetch(url)
    assert cache.read_pins() == {path.strip("/"): sha(data)}
    with open(got, "r+b") as f:  # same size, one byte flipped
        f.seek(SIZE // 2)
        f.write(bytes([data[SIZE // 2] ^ 0xFF]))
    damaged = got.read_bytes()
    capfd.readouterr()
    # The damaged copy is set aside (kept, as evidence) and a fresh one downloaded, checked against the pin.
    assert fetch(url).read_bytes() == data
    assert Path(str(got) + ".corrupt").read_bytes() == damaged
    assert len(server.requests(path)) == 2
    err = capfd.readouterr().err
    assert "pinned locally" in err and sha(data) in err and "downloading a fresh copy" in err
    # Offline, the same damage is an error that says how to recover, and nothing is fetched.
    with open(got, "r+b") as f:
        f.write(b"\0" * 16)
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    with pytest.raises(IntegrityError, match="unset ZOO_OFFLINE") as ei:
        fetch(url)
    assert "\n" not in str(ei.value) and not got.exists()
    assert len(server.requests(path)) == 2


def test_changed_upstream_file_violates_pin(server, hub_env):
    data = random_bytes(SIZE, 6)
    path = "/detectron2/ImageNetPretrained/MSRA/R-50.pkl"  # no md5 suffix: only the pin can tell
    url = server.add(path, data)
    got = fetch(url)
    got.unlink()
    server.entries[path].data = random_bytes(SIZE, 7)
    with pytest.raises(IntegrityError, match="local pin") as ei:
        fetch(url)
    assert sha(data) in str(ei.value) and "zoo cache rm" in str(ei.value)
    assert not got.exists()


def test_unchanged_cached_file_is_not_rehashed(server, hub_env, monkeypatch):
    monkeypatch.setattr(cache, "RACY_NS", 0)
    data, path, url = serve(server)
    got = fetch(url)
    time.sleep(0.05)
    fetch(url)  # the file is now older than the hash: the record becomes trusted
    calls = []
    real = download.hash_file
    monkeypatch.setattr(download, "hash_file", lambda *a, **k: calls.append(a) or real(*a, **k))
    fetch(url)
    assert calls == []
    time.sleep(0.05)
    with open(got, "r+b") as f:
        f.write(b"\0" * 16)  # same size, new content
    assert fetch(url).read_bytes() == data  # noticed: set aside and fetched again
    assert calls and calls[0][0] == got and len(server.requests(path)) == 2


def test_freshly_written_file_is_always_rehashed(server, hub_env, monkeypatch):
    data, path, url = serve(server)
    got = fetch(url)
    fetch(url)
    with open(got, "r+b") as f:  # within the racy window: the record must not be trusted
        f.write(b"\0" * 16)
    assert fetch(url).read_bytes() == data
    assert Path(str(got) + ".corrupt").exists() and len(server.requests(path)) == 2


def test_offline_uses_cache_and_never_the_network(server, hub_env, monkeypatch):
    data, path, url = serve(server)
    fetch(url)
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    assert fetch(url).read_bytes() == data
    _, path2, url2 = serve(server, seed=2)
    with pytest.raises(DownloadError) as ei:
        fetch(url2)
    msg = str(ei.value)
    assert "ZOO_OFFLINE" in msg and "ZOO_MIRROR" in msg and str(cached(hub_env, path2)) in msg
    assert len(server.requests()) == 1
    monkeypatch.setenv("ZOO_MIRROR", server.base + "/detectron2")  # a network mirror is still network
    with pytest.raises(DownloadError, match="ZOO_OFFLINE"):
        fetch(CANON + path2.split("/detectron2/", 1)[1])
    assert len(server.requests()) == 1


def _local_mirror(tmp_path, size=50_000, seed=5):
    data, name = make_blob(size, seed)
    d = tmp_path / "mirror" / "COCO-Detection" / "x" / "1"
    d.mkdir(parents=True)
    (d / name).write_bytes(data)
    return tmp_path / "mirror", data, CANON + "COCO-Detection/x/1/" + name


@pytest.mark.parametrize("form", ["file_url", "plain_dir"])
def test_local_mirror(tmp_path, hub_env, monkeypatch, form):
    mirror, data, url = _local_mirror(tmp_path)
    monkeypatch.setenv("ZOO_MIRROR", mirror.as_uri() if form == "file_url" else str(mirror) + "/")
    monkeypatch.setenv("ZOO_OFFLINE", "1")  # a local mirror is allowed offline
    got = fetch(url)
    assert got == hub_env.joinpath("detectron2", *url[len(CANON):].split("/"))
    assert got.read_bytes() == data
    assert cache.read_pins() == {got.relative_to(hub_env).as_posix(): sha(data)}


def test_local_mirror_missing_file(tmp_path, hub_env, monkeypatch):
    mirror, _, url = _local_mirror(tmp_path)
    monkeypatch.setenv("ZOO_MIRROR", str(mirror))
    with pytest.raises(DownloadError, match="ZOO_MIRROR"):
        fetch(url.replace("/x/", "/y/"))


def test_unsupported_mirror_scheme(hub_env, monkeypatch):
    monkeypatch.setenv("ZOO_MIRROR", "ftp://example.org/d2")
    with pytest.raises(DownloadError, match="ZOO_MIRROR"):
        fetch(CANON + "a/model_final_abcdef.pkl")


@pytest.mark.parametrize("bad", ["/detectron2/../../etc/passwd", "/detectron2/%2e%2e/%2E%2E/x.pkl", "/a/%2fetc.pkl",
                                 "/pins.json", "/a/b.pkl.incomplete", "/"])
def test_urls_that_would_escape_or_collide_are_refused(hub_env, bad):
    with pytest.raises(ZooError):
        fetch("http://127.0.0.1:9" + bad)


def test_bad_sha256_argument(hub_env):
    with pytest.raises(ZooError, match="64 hex"):
        fetch("http://127.0.0.1:9/a/b.pkl", sha256="abc")


def test_progress_bar_only_when_asked(server, hub_env, capsys, monkeypatch):
    monkeypatch.delenv("ZOO_QUIET")
    _, _, url = serve(server)
    fetch(url)  # stderr is not a TTY under pytest
    assert capsys.readouterr().err == ""
    _, _, url2 = serve(server, seed=8)
    fetch(url2, quiet=False)
    assert "model_final_" in capsys.readouterr().err


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("ZOO_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "zoo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_root() == tmp_path / "home" / ".cache" / "zoo"
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "zh"))
    assert cache.cache_root() == tmp_path / "zh"
    assert cache.cache_path(CANON + "COCO-Detection/faster_rcnn_R_50_FPN_3x/137849458/model_final_280758.pkl") == (
        tmp_path / "zh/detectron2/COCO-Detection/faster_rcnn_R_50_FPN_3x/137849458/model_final_280758.pkl"
    )


def test_a_cache_root_that_is_a_file_is_one_clear_error(server, tmp_path, monkeypatch):
    data, name = make_blob(1000, 3)
    url = server.add(f"/detectron2/m/{name}", data)
    (tmp_path / "home").write_text("not a folder")
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "home"))
    with pytest.raises(ZooError, match=r"the cache .*home cannot be used: it is a file, not a folder; point ZOO_HOME"):
        fetch(url, quiet=True)
    assert server.requests() == []  # nothing was downloaded only to fail at the write


@pytest.mark.parametrize("host", ["refused", "unresolvable"])
def test_unreachable_server_is_one_short_line_with_the_offline_ways(hub_env, monkeypatch, host):
    # requests' own text for these runs to hundreds of characters; the reason is one phrase, and the message
    # says how to go on without the network
    monkeypatch.setenv("ZOO_RETRIES", "1")
    monkeypatch.setenv("ZOO_RETRY_BASE_DELAY", "0.01")
    if host == "refused":
        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            netloc = f"127.0.0.1:{s.getsockname()[1]}"
        reason = f"{netloc} refused the connection"
    else:
        netloc = "zoo-test.invalid"  # RFC 6761: never resolves
        reason = f"cannot resolve the host name {netloc}"
    url = f"http://{netloc}/detectron2/COCO-Detection/x/1/model_final.pkl"
    with pytest.raises(DownloadError) as ei:
        fetch(url)
    msg = str(ei.value)
    assert msg == (f"giving up on {url} after 2 attempts ({reason}); check the network and run again; without "
                   "network access, set ZOO_MIRROR to a local copy of the files (README, Environment variables) or "
                   "pass weights=PATH (--weights PATH on the command line)"), msg
