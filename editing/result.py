"""EditResult: what every edit returns (a weight delta plus the keys that span it).

Offers
    EditResult      delta (models.WeightDelta), keys, method, request, hparams, info;
                    keys_for(site), key_entries(), summary().

An edit is a pure function (model, request, hparams) -> EditResult: it never leaves the model
changed (in-loop generation goes through models.apply_delta, which restores bit for bit). Apply
the result with `models.apply_delta(model, result.delta)` or keep it with `merge_delta`.

Key names. A key that belongs to one site is named "<name>:<site>" (e.g. "v_star:unet.xattn.3.to_k",
"u:text.mlp.3.fc2"); a key shared by every site of the edit is named "<name>" alone (UCE's c_e and
c_p when all edited sites read the same text rows, as on SD1.x, SDXL and the organism). The store
keeps the same split: `key_entries()` yields (name, site or None, tensor), which is what
`store.Store.create_edit_key(edit_id, name, value, site=site)` takes.

| method | keys (shapes) |
| --- | --- |
| uce, uce_debias | c_e (n_e, d_in) edited rows; c_p (n_p, d_in) preserved rows; v_star:<site> (n_e, d_out) |
| refact | k_star:<site> (d_in,); k_bar:<site> (d_in,); u:<site> (d_in,); v_star:<site> (d_out,) |

All tensors are float32 on the CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from models.delta import WeightDelta
from models.errors import FadelabError


@dataclass
class EditResult:
    """One edit: its weight delta, the keys that define it, and how it was made.

    Attributes:
        delta: the update per site (dense for UCE, rank one (B, A) for ReFACT); its provenance
            holds method, hparams and the base weights it was computed on.
        keys: key name -> tensor; names are "<name>" (shared by all sites) or "<name>:<site>"
            (see the module doc for each method's keys).
        method: "uce", "uce_debias" or "refact".
        request: what was asked, as a plain JSON-ready dict (concepts, guides, preserve prompts;
            or the ReFACT request).
        hparams: the frozen hparams dataclass the edit ran with.
        info: diagnostics, JSON-ready (debias rounds and ratios; ReFACT steps and p(new); ...).
    """

    delta: WeightDelta
    keys: dict[str, Tensor]
    method: str
    request: dict
    hparams: Any
    info: dict = field(default_factory=dict)

    def sites(self) -> list[str]:
        """The sites the delta touches."""
        return self.delta.sites()

    def keys_for(self, site: str) -> dict[str, Tensor]:
        """The keys of one site, with shared keys included: {name: tensor}."""
        if site not in self.delta.deltas:
            raise FadelabError(f"this edit has no site {site!r}; it has {', '.join(self.sites()[:6])}")
        out = {}
        for full, value in self.keys.items():
            name, _, owner = full.partition(":")
            if owner in ("", site):
                out[name] = value
        return out

    def key_entries(self) -> Iterator[tuple[str, str | None, Tensor]]:
        """(name, site or None, tensor) for every key, in the store's terms."""
        for full, value in self.keys.items():
            name, _, site = full.partition(":")
            yield name, (site or None), value

    def hparams_dict(self) -> dict:
        """The hparams as a plain dict (nested dataclasses included)."""
        return dataclasses.asdict(self.hparams) if dataclasses.is_dataclass(self.hparams) else dict(self.hparams)

    def summary(self) -> str:
        """One line: method, sites, largest update norm and the main diagnostics."""
        norms = [self.delta.norm(s) for s in self.sites()]
        top = max(norms) if norms else 0.0
        extra = ", ".join(f"{k}={v}" for k, v in self.info.items()
                          if isinstance(v, (int, float, str)) and not isinstance(v, bool))
        return (f"{self.method}: {len(norms)} sites, max |dW|_F {top:.4g}"
                + (f", {extra}" if extra else ""))
