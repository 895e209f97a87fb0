"""Load Detectron2 checkpoints without running code from the file."""
from __future__ import annotations

import collections
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

from zoo.errors import CheckpointError

if TYPE_CHECKING:
    import torch

_TORCH_SUFFIXES = (".pth", ".pt")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format
_WRAPPER_KEYS = ("model", "state_dict", "blobs")  # Detectron2, plain PyTorch, Caffe2 Detectron
_LATIN1_NAMES = ("latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1")


def _latin1_encode(obj: object, encoding: str = "latin1") -> bytes:
    # Python 3 writes bytes as _codecs.encode(str, 'latin1') in protocol 2; nothing else is needed.
    if not isinstance(obj, str) or str(encoding).lower().replace("_", "-") not in _LATIN1_NAMES:
        raise CheckpointError(f"checkpoint calls _codecs.encode with encoding {encoding!r}; only latin1 is allowed")
    return obj.encode("latin1")


class _NDArrayType:
    """Stands in for numpy.ndarray: pickles name it only as `_reconstruct`'s subtype, never call it."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # ndarray(shape, dtype) would allocate whatever shape a 40-byte file asks for
        raise CheckpointError("checkpoint calls numpy.ndarray directly, which a weights file never does; refusing it")


_NDARRAY = _NDArrayType()


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    import numpy as np

    try:
        from numpy._core import multiarray, numeric
    except (ImportError, AttributeError):  # NumPy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]

    def reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> Any:
        # numpy pickles every array as _reconstruct(ndarray, (0,), b'b') + BUILD with the real data, so the
        # array's size is bounded by the bytes in the file; anything else could allocate without limit.
        if subtype is not _NDARRAY or tuple(shape) != (0,):
            raise CheckpointError("checkpoint builds a numpy array in an unusual way; refusing to load it")
        return multiarray._reconstruct(np.ndarray, (0,), dtype_code)

    def scalar(dtype: Any, data: Any = None) -> Any:
        # without data (or with a non-bytes payload) numpy would allocate or unpickle objects
        if isinstance(data, str):  # Python 2 byte strings arrive latin1-decoded
            data = data.encode("latin1")
        if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes) \
                or len(data) != dtype.itemsize:
            raise CheckpointError("checkpoint holds a malformed numpy scalar; refusing to load it")
        return multiarray.scalar(dtype, data)

    table: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): _latin1_encode,
    }
    # Old pickles name numpy.core, NumPy >= 2 writes numpy._core; both map to the live module.
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{core}.multiarray", "scalar")] = scalar
        table[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5: views of file bytes
    return table


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only build numpy arrays, dtypes, scalars and plain containers."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise CheckpointError(
                f"{self._path} refers to {module}.{name}, which a weights file never needs; refusing to load it "
                f"(it may be malicious): use a checkpoint from a trusted source"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self._path} uses pickle persistent ids; it is not a Detectron2 .pkl checkpoint")


def _first_line(e: BaseException) -> str:
    """The first line of an exception's text without terminal colour codes (torch.load adds some)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _in_cache(path: Path) -> bool:
    from . import cache

    try:
        return path.resolve().is_relative_to(cache.cache_root().resolve())
    except OSError:
        return False


def _unreadable(path: Path, e: BaseException) -> CheckpointError:
    advice = ("run `zoo download NAME` to replace it" if _in_cache(path) else
              "check that it is a Detectron2 .pkl or a PyTorch state_dict (.pth) file and complete")
    return CheckpointError(
        f"cannot read checkpoint {path}: truncated or not a checkpoint ({type(e).__name__}: {_first_line(e)}); "
        f"{advice}"
    )


def _load_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # pickle reports damage as many different exception types
        raise _unreadable(path, e) from None


def _load_torch(path: Path) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise CheckpointError(
                f"refusing to load {path}: it holds objects that weights-only loading does not allow "
                f"({_first_line(e)}); if it is a whole pickled model, save its weights instead with "
                f"torch.save(model.state_dict(), path)"
            ) from None
        raise _unreadable(path, e) from None
    except Exception as e:
        raise _unreadable(path, e) from None


def _to_tensor(value: Any, key: str, path: Path) -> "torch.Tensor":
    import numpy as np
    import torch

    arr = np.asarray(value)
    if arr.dtype.kind not in "biufc":
        raise CheckpointError(f"{path}: entry {key!r} has dtype {arr.dtype}, not numbers; this is not a weights file")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))  # a copy
    elif not (arr.flags.writeable and arr.flags.c_contiguous):
        # e.g. a view of read-only file bytes (pickle protocol 5): torch needs its own writable, contiguous copy
        arr = np.array(arr, copy=True, order="C")
    # Otherwise the array's memory is the unpickler's private bytes object (protocols 2-4): tensors share it, which
    # saves copying every weight (0.9 s of loading X101-FPN's 0.4 GB checkpoint on a 2-core CPU).
    return torch.from_numpy(arr)


def _state_dict(obj: Any, path: Path) -> dict[str, "torch.Tensor"]:
    import numpy as np
    import torch

    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of weights; this is not a checkpoint")
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if isinstance(key, bytes):  # Python 2 str keys read without latin1 decoding
            key = key.decode("latin1")
        if not isinstance(key, str):
            raise CheckpointError(f"{path} has a non-string weight name {key!r}; this is not a checkpoint")
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, (np.ndarray, np.generic)):
            out[key] = _to_tensor(value, key, path)
        elif key.startswith("__"):
            continue  # metadata such as __author__
        else:
            raise CheckpointError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not an array; this is not a weights file"
            )
    if not out:
        raise CheckpointError(f"{path} contains no weight arrays; check that it is a model checkpoint")
    return out


def load_checkpoint(path: Union[str, os.PathLike]) -> dict[str, "torch.Tensor"]:
    """Read a Detectron2 .pkl or a PyTorch .pth/.pt checkpoint into {name: tensor}, running no code from it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(_ZIP_MAGIC))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist; check the path") from None
    except OSError as e:
        raise CheckpointError(f"cannot open checkpoint {path}: {e.strerror or e}; check the path") from None
    if head == _ZIP_MAGIC or path.suffix.lower() in _TORCH_SUFFIXES:
        obj = _load_torch(path)
    else:
        obj = _load_pickle(path)
    return _state_dict(obj, path)
