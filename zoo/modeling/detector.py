"""GeneralizedRCNN: preprocessing, backbone, RPN, ROI heads and postprocessing, plus `predict`."""
from __future__ import annotations

import contextlib
import platform
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..manifest import Architecture
from . import overflow
from .backbone import build_backbone
from .box_coder import clip_boxes, nonempty
from .layers import Conv2d, cudnn_fusion, tf32_fc
from .mask_paste import paste_masks_in_image, postprocess_boxes
from .roi_heads import InstanceBatch, RawInstances, build_roi_heads
from .rpn import RPN, ProposalBatch, Proposals
from .transforms import chw_view, normalize_and_pad, padded_size, resize_uint8, resized_size, to_rgb_array


# precision name -> autocast dtype (None: fp32 tensors). "fp32" is the path parity is measured on; "tf32" the same
# with the box head's fully connected layers on TF32 tensor cores (CUDA only; convolutions follow PyTorch's cuDNN
# flag either way, TF32 by default). A model's precision None means tf32 on CUDA and fp32 elsewhere.
PRECISIONS = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_LAYOUT_LOCK = threading.Lock()  # GeneralizedRCNN._lay_out_convs: one conversion at a time


def _check_precision_name(precision: Any) -> None:
    if precision is not None and (not isinstance(precision, str) or precision not in PRECISIONS):
        raise InputError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)} (or None: tf32 on "
                         f"CUDA, fp32 on CPU)")


def resolve_precision(precision: Optional[str], device: torch.device) -> str:
    """The precision that runs on `device`: `precision` itself, or for None tf32 on CUDA and fp32 elsewhere."""
    if precision is None:
        return "tf32" if torch.device(device).type == "cuda" else "fp32"
    return precision


