"""The `zoo` command line."""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import warnings
from typing import Callable, Optional, Sequence

from . import __version__, registry
from .errors import ZooError
from .manifest import Manifest

SORT_FIELDS = (
    "name", "task", "layout", "lr_schedule", "train_time_s_per_iter", "inference_time_s_per_im",
    "train_memory_gb", "box_ap", "mask_ap", "model_id",
)

# (header, summary key, format) for the terminal table, in the seed table's order.
TABLE_COLUMNS: tuple[tuple[str, str, Callable[[object], str]], ...] = (
    ("name", "name", str),
    ("lr sched", "lr_schedule", str),
    ("train s/iter", "train_time_s_per_iter", lambda v: f"{v:.3f}"),
    ("infer s/im", "inference_time_s_per_im", lambda v: f"{v:.3f}"),
    ("train mem GB", "train_memory_gb", lambda v: f"{v:.1f}"),
    ("box AP", "box_ap", lambda v: f"{v:.1f}"),
    ("mask AP", "mask_ap", lambda v: "-" if v is None else f"{v:.1f}"),
    ("model id", "model_id", str),
)


def render_table(rows: list[dict]) -> str:
    """Fixed-width table of manifest summaries, readable in a terminal."""
    cells = [[h for h, _, _ in TABLE_COLUMNS]] + [[fmt(r[k]) for _, k, fmt in TABLE_COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(TABLE_COLUMNS))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def render_markdown(rows: list[dict]) -> str:
    """Markdown table of manifest summaries (the README's model table)."""
    out = ["| " + " | ".join(h for h, _, _ in TABLE_COLUMNS) + " | download |", "|" + "---|" * (len(TABLE_COLUMNS) + 1)]
    for r in rows:
        cells = [f"`{r['name']}`"] + [fmt(r[k]) for _, k, fmt in TABLE_COLUMNS[1:]]
        cells.append(f"[model]({r['checkpoint_url']}) · [metrics]({r['metrics_url']})")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _sorted_rows(manifests: list[Manifest], field: str, reverse: bool = False) -> list[dict]:
    rows = [m.summary() for m in manifests]
    present = sorted((r for r in rows if r[field] is not None), key=lambda r: r["name"])
    present.sort(key=lambda r: r[field], reverse=reverse)  # stable: ties stay in name order
    return present + [r for r in rows if r[field] is None]  # None (mask AP of detectors) last either way


def cmd_list(args: argparse.Namespace) -> int:
    names = registry.list_models(task=args.task, pattern=args.pattern)
    rows = _sorted_rows(registry.manifests(names), args.sort, args.reverse)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif args.format == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["name"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        print(buf.getvalue(), end="")
    elif args.format == "markdown":
        print(render_markdown(rows))
    else:
        print(render_table(rows) if rows else "no models match")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    m = registry.get_manifest(args.name)
    if args.format == "json":
        print(m.model_dump_json(indent=2))
        return 0
    a, s = m.architecture, m.summary()
    backbone = f"{'ResNeXt' if a.resnet.num_groups > 1 else 'ResNet'}-{a.resnet.depth}"
    if a.resnet.num_groups > 1:
        backbone += f" {a.resnet.num_groups}x{a.resnet.width_per_group}d"
    lines = [
        f"{m.name}  ({m.task}, {m.dataset})",
        f"  config           {m.config}",
        f"  architecture     {a.meta_architecture}, {backbone}-{a.layout}, {a.roi_heads.name}",
        "  test settings    " + ", ".join(f"{k}={v}" for k, v in a.test_settings().items()),
        f"  lr schedule      {m.lr_schedule.name} ({m.lr_schedule.max_iter} iterations)",
        f"  train time       {s['train_time_s_per_iter']:.3f} s/iter",
        f"  inference time   {s['inference_time_s_per_im']:.3f} s/im",
        f"  train memory     {s['train_memory_gb']:.1f} GB",
        f"  box AP           {s['box_ap']:.1f}",
    ]
    if s["mask_ap"] is not None:
        lines.append(f"  mask AP          {s['mask_ap']:.1f}")
    lines += [
        f"  model id         {m.model_id}",
        f"  checkpoint       {m.checkpoint.url}",
        f"  metrics          {m.checkpoint.metrics_url}",
        f"  sha256           {m.checkpoint.sha256 or 'unknown (pinned on first download)'}",
        f"  figures          trained on {m.provenance.trained_on}; evaluated on {m.provenance.evaluated_on};",
        f"                   speed on {m.provenance.speed_measured_on}",
    ]
    print("\n".join(lines))
    return 0


def resolve(names: Sequence[str], all_models: bool) -> list[tuple[str, str, Optional[str]]]:
    """(name, checkpoint url, sha256) for the named models, or every model."""
    if all_models and names:
        raise ZooError("pass model names or --all, not both")
    if all_models:
        names = registry.list_models()
    elif not names:
        raise ZooError("name at least one model, or pass --all")
    out = []
    for n in names:
        m = registry.get_manifest(n)
        out.append((m.name, m.checkpoint.url, m.checkpoint.sha256))
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every `zoo` subcommand."""
    p = argparse.ArgumentParser(prog="zoo", description="Detectron2 COCO baselines: manifests, weights, models.")
    p.add_argument("--version", action="version", version=f"zoo (detzoo) {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = sub.add_parser("list", help="list the baselines")
    ls.add_argument("--task", choices=["detection", "instance_segmentation"])
    ls.add_argument("--pattern", help="glob on the name, any case, e.g. '*fpn*'")
    ls.add_argument("--sort", choices=SORT_FIELDS, default="name")
    ls.add_argument("--reverse", action="store_true", help="largest first (e.g. --sort box_ap --reverse)")
    ls.add_argument("--format", choices=["table", "json", "csv", "markdown"], default="table")
    ls.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="show one baseline's manifest")
    show.add_argument("name")
    show.add_argument("--format", choices=["text", "json"], default="text")
    show.set_defaults(func=cmd_show)

    from .hub.commands import add_commands

    add_commands(sub, resolve)

    from .commands_user import add_user_commands

    add_user_commands(sub)
    return p


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _warning_line(show):
    """warnings.showwarning that prints zoo's own warnings as one `zoo: warning:` line (they are advice, like the
    errors) and leaves other libraries' in their usual form."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(filename).startswith(_PACKAGE_DIR):
            print(f"zoo: warning: {message}", file=sys.stderr if file is None else file)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `zoo` console script."""
    args = build_parser().parse_args(argv)
    show = warnings.showwarning
    warnings.showwarning = _warning_line(show)
    try:
        return int(args.func(args) or 0)
    except ZooError as e:
        print(f"zoo: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("zoo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `zoo list | head`
        return 0
    finally:
        warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())
