"""xarray views of the store: activations, deltas and metrics with named dims and coordinates.

Dims used across fadelab: ``variant``, ``step``, ``site``, ``prompt``, ``token``, ``neuron``,
``timestep``, ``cfg_branch`` (and ``channel``, ``height``, ``width`` for unpooled UNet sites,
``out``, ``in`` for weight deltas). Coordinates carry prompt texts and concept labels.

Warning: a view reads the selected values into memory; select `rows` (prompts) for large
recordings, e.g. 1,000 prompts x 77 tokens x 3072 neurons is 0.9 GB per site in float32.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from store.errors import StoreError


def _one_activation(store, variant, site, tag, rows, partial) -> xr.DataArray:
    data, info = store.read_activations(variant, site, tag, rows=rows, partial=partial)
    coords = {name: (dim, np.asarray(vals)) for name, (dim, vals) in info["coords"].items()}
    return xr.DataArray(data, dims=info["dims"], coords=coords,
                        attrs={k: v for k, v in info["attrs"].items()
                               if isinstance(v, (str, int, float))})


class ViewsMixin:
    """xarray views (mixed into `store.Store`)."""

    def activations(self, variant, site, tag: str | None = None, *, rows=slice(None),
                    partial: bool = False) -> xr.DataArray:
        """Activations as a DataArray with named dims and coords (prompt text, concept, ...).

        `variant` and `site` may be lists: the arrays are stacked along new dims ``variant`` and
        ``site`` (they must have the same shape). bfloat16 is widened exactly to float32.
        """
        variants = [variant] if isinstance(variant, str) else list(variant)
        sites = [site] if isinstance(site, str) else list(site)
        grid = [[_one_activation(self, v, s, tag, rows, partial) for s in sites] for v in variants]
        shapes = {a.shape for row in grid for a in row}
        if len(shapes) != 1:
            raise StoreError(f"cannot stack activations of different shapes {sorted(shapes)}; "
                             "select one site or variant at a time")
        rows_ = [xr.concat(r, dim=xr.DataArray(sites, dims="site"), coords="minimal",
                           compat="override") if len(r) > 1 else r[0] for r in grid]
        out = (xr.concat(rows_, dim=xr.DataArray(variants, dims="variant"), coords="minimal",
                         compat="override") if len(rows_) > 1 else rows_[0])
        if len(sites) * len(variants) > 1:
            out.attrs = {}
        if isinstance(site, str):
            out = out.assign_coords(site=site)
        if isinstance(variant, str):
            out = out.assign_coords(variant=variant)
        return out

    def deltas_xr(self, site: str, variants=None, *, steps: bool = False,
                  dense: bool = True) -> xr.DataArray:
        """Deltas of one site as a DataArray (variant, out, in), or (variant, step, out, in).

        `variants` defaults to every variant with a delta at `site`. With ``steps=True`` the
        checkpoint steps are stacked (NaN where a variant lacks a step). Low-rank deltas are
        multiplied out; values are float32 (float64 stays float64).
        """
        if variants is None:
            variants = [v for v in self.variants()
                        if site in self.sites(v) or any(site in self.sites(v, s)
                                                        for s in self.steps(v))]
        if not variants:
            raise StoreError(f"no variant has a delta at site {site!r}")

        def dense_np(v, s):
            t = self.read_delta(v, site, s, dense=True)
            return t.float().numpy() if t.dtype != _torch_f64() else t.numpy()

        if not steps:
            arrs = [dense_np(v, None) for v in variants]
            return xr.DataArray(np.stack(arrs), dims=("variant", "out", "in"),
                                coords={"variant": list(variants)}, attrs={"site": site})
        all_steps = sorted({s for v in variants for s in self.steps(v)})
        if not all_steps:
            raise StoreError(f"no checkpoint steps stored for {list(variants)}")
        first = None
        for v in variants:
            for s in all_steps:
                if self.has_delta(v, site, s):
                    first = dense_np(v, s)
                    break
            if first is not None:
                break
        out = np.full((len(variants), len(all_steps), *first.shape), np.nan, first.dtype)
        for i, v in enumerate(variants):
            for j, s in enumerate(all_steps):
                if self.has_delta(v, site, s):
                    out[i, j] = dense_np(v, s)
        return xr.DataArray(out, dims=("variant", "step", "out", "in"),
                            coords={"variant": list(variants), "step": all_steps},
                            attrs={"site": site})

    def metrics(self, *, by_step: bool = False) -> xr.Dataset:
        """Metrics as a Dataset: a variable per metric name plus ``<name>_ci_low/_ci_high``.

        Dims ``variant`` (final metrics only), or ``(variant, step)`` with ``by_step=True``
        (step -1 holds the final value). Missing cells are NaN.
        """
        entries = [e for e in self.metric_entries() if by_step or e["step"] == -1]
        variants = sorted({e["variant"] for e in entries})
        steps = sorted({e["step"] for e in entries})
        names = sorted({e["name"] for e in entries})
        shape = (len(variants), len(steps)) if by_step else (len(variants),)
        dims = ("variant", "step") if by_step else ("variant",)
        data = {f"{n}{suf}": np.full(shape, np.nan) for n in names
                for suf in ("", "_ci_low", "_ci_high")}
        for e in entries:
            idx = (variants.index(e["variant"]),) + ((steps.index(e["step"]),) if by_step else ())
            data[e["name"]][idx] = e["value"]
            data[e["name"] + "_ci_low"][idx] = e["ci_low"]
            data[e["name"] + "_ci_high"][idx] = e["ci_high"]
        coords = {"variant": variants, **({"step": steps} if by_step else {})}
        return xr.Dataset({k: (dims, v) for k, v in data.items()}, coords=coords)

    def array_xr(self, name: str) -> xr.DataArray:
        """A named array as a DataArray with its stored dims (dim_0, dim_1, ... if none)."""
        value = self.read_array(name)
        dims = self.array_attrs(name).get("dims")
        return xr.DataArray(value, dims=dims, name=name)


def _torch_f64():
    import torch
    return torch.float64
