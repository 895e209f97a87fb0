#!/usr/bin/env python3
"""Rewrite the model table in README.md from the manifests (run after editing manifests/)."""
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.pop("ZOO_MANIFEST_PATH", None)  # the README lists the packaged baselines, never a user's own

from zoo import registry  # noqa: E402
from zoo.cli import _sorted_rows, render_markdown  # noqa: E402

BEGIN, END = "<!-- BEGIN MODEL TABLE -->", "<!-- END MODEL TABLE -->"


def table() -> str:
    """The README table: detectors first, then instance segmentation, each sorted by name."""
    parts = []
    for task, title in (("detection", "COCO object detection"), ("instance_segmentation", "COCO instance segmentation")):
        rows = _sorted_rows(registry.manifests(registry.list_models(task=task)), "name")
        parts.append(f"**{title}**\n\n{render_markdown(rows)}")
    return "\n\n".join(parts)


def main() -> None:
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text()
    new = re.sub(f"{BEGIN}.*?{END}", f"{BEGIN}\n{table()}\n{END}", text, flags=re.S)
    readme.write_text(new)
    print("README.md table updated" if new != text else "README.md table already current")


if __name__ == "__main__":
    main()