def cpu_lacks_bf16_units() -> bool:
    """True on an x86 CPU that torch reports without AVX512-BF16 and AMX: oneDNN then emulates bf16, slower than
    fp32. False where that is unknown (other architectures, a torch without these probes)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return all(p is not None for p in probes) and not any(p() for p in probes)
    except Exception:  # private probes: never let them break inference
        return False


_slow_bf16_warned = False


def check_precision(precision: Optional[str], device: torch.device) -> str:
    """Validate a precision name (None: the device's default) for a device; returns the one that runs there, or
    raises InputError saying what works. Warns once when bf16 on this CPU would be slower than fp32."""
    global _slow_bf16_warned
    _check_precision_name(precision)
    precision = resolve_precision(precision, device)
    if precision in ("fp16", "tf32") and torch.device(device).type != "cuda":
        raise InputError(f"precision {precision!r} needs a CUDA device; on CPU use precision='bf16' (or 'fp32')")
    if precision == "bf16" and torch.device(device).type == "cpu" and not _slow_bf16_warned \
            and cpu_lacks_bf16_units():
        _slow_bf16_warned = True
        warnings.warn("this CPU has no bf16 units (AVX512-BF16 or AMX), so bf16 runs about 6x slower than fp32 on "
                      "it; choose fp32 here", RuntimeWarning, stacklevel=2)
    return precision


def _after_load(model: GeneralizedRCNN, incompatible_keys: Any) -> None:
    """load_state_dict post-hook: a load with assign=True replaces tensors, which their versions do not show."""
    model._forget_weight_layout()


def check_graph_options(static_shapes: Optional[bool], cuda_graphs: bool, device: torch.device) -> None:
    """Raise InputError (saying what works) for CUDA graphs off CUDA or without the fixed-shape path."""
    if cuda_graphs and torch.device(device).type != "cuda":
        raise InputError("cuda_graphs needs a CUDA device; leave it off on CPU")
    if cuda_graphs and static_shapes is False:
        raise InputError("cuda_graphs replays the fixed-shape path; use static_shapes=True or None with it")


class PreparedImage(NamedTuple):
    """One image after the host-side preprocessing (GeneralizedRCNN.prepare)."""

    tensor: torch.Tensor  # [3, h, w] uint8 RGB, resized, on the CPU: a view of an HxWx3 array (transforms.chw_view)
    size: tuple[int, int]  # resized (h, w)
    original_size: tuple[int, int]  # (h, w) of the input


@dataclass
class ImageBatch:
    """A preprocessed batch: normalised, zero-padded images plus the sizes needed to undo resizing."""

    tensor: torch.Tensor  # [N, 3, H, W] float32
    image_sizes: list[tuple[int, int]]  # resized, unpadded (h, w)
    original_sizes: list[tuple[int, int]]  # (h, w) of the inputs


@dataclass
class Trace:
    """Intermediate results of one forward pass, for parity checks and debugging."""

    batch: Optional[ImageBatch]  # set by trace(); run() sees only the padded tensor
    features: dict[str, torch.Tensor]
    proposals: list[Proposals]
    instances: list[RawInstances]
    detections: list[Any] = field(default_factory=list)


class GeneralizedRCNN(nn.Module):
    """Faster / Mask R-CNN with Detectron2's module tree (so its state_dict keys load as they are)."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        inp = arch.input
        self.backbone = build_backbone(arch)
        shape = self.backbone.output_shape()
        self.proposal_generator = RPN(arch.rpn, shape)
        self.roi_heads = build_roi_heads(arch, shape)
        # not persistent: Detectron2's checkpoints do not carry them
        self.register_buffer("pixel_mean", torch.tensor(inp.pixel_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(inp.pixel_std, dtype=torch.float32), persistent=False)
        self.input_format = inp.format
        self.min_size_test = inp.min_size_test
        self.max_size_test = inp.max_size_test
        self.size_divisibility = inp.size_divisibility
        self.mask_threshold = arch.roi_heads.mask_head.mask_threshold if arch.roi_heads.mask_head else 0.5
        # "fp32" (exact), "tf32" (CUDA: fp32 with the box head's fc layers in TF32), "bf16" or "fp16" (CUDA): the
        # last two run the network under torch.autocast, while box decoding, scores, NMS and mask pasting stay
        # fp32; None (default): tf32 on CUDA, fp32 on CPU
        self.precision: Optional[str] = None
        # True: the fixed-shape inference path (no host synchronisation until the detections are read;
        # exact: an image whose fixed-capacity NMS cannot guarantee the exact result is recomputed);
        # False: the dynamic path; None (default): fixed shapes on CUDA, dynamic on CPU, where a host
        # sync costs nothing and the dynamic path skips the padding work
        self.static_shapes: Optional[bool] = None
        # on CUDA with the fixed-shape path: replay the network from CUDA graphs captured per padded batch
        # shape and precision (zoo.modeling.graphs); off by default: its gain on streams of many shapes is
        # not yet measured on a GPU
        self.cuda_graphs = False
        self._graph_cache = None
        # True: FrozenBN folded into cached conv weights and NHWC (channels_last) tensors, which oneDNN and
        # cuDNN run faster but round differently from Detectron2; False: Detectron2's own ops (conv, then
        # batch_norm, NCHW), whose features are bit-identical to Detectron2's on CPU; None (default): exact for
        # fp32 on CPU, fast otherwise (on CUDA, TF32 and cuDNN's algorithm choice round differently anyway;
        # bf16/fp16 round far more)
        self.fast_convs: Optional[bool] = None
        # True (experimental, CUDA with fast convolutions): each conv + bias (+ residual add) + relu runs as one
        # cuDNN call (layers.conv_relu) instead of up to four kernels: 6-20% faster at batch 1 on an H100, off until
        # the parity suite has run with it on a GPU
        self.cudnn_fusion = False
        self._convs_laid_out_fast: Optional[bool] = None  # the fast_convs choice the weights are laid out for
        self.register_load_state_dict_post_hook(_after_load)
        self.eval()

    def __setattr__(self, name: str, value: Any) -> None:
        # the inference switches are plain attributes: catch a bad value here, not at the next predict
        if name == "precision":
            _check_precision_name(value)
        if name in ("static_shapes", "fast_convs") and value is not None and not isinstance(value, bool):
            raise InputError(f"{name} is True, False or None (automatic), not {value!r}")
        if name in ("cuda_graphs", "cudnn_fusion") and not isinstance(value, bool):
            raise InputError(f"{name} is True or False, not {value!r}")
        super().__setattr__(name, value)

    def _apply(self, fn, recurse: bool = True):  # moved or cast
        self._forget_weight_layout()
        return super()._apply(fn, recurse)

    def _forget_weight_layout(self) -> None:
        """The weights were replaced (moved, cast, loaded with assign=True): captured graphs point at the old
        tensors, and the new ones may be in another memory format, so both are redone on the next call."""
        self._graph_cache = None
        self._convs_laid_out_fast = None

    def tensors_in_caches(self) -> list[torch.Tensor]:
        """Tensors that forward passes read from the modules' caches (grid anchors, folded conv weights) rather than
        from parameters and buffers. A cache may drop or rebuild them at any time (the anchors' holds 17 shapes, a
        precision change refolds the convs); a CUDA graph that read them keeps these references, so that its
        replays never read memory that was freed and reused. A new cache of tensors must be listed here."""
        return [t for m in self.modules() if hasattr(m, "cached_tensors") for t in m.cached_tensors()]

    def clear_cuda_graphs(self) -> None:
        """Drop the captured CUDA graphs and their memory pool (shapes are captured again on later use)."""
        self._graph_cache = None

    def cuda_graph_stats(self) -> dict[str, int]:
        """How the CUDA graphs have served since they were last cleared: "graphs" held now, and batches
        "replays" (from a graph), "eager" (no graph yet, not worth one, or its capture failed), "captures",
        "evictions" (a graph dropped for a signature used more often)."""
        from .graphs import STAT_NAMES

        cache = self._graph_cache
        if cache is None:
            return dict.fromkeys(("graphs", *STAT_NAMES), 0)
        return {"graphs": len(cache), **cache.stats}

    def __getstate__(self):  # copies and pickles start without graphs (they belong to this model's tensors)
        state = super().__getstate__().copy()
        state["_graph_cache"] = None
        return state

    def graph_settings(self) -> tuple:
        """The plain-Python settings of the fixed-shape path, which a CUDA graph capture bakes in as constants
        (so GraphCache keys graphs by them: a threshold edited after a capture gets a graph of its own)."""
        rpn, rh = self.proposal_generator, self.roi_heads
        return (rpn.nms_thresh, rpn.pre_nms_topk, rpn.post_nms_topk, rpn.min_box_size,
                rh.score_thresh, rh.nms_thresh, rh.detections_per_image, rh.static_nms_capacity, self.cudnn_fusion)

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return self.pixel_mean.device

    # ------------------------------------------------------------------ preprocessing
    def prepare(self, image: Any) -> PreparedImage:
        """The host-side part of preprocessing for one image (path, PIL image, HxWx3 uint8 RGB array or uint8
        image tensor, 3xHxW or HxWx3): decode and resize. The result may share an array's memory (one already at
        the network's size). Safe to run on other threads (predict_iter's readers do)."""
        rgb = to_rgb_array(image)
        h, w = rgb.shape[:2]
        new = resized_size(h, w, self.min_size_test, self.max_size_test)
        return PreparedImage(chw_view(resize_uint8(rgb, new)), new, (h, w))

    def collate(self, prepared: Sequence[PreparedImage]) -> ImageBatch:
        """Prepared images -> normalised, zero-padded batch on the model's device."""
        dtype = next(self.parameters()).dtype
        if dtype != torch.float32:  # e.g. after model.half(): the convolutions would fail on float32 images
            name = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "bf16")
            if name == "fp16" and self.device.type != "cuda":  # fp16 runs on CUDA only: point at what runs here
                name = "bf16"
            raise InputError(f"the model's weights are {dtype}, but zoo keeps them float32 and runs reduced "
                             f"precision under autocast: call model.float(), then set model.precision = '{name}'")
        device = self.device
        tensors = [p.tensor.to(device, non_blocking=True) for p in prepared]
        # channel order and layout on the device: the backbone's input layout, so that it needs no copy of its own
        layout = torch.channels_last if self.uses_fast_convs(device) else torch.contiguous_format
        batch = normalize_and_pad(tensors, self.pixel_mean, self.pixel_std, self.size_divisibility,
                                  flip_channels=self.input_format == "BGR", memory_format=layout)
        return ImageBatch(batch, [p.size for p in prepared], [p.original_size for p in prepared])

    def preprocess(self, images: Sequence[Any]) -> ImageBatch:
        """Images (as `prepare` takes them) -> normalised, padded batch on the model's device."""
        return self.collate([self.prepare(im) for im in images])

    # ------------------------------------------------------------------ network
    def forward(self, images: torch.Tensor, image_sizes: Sequence[tuple[int, int]]) -> list[RawInstances]:
        """Run the network on a preprocessed batch; detections are in resized-image pixels."""
        return self.run(images, image_sizes).instances

    @contextlib.contextmanager
    def _forward_context(self, device: torch.device, precision: Optional[str] = None
                         ) -> Iterator[Optional[list[torch.Tensor]]]:
        """The forward pass's numeric context: autocast for bf16/fp16, TF32 box-head fcs for tf32, cuDNN fusion
        when on, and for fp16 the overflow guard, whose notes it yields (None for other precisions).
        `precision`: run this one instead of the model's (the guard's recompute)."""
        precision = check_precision(self.precision if precision is None else precision, device)
        dtype = PRECISIONS[precision]
        numeric = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with cudnn_fusion(self.cudnn_fusion), tf32_fc(precision == "tf32"), numeric, \
                overflow.overflow_guard(precision in overflow.GUARDED_PRECISIONS) as notes:
            yield notes

    def run(self, images: torch.Tensor, image_sizes: Sequence[tuple[int, int]],
            precision: Optional[str] = None) -> Trace:
        """Forward pass that also returns the backbone features and the proposals. A batch that overflowed fp16
        is run again at the device's default precision (a warning says so)."""
        image_sizes = [tuple(int(v) for v in s) for s in image_sizes]
        with self._forward_context(images.device, precision) as notes:
            features = self.backbone(images.contiguous(memory_format=self._lay_out_convs(images.device)))
            proposals = self.proposal_generator(features, image_sizes)
            instances = self.roi_heads(features, [p.boxes for p in proposals], image_sizes)
        if notes and not bool(overflow.all_finite(notes)):
            fallback = resolve_precision(None, images.device)
            warnings.warn(f"{resolve_precision(self.precision, images.device)} overflowed on a batch (a value "
                          f"beyond its range became inf or NaN), so zoo ran that batch again in {fallback}; if this "
                          f"happens often, use precision='bf16' or the default", RuntimeWarning, stacklevel=2)
            return self.run(images, image_sizes, fallback)
        return Trace(None, features, proposals, instances)  # the batch (with original sizes) is trace()'s

    def uses_fast_convs(self, device: torch.device) -> bool:
        """Whether the network runs fast (folded, channels_last) convolutions on `device` (see `fast_convs`)."""
        if self.fast_convs is None:
            return torch.device(device).type == "cuda" or resolve_precision(self.precision, device) != "fp32"
        return bool(self.fast_convs)

    def _lay_out_convs(self, device: torch.device) -> torch.memory_format:
        """Lay the weights out for the conv mode on `device` (converted only when the mode changes); returns
        the memory format the backbone's input takes."""
        fast = self.uses_fast_convs(device)
        layout = torch.channels_last if fast else torch.contiguous_format
        if self._convs_laid_out_fast != fast:
            # threads sharing the model: one converts while the others wait (a weight swapped under a running
            # convolution is not safe)
            with _LAYOUT_LOCK:
                if self._convs_laid_out_fast != fast:
                    with torch.inference_mode(False):  # weights converted in predict's inference mode could not train
                        self.to(memory_format=layout)
                    for m in self.modules():
                        if isinstance(m, Conv2d):
                            m.fold_norm = fast
                    self._convs_laid_out_fast = fast
        return layout

    def uses_static_shapes(self, device: torch.device) -> bool:
        """Whether predict/trace take the fixed-shape path on `device` (see `static_shapes`)."""
        if self.static_shapes is None:
            return torch.device(device).type == "cuda"
        return bool(self.static_shapes)

    def size_table(self, batch: ImageBatch) -> torch.Tensor:
        """The batch's sizes as a [N, 8] float32 tensor on the model's device, for the fixed-shape path:
        resized (h, w), original (h, w), then the rescale factors (sx, sy, sx, sy) rounded to float32 as
        a Python scalar multiplying a float32 tensor would be. Graph replays take new sizes through it."""
        rows = [(rh, rw, oh, ow, ow / rw, oh / rh, ow / rw, oh / rh)
                for (rh, rw), (oh, ow) in zip(batch.image_sizes, batch.original_sizes)]
        return torch.tensor(rows, dtype=torch.float32).to(self.device, non_blocking=True)

    def run_static(self, images: torch.Tensor, image_sizes: Sequence[tuple[int, int]] | torch.Tensor
                   ) -> tuple[dict[str, torch.Tensor], ProposalBatch, InstanceBatch]:
        """The network with fixed shapes and no host synchronisation: features, padded proposals and
        padded detections (resized-image pixels). `image_sizes`: (h, w) per image, or a size_table() (what a
        CUDA graph or a sync-free run needs: a list is copied from the host here)."""
        if not isinstance(image_sizes, torch.Tensor):
            image_sizes = torch.tensor([[int(v) for v in s] for s in image_sizes], dtype=torch.float32,
                                       device=images.device)
        with self._forward_context(images.device) as notes:
            features = self.backbone(images.contiguous(memory_format=self._lay_out_convs(images.device)))
            proposals = self.proposal_generator(features, image_sizes, static=True)
            instances = self.roi_heads.forward_static(features, proposals.boxes, proposals.counts, image_sizes)
        instances.complete = instances.complete & proposals.complete
        if notes:  # fp16 overflowed: the dynamic recompute (run) redoes these images at the default precision
            instances.complete = instances.complete & overflow.all_finite(notes)
        return features, proposals, instances

    def compact_static(self, instances: InstanceBatch, sizes: ImageBatch | torch.Tensor) -> InstanceBatch:
        """detector_postprocess's box part on device: boxes in original pixels, empty ones dropped by
        moving the survivors to the front (order kept); masks are not pasted yet. `sizes`: the batch or
        its size_table()."""
        if isinstance(sizes, ImageBatch):
            sizes = self.size_table(sizes)
        slots = torch.arange(instances.scores.shape[1], device=instances.scores.device)
        # rescale_boxes with the sizes on device: the same float32 products, then the clip
        boxes = clip_boxes(instances.boxes * sizes[:, None, 4:8], (sizes[:, 2:3], sizes[:, 3:4]))
        keep = (slots < instances.counts[:, None]) & nonempty(boxes)
        order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices  # survivors first, in order
        mp = instances.mask_probs
        if mp is not None:
            mp = mp.gather(1, order.view(*order.shape, 1, 1).expand(-1, -1, *mp.shape[2:]))
        return InstanceBatch(boxes.gather(1, order[..., None].expand(-1, -1, 4)), instances.scores.gather(1, order),
                             instances.classes.gather(1, order), keep.sum(dim=1), instances.complete, mp)

    def _detect_static(self, batch: ImageBatch):
        """The fixed-shape path for a batch: features, proposals, padded instances and the detections, masks not
        pasted yet (one host synchronisation, then slicing)."""
        sizes = self.size_table(batch)
        features, proposals, instances = self.run_static(batch.tensor, sizes)
        return features, proposals, instances, self._deliver(self.compact_static(instances, sizes), batch)

    def _deliver(self, final: InstanceBatch, batch: ImageBatch, copy: bool = False) -> list[Unpasted]:
        """Compacted detections -> one Unpasted per image (copy=True: own the tensors, not views into `final`,
        whose buffers the next CUDA-graph replay overwrites)."""
        counts = torch.cat([final.counts, final.complete.to(torch.int64)]).tolist()  # the one sync
        n = len(batch.image_sizes)
        out = []
        for i in range(n):
            if not counts[n + i]:  # capacity could not guarantee exactness: recompute exactly
                sub = ImageBatch(batch.tensor[i:i + 1], batch.image_sizes[i:i + 1], batch.original_sizes[i:i + 1])
                out.extend(self.postprocess(self.forward(sub.tensor, sub.image_sizes), sub))
                continue
            c, os_ = counts[i], batch.original_sizes[i]
            parts = [final.boxes[i, :c], final.scores[i, :c], final.classes[i, :c],
                     None if final.mask_probs is None else final.mask_probs[i, :c]]
            if copy:  # ordinary tensors (copied outside inference mode): predict need not copy them again
                with torch.inference_mode(False):
                    parts = [None if t is None else t.clone() for t in parts]
            out.append(Unpasted(*parts, image_size=(int(os_[0]), int(os_[1]))))
        return out

    def _detect_unpasted(self, batch: ImageBatch) -> list[Unpasted]:
        """Detections in original-image pixels for a preprocessed batch (static or dynamic path), masks not pasted
        yet."""
        if self.uses_static_shapes(batch.tensor.device):
            if self.cuda_graphs and batch.tensor.is_cuda:
                from .graphs import graph_cache

                self._lay_out_convs(batch.tensor.device)  # before the cache: a layout change drops it
                return graph_cache(self).run(self, batch, take=lambda final: self._deliver(final, batch, copy=True))
            return self._detect_static(batch)[3]
        return self.postprocess(self.forward(batch.tensor, batch.image_sizes), batch)

    def postprocess(self, instances: Sequence[RawInstances], batch: ImageBatch) -> list[Unpasted]:
        """Detections in original-image pixels (boxes rescaled and clipped, empty ones dropped), masks not pasted
        yet."""
        out = []
        for inst, rs, os_ in zip(instances, batch.image_sizes, batch.original_sizes):
            boxes, scores, classes, mask_probs = postprocess_boxes(inst.boxes, inst.scores, inst.classes,
                                                                   inst.mask_probs, rs, os_)
            out.append(Unpasted(boxes, scores, classes.to(torch.int64), mask_probs, (int(os_[0]), int(os_[1]))))
        return out

    def trace(self, image: Any) -> Trace:
        """Everything `predict` computes for images, with the intermediates (sizes, features, proposals)."""
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        with torch.inference_mode():
            batch = self.preprocess(images)
            if self.uses_static_shapes(batch.tensor.device):
                features, proposals, instances, unpasted = self._detect_static(batch)
                tr = Trace(batch, features, proposals.unbatch(), instances.unbatch())
                if not bool(instances.complete.all()):  # the detections were recomputed exactly
                    tr.instances = self.run(batch.tensor, batch.image_sizes).instances
            else:
                tr = self.run(batch.tensor, batch.image_sizes)
                tr.batch = batch
                unpasted = self.postprocess(tr.instances, batch)
            tr.detections = [u.paste(self.mask_threshold) for u in unpasted]
        return tr

    def predict(self, image: Any, *, batch_size: Optional[int] = None, exact: bool = True) -> Any:
        """Detect objects: one image -> Detections; a list of images -> list of Detections.

        A list runs as batched forwards of at most `batch_size` images (default: no limit). With exact=True
        (default) each forward holds images of one padded shape, so every result equals predicting that
        image alone (a wider zero padding changes the convolutions near the border); same-sized inputs are
        one forward. exact=False batches in input order whatever the sizes (Detectron2's batched
        semantics: fewer forwards, but smaller images' results can differ from single-image ones).
        For many images, predict_iter streams them with bounded memory.
        """
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        if not images:
            raise InputError("predict got an empty list; pass an image or a non-empty list of images")
        _check_positive("batch_size", batch_size, allow_none=True)
        if self.training:
            self.eval()
        # the list holds every image already: no window, and no copies of arrays (nothing reuses them meanwhile);
        # reader threads only where some image has reading to do (arrays at the network's size are handed on as
        # they are, and starting threads cost more than that here)
        workers = 2 if not single and any(self._needs_reading(im) for im in images) else 0
        dets = list(self._stream(images, batch_size or len(images), exact, workers=workers, window=len(images),
                                 copy_arrays=False))
        return dets[0] if single else dets

    def _needs_reading(self, image: Any) -> bool:
        """Whether prepare has work to do for `image` (decode, resize) that a reader thread could overlap: all but
        an HxWx3 uint8 array already at the network's size."""
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
                and min(image.shape[:2]) >= 1):
            return True
        h, w = image.shape[:2]
        return resized_size(h, w, self.min_size_test, self.max_size_test) != (h, w)

    def predict_iter(self, images: Iterable[Any], *, batch_size: int = 1, exact: bool = True, workers: int = 2,
                     window: Optional[int] = None, errors: str = "raise") -> Iterator[Any]:
        """Detections for each of `images` (any iterable: a list, a generator of paths), yielded in input order.

        Made for large image sets: `workers` threads read and resize images ahead while the network runs
        (0: no threads), and at most about `window` images (default 4 x batch_size) are held at a time, so
        memory stays bounded however many images come. Forwards hold up to `batch_size` images, grouped as
        `predict` groups them (exact=True: one padded shape per forward, so each result equals predicting that
        image alone); a group that has not filled up by the time `window` images wait runs partly full.
        Arrays and tensors are copied as they are taken, so a source that refills one buffer (a video reader) is
        safe. An image that cannot be read (a missing, corrupt or unsupported file, a bad array) raises its InputError
        when its turn comes (errors="raise"), ending the stream; with errors="yield" that error is yielded in the
        image's place and the stream goes on. Bad arguments raise at the call.
        """
        _check_positive("batch_size", batch_size)
        _check_positive("workers", workers, allow_zero=True)
        window = 4 * batch_size if window is None else window
        _check_positive("window", window)
        if errors not in ("raise", "yield"):
            raise InputError(f"errors must be 'raise' or 'yield', got {errors!r}")
        if self.training:
            self.eval()
        return self._stream(images, batch_size, exact, workers, window, copy_arrays=True,
                            yield_errors=errors == "yield")

    def _stream(self, images: Iterable[Any], batch_size: int, exact: bool, workers: int, window: int,
                copy_arrays: bool, yield_errors: bool = False) -> Iterator[Any]:
        from .streaming import group_batches, in_input_order, read_ahead

        def key(p: PreparedImage) -> Any:
            return padded_size(*p.size, self.size_divisibility) if exact else 0

        def prepare(image: Any) -> Any:  # with yield_errors, an unreadable image becomes its error
            try:
                return self.prepare(image)
            except InputError as e:
                return e

        # a reader thread reads an array later, and a prepared image may share its memory and wait for its batch:
        # copy it now, the caller may reuse it
        if copy_arrays:
            images = (np.array(im) if isinstance(im, np.ndarray)
                      else im.detach().to("cpu", copy=True) if isinstance(im, torch.Tensor) else im for im in images)
        reads = read_ahead(images, prepare if yield_errors else self.prepare, workers, depth=max(window, workers))
        failed = (lambda p: isinstance(p, InputError)) if yield_errors else None
        try:
            # each image's masks are pasted as it is handed over, so those of a batch, or of results waiting for
            # an earlier image, never all exist at once (100 masks of a 12 MP photo take 1.2 GB)
            for r in in_input_order(self._run_batches(group_batches(reads, key, batch_size, window, failed))):
                yield r if isinstance(r, InputError) else r.paste(self.mask_threshold)
        finally:
            reads.close()  # stop the reader threads when the caller stops early

    def _run_batches(self, batches: Iterable[list[tuple[int, Any]]]) -> Iterator[tuple[int, Any]]:
        for batch in batches:
            if isinstance(batch[0][1], InputError):  # an image that could not be read: its error, in its place
                yield batch[0]
                continue
            with torch.inference_mode():  # only around the network: predict_iter's caller runs between yields
                unpasted = self._detect_unpasted(self.collate([p for _, p in batch]))
            yield from zip((i for i, _ in batch), unpasted)


