"""Sites: family-independent names for the places edits, recorders and probes touch.

A site name maps to a `named_modules()` path of one pipeline component, written
"component.module.path". The table is built by walking the modules, so it holds at any width
or depth (the organism, a width-scaled random SDXL, the real FLUX). The paths below are those of
transformers 4.x; transformers 5 drops the `text_model.` level from CLIPTextModel (not from
CLIPTextModelWithProjection), and the walk accepts both.

| site                                   | component.module path                                               |
| -------------------------------------- | ------------------------------------------------------------------- |
| text.embed.token                       | text_encoder.text_model.embeddings.token_embedding                  |
| text.mlp.{l}.fc1, fc2                  | text_encoder.text_model.encoder.layers.{l}.mlp.fc1, fc2             |
| text.attn.{l}.q, k, v, out             | text_encoder.text_model.encoder.layers.{l}.self_attn.q_proj, ...    |
| text2.*  (SDXL: a second CLIP tower)   | text_encoder_2.<same paths as text.*>                               |
| text2.embed.token (FLUX: T5)           | text_encoder_2.shared                                               |
| text2.mlp.{l}.wi0, wi1, wo (T5)        | text_encoder_2.encoder.block.{l}.layer.1.DenseReluDense.wi_0, ...   |
| text2.attn.{l}.q, k, v, o (T5)         | text_encoder_2.encoder.block.{l}.layer.0.SelfAttention.q, ...       |
| unet.xattn.{i}.to_q, to_k, to_v, to_out| unet.<i-th module named *.attn2>.to_q, ..., to_out.0                |
| unet.sattn.{i}.to_q, ...               | unet.<i-th module named *.attn1>.to_q, ...                          |
| flux.context_embedder                  | transformer.context_embedder                                        |
| flux.text_embedder                     | transformer.time_text_embed.text_embedder.linear_1                  |
| dit.attn.{i}.to_q, to_k, to_v,         | transformer.<i-th module named *.attn>.to_q, ...                    |
|   add_q_proj, add_k_proj, add_v_proj,  |   (double blocks first, then single blocks; single blocks have      |
|   to_out, to_add_out                   |   no add_* and no to_out)                                           |

Indices i count modules in `named_modules()` order. For a UNet2DConditionModel that order is
down blocks, then up blocks, then the mid block (the order the blocks are registered), so on
SD1.4 unet.xattn.0-5 are down, 6-14 up and 15 the mid block.

Besides the table, a raw "component.module.path" (or, for a bare nn.Module, a plain
`named_modules()` path) is accepted as its own site, for places the table does not name.

Offers: site_map, resolve, resolve_many, sites_matching.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Any

from torch import nn

from models.errors import FadelabError

# component name -> site prefix for text encoders
_TEXT_PREFIX = {"text_encoder": "text", "text_encoder_2": "text2", "text_encoder_3": "text3"}

# (pattern on the component's module path, site suffix template); groups fill the template
_TEXT_RULES: list[tuple[re.Pattern, str]] = [
    # CLIP text tower (CLIPTextModel, CLIPTextModelWithProjection)
    # (transformers >= 5 builds CLIPTextModel without the `text_model.` level; the WithProjection
    # variant keeps it)
    (re.compile(r"(?:text_model\.)?embeddings\.token_embedding"), "embed.token"),
    (re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)"), "mlp.{0}.{1}"),
    (re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj"), "attn.{0}.{1}"),
    # T5 encoder (T5EncoderModel); `encoder.embed_tokens` is `shared`, listed once by named_modules
    (re.compile(r"shared"), "embed.token"),
    (re.compile(r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.(q|k|v|o)"), "attn.{0}.{1}"),
    (re.compile(r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(wi_0|wi_1|wi|wo)"), "mlp.{0}.{1}"),
]

_UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_DIT_PROJ = {
    "to_q": "to_q",
    "to_k": "to_k",
    "to_v": "to_v",
    "add_q_proj": "add_q_proj",
    "add_k_proj": "add_k_proj",
    "add_v_proj": "add_v_proj",
    "to_out": "to_out.0",
    "to_add_out": "to_add_out",
}
_FLUX_NAMED = {
    "flux.context_embedder": "context_embedder",
    "flux.text_embedder": "time_text_embed.text_embedder.linear_1",
}


def _text_sites(prefix: str, component: str, module: nn.Module) -> dict[str, str]:
    out = {}
    for path, _ in module.named_modules():
        for pattern, template in _TEXT_RULES:
            m = pattern.fullmatch(path)
            if m:
                groups = [g.replace("_", "") for g in m.groups()]  # wi_0 -> wi0
                out[f"{prefix}.{template.format(*groups)}"] = f"{component}.{path}"
                break
    return out


def _attention_sites(
    prefix: str, component: str, module: nn.Module, suffix: str, proj: dict[str, str]
) -> dict[str, str]:
    """Sites for every module whose path ends in `.{suffix}`, numbered in named_modules order."""
    out: dict[str, str] = {}
    i = 0
    for path, attn in module.named_modules():
        if not path.endswith("." + suffix) or not hasattr(attn, "to_q"):
            continue
        for name, sub in proj.items():
            try:
                attn.get_submodule(sub)
            except AttributeError:
                continue
            out[f"{prefix}.{i}.{name}"] = f"{component}.{path}.{sub}"
        i += 1
    return out


def _pipeline_sites(components: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for component, module in components.items():
        if not isinstance(module, nn.Module):
            continue
        if component in _TEXT_PREFIX:
            out.update(_text_sites(_TEXT_PREFIX[component], component, module))
        elif component == "unet":
            out.update(_attention_sites("unet.xattn", component, module, "attn2", _UNET_PROJ))
            out.update(_attention_sites("unet.sattn", component, module, "attn1", _UNET_PROJ))
        elif component == "transformer":
            for site, path in _FLUX_NAMED.items():
                try:
                    module.get_submodule(path)
                except AttributeError:
                    continue
                out[site] = f"{component}.{path}"
            out.update(_attention_sites("dit.attn", component, module, "attn", _DIT_PROJ))
    return out


def _components(obj: Any) -> dict[str, Any] | None:
    """The named components of a Model or pipeline; None for a bare nn.Module."""
    pipe = getattr(obj, "pipe", obj)
    components = getattr(pipe, "components", None)
    if isinstance(components, dict):
        return components
    if isinstance(obj, nn.Module):
        return None
    raise FadelabError(
        f"cannot find sites on a {type(obj).__name__}: pass a models.Model, a diffusers pipeline or an nn.Module"
    )


def _module_paths(obj: Any, weighted: bool) -> list[str]:
    """A bare module's `named_modules()` paths (only those with a weight when `weighted`)."""
    if not isinstance(obj, nn.Module):
        return []
    return [p for p, m in obj.named_modules() if p and (not weighted or hasattr(m, "weight"))]


