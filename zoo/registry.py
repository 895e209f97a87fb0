"""Finds manifests (packaged, $ZOO_MANIFEST_PATH, `register`) and looks baselines up by name."""
from __future__ import annotations

import difflib
import fnmatch
import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable, Optional, Union

from pydantic import ValidationError

from .errors import ManifestError, UnknownModelError
from .manifest import Manifest

_registered: dict[str, Manifest] = {}


def _builtin_dir() -> Path:
    packaged = resources.files("zoo") / "_manifests"
    if packaged.is_dir():  # installed wheel
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "manifests"  # source checkout


def _format_validation(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(record)"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: field '{loc}': {first['msg']}{more}"


def parse_manifest(data: Union[dict, Manifest], source: str = "<manifest>") -> Manifest:
    """Validate one manifest record; errors name the source and the field."""
    if isinstance(data, Manifest):
        return data
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        raise ManifestError(_format_validation(source, e)) from None


def load_manifest_file(path: Path) -> Manifest:
    """Read and validate one JSON manifest file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: cannot read manifest: {e}") from None
    m = parse_manifest(data, str(path))
    if path.stem != m.name:
        raise ManifestError(f"{path}: field 'name': {m.name!r} must match the file name {path.stem!r}")
    return m


def _load_dir(directory: Path, into: dict[str, tuple[Manifest, str]]) -> None:
    if not directory.is_dir():
        raise ManifestError(f"manifest directory {directory} does not exist; fix ZOO_MANIFEST_PATH")
    for path in sorted(directory.glob("*.json")):
        m = load_manifest_file(path)
        if m.name in into:
            raise ManifestError(
                f"{path}: field 'name': duplicate name {m.name!r}, already defined in {into[m.name][1]}; rename one"
            )
        into[m.name] = (m, str(path))


@lru_cache(maxsize=4)
def _load_files(extra_path: str) -> dict[str, tuple[Manifest, str]]:
    found: dict[str, tuple[Manifest, str]] = {}
    _load_dir(_builtin_dir(), found)
    seen = set()
    for part in filter(None, extra_path.split(os.pathsep)):
        directory = Path(part).expanduser()
        key = os.path.realpath(directory)
        if key not in seen:  # a folder listed twice is one folder, not a clash of its manifests with themselves
            seen.add(key)
            _load_dir(directory, found)
    return found


def _all() -> dict[str, Manifest]:
    merged = {n: m for n, (m, _) in _load_files(os.environ.get("ZOO_MANIFEST_PATH", "")).items()}
    merged.update(_registered)
    return merged


def register(manifest: Union[dict, Manifest], *, overwrite: bool = False) -> Manifest:
    """Add a user manifest at run time (validated like the packaged ones)."""
    m = parse_manifest(manifest, "<register>")
    if not overwrite and m.name in _all():
        raise ManifestError(f"<register>: field 'name': {m.name!r} is already registered; pass overwrite=True")
    _registered[m.name] = m
    return m


def unregister(name: str) -> None:
    """Remove a manifest added with `register`."""
    _registered.pop(name, None)


def _key(name: str) -> str:
    # Accept "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml" as well as the bare name.
    base = name.strip().rsplit("/", 1)[-1]
    return base[:-5] if base.endswith(".yaml") else base


def get_manifest(name: str) -> Manifest:
    """The manifest of a baseline, by name or Detectron2 config path."""
    if not isinstance(name, str):
        raise UnknownModelError(f"a model name is a string such as 'mask_rcnn_R_50_FPN_3x', got {name!r}; "
                                "run `zoo list` to see all names")
    table = _all()
    m = table.get(_key(name))
    if m is not None and ("/" not in name or m.config == name or m.config == name + ".yaml"):
        return m
    # suggestions ignore case: names mix it (R_50, FPN), so MASK_RCNN_R_50_FPN_3X is a near miss, not a stranger
    lowered = {k.lower(): k for k in table}
    close = [lowered[k] for k in difflib.get_close_matches(_key(name).lower(), list(lowered), n=3, cutoff=0.6)]
    hint = f"; did you mean {', '.join(close)}?" if close else "; run `zoo list` to see all names"
    raise UnknownModelError(f"unknown model {name!r}{hint}")


def list_models(task: Optional[str] = None, pattern: Optional[str] = None) -> list[str]:
    """Names of registered baselines, optionally filtered by task and a glob pattern (case-insensitive)."""
    if task is not None and task not in ("detection", "instance_segmentation"):
        raise ManifestError(f"unknown task {task!r}; use 'detection' or 'instance_segmentation'")
    out = []
    for name, m in sorted(_all().items()):
        if task is not None and m.task != task:
            continue
        if pattern is not None and not fnmatch.fnmatchcase(name.lower(), pattern.lower()):
            continue
        out.append(name)
    return out


def manifests(names: Optional[Iterable[str]] = None) -> list[Manifest]:
    """Manifests for the given names (all when None), in name order."""
    return [get_manifest(n) for n in (list_models() if names is None else names)]
