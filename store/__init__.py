"""fadelab.store: the HDF5 experiment store, its xarray views and the activation recorder.

- `Store`: one HDF5 file per experiment; `Store.open(path, "a" | "r")`. See docs/store.md.
- `StoreError`: every user-caused store error.
- `Recorder`: forward hooks over {site: module} that collect or stream activations.
- `SCHEMA_VERSION`: the file layout version this code writes and reads.

The store imports nothing else from fadelab: sites are plain strings, values plain arrays.
"""

from store.core import SCHEMA_VERSION
from store.errors import StoreError
from store.store import Store


def __getattr__(name):
    """Import the recorder (and torch) only when it is asked for."""
    if name == "Recorder":
        from store.recorder import Recorder
        return Recorder
    raise AttributeError(f"module 'store' has no attribute {name!r}")

__all__ = ["SCHEMA_VERSION", "Recorder", "Store", "StoreError"]
