"""verify, pin, listing, removal and pruning of the local cache."""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from filelock import FileLock
from httpserver import hub_env, make_blob, random_bytes, server  # noqa: F401  (fixtures)

from zoo.errors import IntegrityError, ZooError
from zoo.hub import cache, cache_path, cached_files, fetch, pin, prune, read_pins, remove, verify

pytestmark = pytest.mark.timeout(60)

CANON = "https://dl.fbaipublicfiles.com/detectron2/"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def place(url: str, data: bytes) -> Path:
    """Put a file into the cache by hand, as the offline instructions tell users to."""
    p = cache_path(url)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_verify_statuses_and_pin(hub_env):
    data, name = make_blob(10_000, 1)
    url = CANON + "COCO-Detection/x/1/" + name
    assert verify(url) == "missing"
    p = place(url, data)
    assert verify(url) == "unpinned"
    assert pin(url) == sha(data)
    assert read_pins() == {"detectron2/COCO-Detection/x/1/" + name: sha(data)}
    assert verify(url) == "ok"
    assert verify(url, sha256=sha(b"other")) == "corrupt"
    p.write_bytes(data[:-1] + b"\0")
    assert verify(url) == "corrupt"
    assert p.exists()  # verify only reports


def test_manually_placed_file_is_pinned_on_first_use_offline(hub_env, monkeypatch):
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    data, name = make_blob(10_000, 2)
    url = CANON + "COCO-Detection/x/1/" + name
    place(url, data)
    assert fetch(url).read_bytes() == data
    assert read_pins() == {"detectron2/COCO-Detection/x/1/" + name: sha(data)}


def test_bad_md5_prefix_in_cache(hub_env, monkeypatch):
    url = CANON + "COCO-Detection/x/1/model_final_000000.pkl"
    data = random_bytes(10_000, 3)
    assert not hashlib.md5(data).hexdigest().startswith("000000")
    p = place(url, data)
    assert verify(url) == "corrupt"
    with pytest.raises(IntegrityError, match="000000"):
        pin(url)
    assert not p.exists() and Path(str(p) + ".corrupt").exists()
    assert read_pins() == {}
    place(url, data)
    monkeypatch.setenv("ZOO_OFFLINE", "1")  # online, fetch would set it aside and download a fresh copy
    with pytest.raises(IntegrityError, match="000000.*unset ZOO_OFFLINE"):
        fetch(url)


def test_pin_needs_a_cached_file(hub_env):
    with pytest.raises(ZooError, match="not cached"):
        pin(CANON + "a/model_final_abcdef.pkl")


def test_listing_remove_and_prune(server, hub_env):
    data, name = make_blob(20_000, 4)
    path = "/detectron2/COCO-Detection/x/1/" + name
    url = server.add(path, data)
    final = fetch(url)
    other = place(CANON + "COCO-Detection/y/2/model_final_abcdef.pkl", b"x" * 10)
    partial = Path(str(other) + ".incomplete")
    partial.write_bytes(b"part")
    quarantined = Path(str(final) + ".corrupt")
    quarantined.write_bytes(b"bad")
    verifying = final.with_name(final.name + ".verifying-123-abcd")
    verifying.write_bytes(b"v")

    listing = {(f.rel, f.state): f for f in cached_files()}
    rel = path.strip("/")
    assert set(listing) == {
        (rel, "complete"), (rel, "quarantined"), (rel, "partial"),
        ("detectron2/COCO-Detection/y/2/model_final_abcdef.pkl", "complete"),
        ("detectron2/COCO-Detection/y/2/model_final_abcdef.pkl", "partial"),
    }
    assert listing[(rel, "complete")].pin == sha(data) and listing[(rel, "complete")].size == 20_000
    assert listing[(rel, "complete")].path == final

    removed = prune()
    assert set(removed) >= {partial, quarantined, verifying, Path(str(final) + ".lock")}
    assert final.exists() and other.exists()
    assert sorted(f.state for f in cached_files()) == ["complete", "complete"]
    assert prune() == []

    removed = remove(url)
    assert final in removed and hub_env / "pins.json" in removed
    assert not final.exists() and read_pins() == {}
    assert not final.parent.exists()  # emptied directories go too
    assert remove(url) == []


def test_prune_leaves_an_active_download_alone(hub_env):
    final = cache_path(CANON + "a/b/model_final_abcdef.pkl")
    final.parent.mkdir(parents=True)
    partial = Path(str(final) + ".incomplete")
    partial.write_bytes(b"in progress")
    with FileLock(str(final) + ".lock"):
        assert prune() == []
        with pytest.raises(ZooError, match="being downloaded"):
            remove(CANON + "a/b/model_final_abcdef.pkl")
    assert partial.exists()
    assert partial in prune()


def test_damaged_pins_file_is_reported(hub_env):
    hub_env.mkdir(parents=True)
    (hub_env / "pins.json").write_text("{not json")
    with pytest.raises(ZooError, match="pins.json"):
        read_pins()


def test_pins_file_is_plain_json_of_sha256(server, hub_env):
    data, name = make_blob(5_000, 5)
    url = server.add("/detectron2/p/" + name, data)
    fetch(url)
    assert json.loads((hub_env / "pins.json").read_text()) == {"detectron2/p/" + name: sha(data)}
    assert not list(hub_env.glob(".pins.json.*.tmp"))


def test_verification_record_is_only_a_cache(server, hub_env):
    data, name = make_blob(5_000, 6)
    url = server.add("/detectron2/q/" + name, data)
    fetch(url)
    (hub_env / ".verified.json").write_text("garbage")
    assert fetch(url).read_bytes() == data
    assert verify(url) == "ok"
    assert isinstance(json.loads((hub_env / ".verified.json").read_text()), dict)
    assert cache.relpath_for_url(url) in json.loads((hub_env / ".verified.json").read_text())


def test_atomic_writes_leave_the_old_file_whole_when_writing_fails(tmp_path):
    target = tmp_path / "out" / "picture.png"
    cache.write_file_atomic(target, lambda f: f.write(b"first version"))
    assert target.read_bytes() == b"first version"
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # the usual permissions, not private 0600

    def half_then_fail(f):
        f.write(b"half of the seco")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cache.write_file_atomic(target, half_then_fail, fsync=False)
    assert target.read_bytes() == b"first version"  # untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["picture.png"]  # no temporary file left
    cache.write_json_atomic(target.with_suffix(".json"), {"b": 1, "a": [1, 2]}, indent=None)
    assert target.with_suffix(".json").read_text() == '{"a": [1, 2], "b": 1}\n'
