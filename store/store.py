"""`Store`: one HDF5 file per experiment, assembled from the store's rooms.

    with Store.open("runs/exp1.h5", "a", config=toml_text, code_version=commit,
                    seeds={"global": 0}) as st:
        st.require_delta("M_ed/e1", "text.mlp.7.fc2", dW, attrs={"method": "refact"})
        w = st.open_activations("M", "text.mlp.7.fc2", (1000, 77, 3072), "float16",
                                ("prompt", "token", "neuron"), coords={"prompt": prompts})
        ...
    with Store.open("runs/exp1.h5", "r") as st:
        da = st.activations("M", "text.mlp.7.fc2")

The methods come from mixins, one idea each: `store.core` (file, locking, atomic entries),
`store.weights` (deltas, edit keys, loss), `store.activations`, `store.results` (images,
labels, metrics, arrays) and `store.views` (xarray). docs/store.md has the full schema.
"""

from __future__ import annotations

from store.activations import ActivationsMixin
from store.core import StoreCore
from store.results import ResultsMixin
from store.views import ViewsMixin
from store.weights import WeightsMixin


class Store(WeightsMixin, ActivationsMixin, ResultsMixin, ViewsMixin, StoreCore):
    """An experiment store; open it with `Store.open(path, mode)` (a context manager)."""
