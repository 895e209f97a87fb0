"""zoo: the Detectron2 COCO baselines as typed manifests, verified weights and exact PyTorch models."""
from .errors import ZooError
from .manifest import Manifest
from .registry import get_manifest, list_models, register

__version__ = "0.1.0"
__all__ = ["get", "get_manifest", "list_models", "register", "load_checkpoint", "Manifest", "ZooError"]


def __getattr__(name: str):
    # torch-heavy parts load on first use so `zoo list` stays fast.
    if name == "get":
        from .api import get

        return get
    if name == "load_checkpoint":
        from .hub.checkpoint import load_checkpoint

        return load_checkpoint
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
