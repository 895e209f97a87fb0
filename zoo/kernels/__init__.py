"""Triton kernels behind zoo.ops (optional: importing this module imports triton)."""

from zoo.kernels.epilogue import conv_epilogue
from zoo.kernels.nms import batched_nms, batched_nms_fixed, nms, nms_fixed
from zoo.kernels.nms import forced_scan as forced_nms_scan
from zoo.kernels.paste import paste_masks
from zoo.kernels.roi_align import _INTERPRET as INTERPRET
from zoo.kernels.roi_align import forced_staging as forced_roi_align_staging
from zoo.kernels.roi_align import forced_tile as forced_roi_align_tile
from zoo.kernels.roi_align import multilevel_roi_align, roi_align

__all__ = ["roi_align", "multilevel_roi_align", "nms", "batched_nms", "nms_fixed",
           "batched_nms_fixed", "paste_masks", "conv_epilogue", "INTERPRET", "forced_roi_align_tile",
           "forced_roi_align_staging", "forced_nms_scan"]
