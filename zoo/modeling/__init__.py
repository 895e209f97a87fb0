"""Detectron2-exact Faster / Mask R-CNN networks built from a manifest's `Architecture`."""
from .detector import GeneralizedRCNN, ImageBatch, Trace, build_model
from .weights import load_weights

__all__ = ["GeneralizedRCNN", "ImageBatch", "Trace", "build_model", "load_weights"]