@dataclass
class Unpasted:
    """One image's detections before its masks are pasted: boxes in original-image pixels, [N, M, M] mask
    probabilities. Pasting makes N x H x W masks at the original size, by far the largest result, so predict_iter
    does it for one image at a time, as it hands that image over."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    mask_probs: Optional[torch.Tensor]
    image_size: tuple[int, int]

    def paste(self, threshold: float) -> Any:
        """The Detections, made of ordinary tensors (inference-mode ones are copied), which callers may edit in
        place."""
        from ..results import Detections

        masks = None
        if self.mask_probs is not None:
            masks = paste_masks_in_image(self.mask_probs, self.boxes, self.image_size, threshold)
        return Detections(_owned(self.boxes), _owned(self.scores), _owned(self.labels), masks, self.image_size)


def _owned(t: torch.Tensor) -> torch.Tensor:
    return t.clone() if t.is_inference() else t


def _check_positive(name: str, value: Any, *, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    least = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        what = "a non-negative integer" if allow_zero else "a positive integer"
        raise InputError(f"{name} must be {what}{' or None' if allow_none else ''}, got {value!r}")


def build_model(arch: Architecture, *, random_init: bool = True) -> GeneralizedRCNN:
    """The network for a manifest's architecture, in eval mode, randomly initialised.

    random_init=False skips the random fills of the parameters (their memory is left as allocated), for a strict
    load_weights right after, which overwrites every one: that fill is most of the build's time (1.2 s of
    R50-DC5's, whose box head holds 100M weights, on a 2-core CPU)."""
    if random_init:
        return GeneralizedRCNN(arch).eval()
    with _NoRandomInit():
        return GeneralizedRCNN(arch).eval()


class _NoRandomInit(torch.overrides.TorchFunctionMode):
    """Inside the block (this thread only: the mode stack is per thread), torch.nn.init's random fills and the
    tensor methods they use return their tensor untouched."""

    _SKIPPED = frozenset({nn.init.kaiming_uniform_, nn.init.kaiming_normal_, nn.init.uniform_, nn.init.normal_,
                          nn.init.xavier_uniform_, nn.init.xavier_normal_, nn.init.trunc_normal_,
                          torch.Tensor.uniform_, torch.Tensor.normal_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._SKIPPED:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))
