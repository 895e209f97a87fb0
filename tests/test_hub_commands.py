"""The hub's CLI subcommands, driven through argparse with a stand-in resolver."""
from __future__ import annotations

import argparse
import hashlib

import pytest
from httpserver import hub_env, make_blob, server  # noqa: F401  (fixtures)

from zoo.cli import main
from zoo.errors import UnknownModelError, ZooError
from zoo.hub import cache_path, read_pins
from zoo.hub.commands import add_commands

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def cli(server, hub_env):
    """run(*argv) -> exit code, with two models served by the test server."""
    models = {}
    for i, n in enumerate(["alpha", "beta"]):
        data, name = make_blob(8_000, 20 + i)
        url = server.add(f"/detectron2/{n}/{name}", data)
        models[n] = (url, hashlib.sha256(data).hexdigest() if n == "beta" else None, data)

    def resolve(names, all_models):
        if all_models:
            names = list(models)
        out = []
        for n in names:
            if n not in models:
                raise UnknownModelError(f"no model named {n!r}; see `zoo list`")
            out.append((n, models[n][0], models[n][1]))
        return out

    parser = argparse.ArgumentParser(prog="zoo")
    add_commands(parser.add_subparsers(dest="command", required=True), resolve)

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.func(args)

    run.models = models
    return run


def test_download_verify_pin_flow(cli, capsys):
    alpha_url, _, alpha_data = cli.models["alpha"]
    assert cli("verify") == 0
    assert "no cached checkpoints" in capsys.readouterr().out
    assert cli("verify", "alpha") == 0
    assert capsys.readouterr().out.startswith("missing   alpha")

    assert cli("download", "--all", "--quiet") == 0
    out = capsys.readouterr().out
    assert str(cache_path(alpha_url)) in out and "beta" in out
    assert cache_path(alpha_url).read_bytes() == alpha_data

    assert cli("verify") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["ok", "alpha"], ["ok", "beta"]]

    p = cache_path(alpha_url)
    p.write_bytes(b"\0" + alpha_data[1:])
    assert cli("verify") == 1
    assert capsys.readouterr().out.startswith("corrupt   alpha")

    p.write_bytes(alpha_data)
    assert cli("pin", "alpha") == 0
    assert capsys.readouterr().out.split() == [hashlib.sha256(alpha_data).hexdigest(), "alpha"]


def test_unknown_name_and_missing_names(cli, capsys):
    assert cli("download", "gamma") == 1
    assert "no model named 'gamma'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli("pin")  # argparse: NAME is required


def test_download_failure_is_reported_per_model(cli, server, capsys, monkeypatch):
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    assert cli("download", "alpha", "beta") == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 2 and "alpha: ZOO_OFFLINE=1" in err and "beta: ZOO_OFFLINE=1" in err
    assert server.requests() == []


def test_cache_subcommands(cli, hub_env, capsys):
    assert cli("cache", "path") == 0
    assert capsys.readouterr().out.strip() == str(hub_env)
    assert cli("cache", "ls") == 0
    assert "empty" in capsys.readouterr().out
    cli("download", "alpha", "beta")
    capsys.readouterr()
    assert cli("cache", "ls") == 0
    out = capsys.readouterr().out
    assert "2 files" in out
    assert [line.split()[0] for line in out.splitlines()[:2]] == ["pinned", "manifest"]
    assert out.splitlines()[0].endswith("(alpha)") and out.splitlines()[1].endswith("(beta)")
    partial = cache_path(cli.models["alpha"][0]).with_suffix(".pkl.incomplete")
    partial.write_bytes(b"x")
    assert cli("cache", "ls") == 0  # entries that are not the final file show their own name
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("partial")][0]
    assert line.endswith(".pkl.incomplete  (alpha)")
    assert cli("cache", "prune") == 0
    assert str(partial) in capsys.readouterr().out and not partial.exists()
    assert cli("cache", "rm", "alpha") == 0
    assert "removed alpha" in capsys.readouterr().out
    assert not cache_path(cli.models["alpha"][0]).exists()
    assert read_pins() == {}  # beta is checked against its manifest hash, never pinned
    assert cli("cache", "rm", "alpha") == 0
    assert "was not cached" in capsys.readouterr().out


def test_real_cli_wiring(hub_env, capsys):
    from zoo.cli import main

    assert main(["cache", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(hub_env)
    assert main(["verify"]) == 0


@pytest.mark.parametrize("argv", [["verify"], ["cache", "ls"], ["cache", "prune"], ["cache", "rm", "alpha"],
                                  ["download", "alpha", "beta"], ["pin", "alpha"]])
def test_an_unusable_cache_is_one_error(cli, tmp_path, capsys, monkeypatch, argv):
    """ZOO_HOME naming a file, or a file on its path, and a damaged pins.json: one line saying what to fix, exit 1,
    where each model used to report the same pins.json problem (and verify then blamed corrupt files)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    pins = tmp_path / "home" / "pins.json"
    pins.parent.mkdir()
    pins.write_text("garbage")
    for home, problem in ((afile, "it is a file, not a folder; point ZOO_HOME at a folder"),
                          (afile / "sub", f"{afile} (on its path) is a file, not a folder; point ZOO_HOME"),
                          (pins.parent, None)):
        monkeypatch.setenv("ZOO_HOME", str(home))
        with pytest.raises(ZooError) as e:  # the handler itself, with the test's resolver
            cli(*argv)
        assert (problem in str(e.value)) if problem else str(e.value).startswith(f"cannot read {pins} (")
        capsys.readouterr()
        real = [{"alpha": "faster_rcnn_R_50_FPN_3x", "beta": "mask_rcnn_R_50_FPN_3x"}.get(a, a) for a in argv]
        assert main(real) == 1  # the real entry point and names: one line, no traceback
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and err.startswith("zoo: error: ") and out == "", (out, err)
        assert (f"the cache {home} cannot be used: {problem}" in err) if problem else \
            err.rstrip().endswith("fix or delete it (deleting forgets all local pins)"), err