def site_map(obj: Any) -> dict[str, str]:
    """Site name -> "component.module.path" for a Model or a diffusers pipeline.

    A `models.Model` answers with its own `sites` table; a pipeline is walked afresh. A bare
    nn.Module has no table (its sites are its `named_modules()` paths): the answer is {}.
    """
    sites = getattr(obj, "sites", None)
    if isinstance(sites, dict) and hasattr(obj, "pipe"):
        return sites
    components = _components(obj)
    return {} if components is None else _pipeline_sites(components)


def _raw(obj: Any, path: str) -> nn.Module | None:
    """The module at a raw path ("component.module.path", or a bare module's own path)."""
    components = _components(obj)
    try:
        if components is None:
            return obj.get_submodule(path)
        component, _, rest = path.partition(".")
        module = components.get(component)
        if not isinstance(module, nn.Module):
            return None
        return module.get_submodule(rest) if rest else module
    except AttributeError:
        return None


def resolve(obj: Any, site: str) -> nn.Module:
    """The nn.Module a site names: through the site table, else as a raw module path.

    Raises FadelabError naming the site and a few valid ones when it names nothing.
    """
    return resolve_many(obj, [site])[site]


def resolve_many(obj: Any, sites: list[str]) -> dict[str, nn.Module]:
    """`resolve` for several sites, walking the modules once."""
    table = site_map(obj)
    out = {}
    for site in sites:
        path = table.get(site)
        module = _raw(obj, path) if path is not None else None
        module = module if module is not None else _raw(obj, site)
        if module is None:
            known = list(table) or _module_paths(obj, weighted=False)
            close = difflib.get_close_matches(site, known, n=3, cutoff=0.6) or known[:3]
            raise FadelabError(
                f"unknown site {site!r}: valid sites include {', '.join(close)} ({len(known)} in all; "
                "see models.site_map)"
            )
        out[site] = module
    return out


def sites_matching(obj: Any, pattern: str) -> list[str]:
    """Site names matching a shell-style glob, e.g. "unet.xattn.*.to_k", in table order.

    For a bare nn.Module the glob runs over its `named_modules()` paths that carry a weight.
    Raises FadelabError when nothing matches.
    """
    table = site_map(obj)
    names = list(table) or _module_paths(obj, weighted=True)
    hits = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
    if not hits:
        raise FadelabError(
            f"no site matches {pattern!r}; sites look like {', '.join(names[:3]) or '(none)'}"
        )
    return hits
