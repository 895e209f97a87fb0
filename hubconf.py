"""torch.hub entrypoints: one per registered baseline, generated from the manifests.

    model = torch.hub.load("<owner>/zoo", "mask_rcnn_R_50_FPN_3x")          # from GitHub
    model = torch.hub.load("/path/to/zoo", "mask_rcnn_R_50_FPN_3x", source="local")
    detections = model.predict("image.jpg")
"""
# Module names torch.hub checks with importlib before loading (PIL is pillow's import name).
dependencies = ["torch", "numpy", "PIL", "pydantic", "requests", "tqdm", "filelock"]

import zoo as _zoo  # noqa: E402  (torch.hub reads `dependencies` first; the repo root is on sys.path)


def _docstring(name: str) -> str:
    m = _zoo.get_manifest(name)
    ap = f"box {m.metrics.box_ap:.1f}"
    if m.metrics.mask_ap is not None:
        ap += f", mask {m.metrics.mask_ap:.1f}"
    task = "Mask R-CNN instance segmentation" if m.task == "instance_segmentation" else "Faster R-CNN detection"
    return (
        f"{name}: {task}, {m.architecture.layout} layout, {m.lr_schedule.name} schedule.\n\n"
        f"    {m.provenance.evaluated_on}: {ap}\n"
        f"    Config: {m.config}\n"
        f"    Checkpoint: {m.checkpoint.url}\n\n"
        "    Args:\n"
        "        pretrained: load the released weights (downloaded once, verified, cached).\n"
        "        device: 'cpu' (default), 'cuda', 'cuda:N' or 'auto'.\n"
        "        **kwargs: passed to zoo.get (weights=PATH for a local checkpoint, quiet=True, score_thresh=0.3,\n"
        "            min_size=640 and the other test-time settings).\n\n"
        "    Returns the nn.Module in eval mode; model.predict(image) -> zoo.results.Detections.\n"
    )


def _entrypoint(name: str):
    def entry(pretrained: bool = True, device=None, **kwargs):
        if device is not None:
            kwargs["device"] = device
        return _zoo.get(name, pretrained=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = _docstring(name)
    return entry


# torch.hub.list shows every public callable here, so helpers stay private and names come from the registry.
for _name in _zoo.list_models():
    globals()[_name] = _entrypoint(_name)
del _name
