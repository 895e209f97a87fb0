"""`zoo predict`, `zoo eval` and `zoo bench`: the commands that run a network."""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import InputError, ZooError
from .hub.cache import write_file_atomic, write_json_atomic

# the keys of zoo.modeling.detector.PRECISIONS, spelled out so that building the parser does not import torch
PRECISION_CHOICES = ("fp32", "tf32", "bf16", "fp16")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BENCH_IMAGE = Path(__file__).resolve().parent / "assets" / "grace_hopper.jpg"


def collect_images(inputs: Sequence[str]) -> list[Path]:
    """Image files named on the command line; folders contribute their images (not recursive), sorted."""
    from PIL import Image, UnidentifiedImageError

    found: list[Path] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise InputError(f"folder {raw!r} holds no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images; "
                                 "pass image files or a folder of images")
            found.extend(files)
        elif p.is_file():
            found.append(p)
        else:
            raise InputError(f"image {raw!r} does not exist; pass image files or folders of images")
    # Reading headers now fails fast on a non-image, before the model loads.
    for p in found:
        try:
            with Image.open(p):
                pass
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise InputError(f"cannot read {str(p)!r} as an image ({type(e).__name__}); "
                             "pass JPEG/PNG/BMP/WebP files") from None
    return found


def load_model(args: argparse.Namespace, *, synthetic: bool = False, precision: Optional[str] = None,
               score_thresh: Optional[float] = None) -> Any:
    """zoo.get for the CLI: a local checkpoint, random weights (synthetic) or the released ones, at the
    command's input size (--min-size, --max-size)."""
    from .api import get

    return get(args.name, pretrained=args.weights is None and not synthetic, weights=args.weights,
               device=args.device, precision=precision, score_thresh=score_thresh, min_size=args.min_size,
               max_size=args.max_size)


def check_sizes_for(args: argparse.Namespace, manifest: Any) -> None:
    """A bad --min-size / --max-size fails before anything is created or downloaded."""
    from .api import checked_test_settings

    checked_test_settings(manifest.architecture, cli=True, min_size=args.min_size, max_size=args.max_size)


def check_precision_for(args: argparse.Namespace) -> None:
    """A precision the device cannot run fails before anything is created or downloaded."""
    from .api import resolve_device
    from .modeling.detector import check_precision

    check_precision(args.precision, resolve_device(args.device))


def check_batch(args: argparse.Namespace) -> None:
    if args.batch < 1:
        raise InputError(f"--batch must be at least 1, got {args.batch}")


def _output_names(paths: Sequence[Path]) -> list[str]:
    # Same stem twice (a.jpg and a.png, or two folders): number the later ones so no picture is overwritten.
    used: set[str] = set()
    out = []
    for p in paths:
        name, n = f"{p.stem}.png", 0
        while name in used:
            n += 1
            name = f"{p.stem}_{n}.png"
        used.add(name)
        out.append(name)
    return out


def _make_dir(path: Path, option: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the folder {path} for {option}: {e.strerror or e}; "
                         f"pass {option} in a writable place") from None


def _describe(det: Any, shown: int = 5) -> str:
    """'3 instances: person 98%, dog 91%, car 60%', the best `shown` of them named."""
    if len(det) == 0:
        return "no instances"
    parts = [f"{c} {s * 100:.0f}%" for c, s in zip(det.class_names[:shown], det.scores[:shown].tolist())]
    more = f", ... ({len(det) - shown} more)" if len(det) > shown else ""
    return f"{len(det)} instance{'s' if len(det) != 1 else ''}: " + ", ".join(parts) + more


