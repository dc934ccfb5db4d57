"""How values become HDF5 datasets and come back bit for bit: dtypes, bfloat16, names, chunks.

Offers:
- `encode(x) -> (np.ndarray, dtype_name)`: a numpy array or torch tensor to the array HDF5
  stores plus the name of the logical dtype (written as the dataset attribute ``dtype``).
- `decode(raw, dtype_name, as_torch)`: back again, exactly.
- `check_name(kind, value)`: validates variant, site, id and tag strings.
- `chunks_for(shape, itemsize)`: a chunk shape that keeps rows of the first axis whole.

bfloat16 convention (HDF5 has no bfloat16): a bfloat16 array is stored as ``uint16`` holding its
raw bits (the upper 16 bits of the IEEE-754 float32 with the same value), with the dataset
attribute ``dtype = "bfloat16"``. Plain numpy reads it exactly as float32 with
``(raw.astype(np.uint32) << 16).view(np.float32)``; torch with
``torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)``.
"""

from __future__ import annotations

import re
import sys

import numpy as np

from store.errors import StoreError

#: dtypes the store keeps exactly, by logical name
DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
          "uint8", "uint16", "bool")

_NAME = re.compile(r"^[A-Za-z0-9_.+=,:\-]+$")


def check_name(kind: str, value: str) -> str:
    """Validate one path segment (a site, an id, a tag, a metric name) and return it."""
    if not isinstance(value, str) or not _NAME.match(value) or value in (".", ".."):
        raise StoreError(
            f"bad {kind} {value!r}: use letters, digits and _ . + = , : - (no '/', no spaces)"
        )
    return value


def check_variant(variant: str) -> str:
    """Validate a variant name: segments joined by '/', e.g. 'M', 'M_ed/e1', 'M_ed_ft/e1/f1'."""
    if not isinstance(variant, str) or not variant:
        raise StoreError(f"bad variant {variant!r}: expected e.g. 'M', 'M_ed/<edit_id>', "
                         "'M_ft/<ft_id>', 'M_ed_ft/<edit_id>/<ft_id>'")
    for seg in variant.split("/"):
        check_name("variant segment", seg)
        if seg.startswith("@"):
            raise StoreError(f"bad variant {variant!r}: segments may not start with '@'")
    return variant


def encode(x) -> tuple[np.ndarray, str]:
    """Turn a numpy array or torch tensor into (array to store, logical dtype name)."""
    torch = sys.modules.get("torch")  # not imported: x cannot be a tensor (keeps startup light)
    if torch is not None and isinstance(x, torch.Tensor):
        t = x.detach().to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16), "bfloat16"
        arr = t.numpy()
    else:
        arr = np.asarray(x)
    name = arr.dtype.name
    if name not in DTYPES:
        raise StoreError(f"cannot store dtype {arr.dtype}: accepted are {', '.join(DTYPES)}")
    return np.require(arr, requirements="C"), name  # (ascontiguousarray turns 0-d into 1-d)


def stored_dtype(dtype_name: str) -> np.dtype:
    """The numpy dtype HDF5 holds for a logical dtype name."""
    if dtype_name == "bfloat16":
        return np.dtype(np.uint16)
    if dtype_name not in DTYPES:
        raise StoreError(f"unknown dtype {dtype_name!r}: accepted are {', '.join(DTYPES)}")
    return np.dtype(dtype_name)


def decode(raw: np.ndarray, dtype_name: str, as_torch: bool):
    """Turn a stored array back into the value that was written (exactly)."""
    if as_torch:
        import torch
    if dtype_name == "bfloat16":
        if as_torch:
            return torch.from_numpy(np.ascontiguousarray(raw).view(np.int16)).view(torch.bfloat16)
        return (raw.astype(np.uint32) << 16).view(np.float32)  # exact widening
    if as_torch:
        return torch.from_numpy(np.ascontiguousarray(raw))
    return raw


def to_float_view(raw: np.ndarray, dtype_name: str) -> np.ndarray:
    """A numpy array with the stored values (bfloat16 widened exactly to float32)."""
    return decode(raw, dtype_name, as_torch=False)


def chunks_for(shape: tuple[int, ...], itemsize: int, target: int = 1 << 20) -> tuple[int, ...] | None:
    """A chunk shape near `target` bytes that keeps whole rows of axis 0 when they fit.

    Rows of axis 0 are the unit of streaming (one prompt, one image), so a chunk never straddles
    two writes and no chunk is rewritten. Rows larger than 4x `target` are split along axis 1.
    Returns None for scalars and empty arrays (contiguous layout).
    """
    if len(shape) == 0 or 0 in shape:
        return None
    row = int(np.prod(shape[1:], dtype=np.int64)) * itemsize
    if row <= 4 * target:
        k = max(1, min(shape[0], target // max(row, 1)))
        return (k, *shape[1:])
    chunk = [1, *shape[1:]]
    for axis in range(1, len(shape)):  # shrink the leading inner axes until the chunk fits
        rest = int(np.prod(chunk[axis + 1:], dtype=np.int64)) * itemsize
        chunk[axis] = max(1, min(shape[axis], (4 * target) // max(rest, 1)))
        if int(np.prod(chunk, dtype=np.int64)) * itemsize <= 4 * target:
            break
    return tuple(chunk)