def cmd_predict(args: argparse.Namespace) -> int:
    """Draw detections on each image and write one COCO results file for all of them."""
    from tqdm import tqdm

    from .hub.download import _is_quiet
    from .registry import get_manifest
    from .viz import draw

    # the option checks come before anything imports torch (seconds): a typo fails at once
    if not 0.0 <= args.score_thresh <= 1.0:
        raise InputError(f"--score-thresh must be between 0 and 1, got {args.score_thresh}")
    check_batch(args)
    manifest = get_manifest(args.name)
    check_sizes_for(args, manifest)
    paths = collect_images(args.images)
    check_precision_for(args)
    if manifest.task == "instance_segmentation":
        from .evaluation import require_pycocotools

        require_pycocotools()  # RLE masks in results.json; fail before the slow part
    out_dir = Path(args.out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {args.out!r} is a file; pass a folder for the pictures and results.json")
    created = not out_dir.exists()
    _make_dir(out_dir, "--out")  # before the slow part
    # a --score-thresh below the model's own (0.05) must lower that too, or those instances never appear; above
    # it, filtering the default output gives the same instances, so the model keeps Detectron2's setting
    lower = args.score_thresh < manifest.architecture.roi_heads.score_thresh_test
    try:
        model = load_model(args, precision=args.precision, score_thresh=args.score_thresh if lower else None)
    except BaseException:
        if created:  # a failed run leaves no empty folder behind
            with contextlib.suppress(OSError):  # not empty after all: keep it
                out_dir.rmdir()
        raise

    from .modeling.transforms import to_rgb_array

    records: list[dict] = []
    names = _output_names(paths)
    skipped = 0
    # images are read ahead on threads while the network runs; drawing reads each one again. Of several images,
    # one that cannot be read is reported and skipped, so the rest of a large folder still gets done; a single
    # image's error is the run's error.
    stream = zip(paths, names, model.predict_iter(paths, batch_size=args.batch,
                                                  errors="yield" if len(paths) > 1 else "raise"))
    bar = tqdm(stream, total=len(paths), desc="predict", unit="im", disable=_is_quiet(None) or len(paths) < 2)
    try:
        for image_id, (path, out_name, det) in enumerate(bar, start=1):
            try:
                if isinstance(det, InputError):
                    raise det
                rgb = to_rgb_array(path)
            except InputError as e:
                skipped += 1
                bar.write(f"zoo: warning: skipped {path}: {e}", file=sys.stderr)
                continue
            # predict's results are sorted by score, so the kept ones lead: a slice, where filter would copy the masks
            det = det[:int((det.scores >= args.score_thresh).sum())]
            picture = draw(rgb, det, score_thresh=args.score_thresh)
            # whole or not at all; zlib level 1 is 4x faster than PIL's default 6 (21 vs 79 ms at 640x480) for a
            # file 9% larger; no fsync per picture (results.json, written last, has one)
            write_file_atomic(out_dir / out_name, lambda f: picture.save(f, format="PNG", compress_level=1),
                              fsync=False)
            for rec in det.to_coco(image_id):
                # file_name as COCO has it; path and picture tell apart images that share one (a/x.jpg, b/x.jpg)
                rec.update(file_name=path.name, path=str(path), picture=out_name)
                records.append(rec)
            bar.write(f"{path}: {_describe(det)}")
    except BaseException:
        if created:  # still empty (one image, unreadable): leave no folder behind
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    done = len(paths) - skipped
    if not done:
        if created:
            with contextlib.suppress(OSError):  # empty: every image was skipped
                out_dir.rmdir()
        raise InputError(f"none of the {len(paths)} images could be read (each named above); check that they are "
                         "whole image files")
    write_json_atomic(out_dir / "results.json", records, indent=None)
    print(f"wrote {done} picture{'s' if done != 1 else ''} and results.json "
          f"({len(records)} instances) to {out_dir}")
    if skipped:
        raise InputError(f"{skipped} of {len(paths)} images could not be read (each named above) and were skipped; "
                         "fix or remove them and run again for those")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """COCO-evaluate a model on a COCO-format dataset and compare with the published AP."""
    from .evaluation import evaluate, format_report, image_paths, load_annotations, require_pycocotools
    from .registry import get_manifest

    # the checks that need no torch come first (importing it takes seconds): a typo fails at once
    require_pycocotools()
    manifest = get_manifest(args.name)
    check_batch(args)
    check_sizes_for(args, manifest)
    out = Path(args.out).expanduser()
    if out.is_dir():
        raise InputError(f"--out {args.out!r} is a folder; pass a file name for the results JSON")
    coco = load_annotations(args.annotations)  # a bad file, folder or image fails before the model loads
    image_paths(coco, args.images, args.limit)
    check_precision_for(args)
    _make_dir(out.parent, "--out")  # a bad --out fails before the evaluation, not after it
    model = load_model(args, precision=args.precision)
    result = evaluate(model, coco, args.images, limit=args.limit, batch_size=args.batch)
    try:
        write_json_atomic(out, result.results, indent=None)  # a crash never leaves half a file
    except OSError as e:
        raise InputError(f"cannot write {out}: {e.strerror or e}; pass --out in a writable place") from None
    n = len(result.image_ids)
    size = ""
    if (model.min_size_test, model.max_size_test) != (manifest.architecture.input.min_size_test,
                                                      manifest.architecture.input.max_size_test):
        published = manifest.architecture.input
        size = (f" at min_size {model.min_size_test}, max_size {model.max_size_test} (the published AP was measured "
                f"at {published.min_size_test}, {published.max_size_test})")
    print(f"{manifest.name} on {n} image{'s' if n != 1 else ''} of {args.annotations}{size}\n")
    print(format_report(result, manifest))
    print(f"\nresults: {out}")
    return 0


def _peak_memory(device: Any) -> str:
    import resource

    import torch

    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (torch.cuda.max_memory_allocated)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
    return f"{rss_bytes / 2**20:.0f} MiB (process peak RSS, includes loading)"


def cmd_bench(args: argparse.Namespace) -> int:
    """Median seconds per image after warm-up, and peak memory, beside the published V100 time."""
    import statistics
    import time

    from .registry import get_manifest

    # the option checks that need no torch come first (importing it takes seconds)
    manifest = get_manifest(args.name)
    if args.batch < 1 or (args.iters is not None and args.iters < 1) or (args.warmup or 0) < 0:
        raise InputError("--batch and --iters must be at least 1 and --warmup at least 0")
    check_sizes_for(args, manifest)
    image_path = Path(args.image).expanduser() if args.image else BENCH_IMAGE
    if args.image:
        collect_images([args.image])  # reads the header only
    import torch

    from .api import resolve_device
    from .modeling.detector import check_precision
    from .modeling.transforms import resized_size, to_rgb_array

    rgb = to_rgb_array(image_path)

    on_gpu = resolve_device(args.device).type == "cuda"
    # --amp: the model's own reduced precision (autocast on the network; decoding, NMS, pasting stay fp32)
    precision = args.precision or (("fp16" if on_gpu else "bf16") if args.amp else None)
    precision = check_precision(precision, resolve_device(args.device))  # before any download; None -> the default
    static = {"auto": None, "static": True, "dynamic": False}[args.path]
    if args.cuda_graphs and not on_gpu:
        raise InputError("--cuda-graphs needs a CUDA device; drop it or pass --device cuda")
    if args.cuda_graphs and static is False:
        raise InputError("--cuda-graphs replays the fixed-shape path; use it with --path static or auto")
    model = load_model(args, synthetic=args.synthetic)
    model.precision = precision
    model.static_shapes = static
    model.cuda_graphs = args.cuda_graphs
    model.fast_convs = {"auto": None, "fast": True, "exact": False}[args.convs]
    dev = model.device
    iters = args.iters if args.iters is not None else (20 if on_gpu else 3)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    batch = [rgb] * args.batch

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize(dev)

    if on_gpu:
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    try:
        for _ in range(warmup):
            model.predict(batch)
        sync()
        for _ in range(iters):
            t0 = time.perf_counter()
            model.predict(batch)
            sync()
            times.append((time.perf_counter() - t0) / args.batch)
    except RuntimeError as e:
        if precision == "fp32":
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ZooError(f"the network failed in {precision} ({first}); run with --precision fp32") from None

    h, w = rgb.shape[:2]
    rh, rw = resized_size(h, w, model.min_size_test, model.max_size_test)
    where = torch.cuda.get_device_name(dev) if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    weights = "synthetic (random)" if args.synthetic else (args.weights or "released")
    median = statistics.median(times)
    print("\n".join([
        f"model      {manifest.name} (weights: {weights})",
        f"device     {dev} ({where}), torch {torch.__version__}, {precision}",
        f"path       {'fixed-shape' if model.uses_static_shapes(dev) else 'dynamic'}"
        f"{' + CUDA graphs' if args.cuda_graphs else ''}",
        f"convs      {'fast (FrozenBN folded, channels_last)' if model.uses_fast_convs(dev) else 'exact (Detectron2 ops)'}",
        f"input      {image_path.name} {w}x{h} resized to {rw}x{rh}, batch {args.batch}",
        f"time       {median:.4f} s/im median of {iters} (min {min(times):.4f}, max {max(times):.4f}), "
        f"after {warmup} warm-up",
        f"published  {manifest.metrics.inference_time_s_per_im:.3f} s/im ({manifest.provenance.speed_measured_on})",
        f"peak mem   {_peak_memory(dev)}",
    ]))
    return 0


def add_user_commands(sub: Any) -> None:
    """Register predict, eval and bench on the `zoo` subparsers."""
    device_help = "auto (CUDA when present), cpu or cuda[:N]"
    precision_help = ("network precision: fp32 (exact; the default on CPU), tf32 (CUDA, its default: the box head's "
                      "fc layers on TF32 tensor cores, parity kept), bf16 (CPU or CUDA) or fp16 (CUDA); bf16 and "
                      "fp16 run faster on hardware made for them and are not parity-exact")

    def add_size_options(p: Any) -> None:
        p.add_argument("--min-size", type=int, help="resize the shorter image side to this (default: the "
                                                    "manifest's, 800; smaller is faster and less accurate)")
        p.add_argument("--max-size", type=int, help="cap on the longer side (default: the manifest's, 1333)")

    batch_help = ("images per forward pass (default 1); a batch holds images of one padded shape, so results "
                  "match batch 1 up to float rounding")

    p = sub.add_parser("predict", help="detect objects in images; write annotated pictures and COCO results")
    p.add_argument("name", help="model name, e.g. mask_rcnn_R_50_FPN_3x")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--out", default="predictions", help="output folder (default: ./predictions)")
    p.add_argument("--score-thresh", type=float, default=0.5,
                   help="keep instances scoring at least this (default 0.5); below the model's own threshold "
                        "(0.05) it lowers that too")
    p.add_argument("--device", default="auto", help=device_help)
    p.add_argument("--weights", help="a local .pkl/.pth checkpoint instead of the released one")
    p.add_argument("--precision", choices=PRECISION_CHOICES, help=precision_help)
    p.add_argument("--batch", type=int, default=1, help=batch_help)
    add_size_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("eval", help="COCO AP of a model on a COCO-format dataset (needs pycocotools)")
    p.add_argument("name")
    p.add_argument("--annotations", required=True, help="COCO instances JSON")
    p.add_argument("--images", required=True, help="folder holding the images the annotations name")
    p.add_argument("--weights", help="a local .pkl/.pth checkpoint instead of the released one")
    p.add_argument("--limit", type=int, help="evaluate only the first N images (by id)")
    p.add_argument("--out", default="results.json", help="where to save the COCO results (default: ./results.json)")
    p.add_argument("--device", default="auto", help=device_help)
    p.add_argument("--precision", choices=PRECISION_CHOICES, help=precision_help)
    p.add_argument("--batch", type=int, default=1, help=batch_help)
    add_size_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="inference speed and peak memory, beside the published V100 time")
    p.add_argument("name")
    p.add_argument("--device", default="auto", help=device_help)
    p.add_argument("--batch", type=int, default=1, help="images per forward pass")
    p.add_argument("--iters", type=int, help="timed iterations (default: 3 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, help="untimed iterations first (default: 1 on CPU, 5 on CUDA)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--amp", action="store_true", help="reduced precision: fp16 on CUDA, bf16 on CPU")
    prec.add_argument("--precision", choices=PRECISION_CHOICES, help=precision_help)
    p.add_argument("--image", help="image to time on (default: a bundled 512x600 photo)")
    p.add_argument("--path", choices=("auto", "static", "dynamic"), default="auto",
                   help="inference path: fixed-shape (no host sync) or dynamic; auto: fixed-shape on CUDA")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the fixed-shape path from CUDA graphs")
    p.add_argument("--convs", choices=("auto", "exact", "fast"), default="auto",
                   help="convolutions: exact (Detectron2's ops), fast (FrozenBN folded, channels_last) or auto "
                        "(exact for fp32 on CPU, else fast; default)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", help="a local .pkl/.pth checkpoint instead of the released one")
    w.add_argument("--synthetic", action="store_true", help="random weights: no download, timing only")
    add_size_options(p)
    p.set_defaults(func=cmd_bench)
