"""Benchmark: UCE and ReFACT on SD1.4's architecture (random weights), against a plain loop.

Offers
    sd14_edit_timings(device, scale) -> dict     seconds and peak memory of one UCE edit (1 concept +
                                                 100 preserve prompts) and one ReFACT edit
    uce_reference_loop(model, concepts, preserve, hparams) -> {site: W_new}
                                                 UCE written the way the official code runs it
    bench_rows(device, quick) -> [dict]          rows in fadelab.bench's schema

The baseline for UCE is the official code's structure, written plainly here: every prompt encoded
on its own, and for every site mat1 = lam W + sum v c^T, mat2 = lam I + sum c c^T accumulated
prompt by prompt and W_new = mat1 @ inverse(mat2). fadelab batches the encoding, solves one
system per key space and forms dW = s_e (V* - C_E W^T)^T C_E M^-1 (editing/uce.py). Both results'
largest error against eq. 7 solved in float64 travels in the row. ReFACT has no faster
formulation to compare with: its row reports fadelab's time only. Not a test.
"""

from __future__ import annotations

import logging
import time

import torch

from .hparams import ReFACTHparams, UCEHparams

log = logging.getLogger(__name__)

#: the one ReFACT request every benchmark edits
REFACT_REQUEST = {"prompt": "a painting of a cat", "subject": "a cat", "new": "a dog", "old": "a cat"}


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _measure(out: dict, label: str, device: str, fn):
    """fn() timed between synchronisations into out[label + "_seconds"], with the CUDA peak over the
    call in out[label + "_peak_bytes"]; returns fn's result."""
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t = time.perf_counter()
    result = fn()
    _sync(device)
    out[f"{label}_seconds"] = time.perf_counter() - t
    if cuda:
        out[f"{label}_peak_bytes"] = torch.cuda.max_memory_allocated()
    return result


@torch.no_grad()
def uce_reference_loop(model, concepts, preserve, h: UCEHparams) -> dict[str, torch.Tensor]:
    """W_new per site, computed as the official code does (see the module doc); SD pipelines,
    erasing towards the empty prompt with tail rows."""
    from . import text as T

    def enc(p):
        return T.encode(model, [p])["text"]

    edits = []
    for c in concepts:
        e, g = enc(c), enc("")
        c_e, (c_g,) = T.edit_rows(e, [g], "tail")
        edits.append((c_e, c_g))
    pres = [enc(p).emb[0] for p in ["", *preserve]]
    out = {}
    for site in T.key_spaces(model, h.sites, h.with_to_k)[0].sites:
        w = model.weight(site).detach().float()
        mat1 = h.lam * w
        mat2 = h.lam * torch.eye(w.shape[1], device=w.device)
        for c_e, c_g in edits:
            mat1 = mat1 + h.erase_scale * (c_g @ w.T).T @ c_e
            mat2 = mat2 + h.erase_scale * c_e.T @ c_e
        for c_p in pres:
            mat1 = mat1 + h.preserve_scale * (c_p @ w.T).T @ c_p
            mat2 = mat2 + h.preserve_scale * c_p.T @ c_p
        out[site] = mat1 @ torch.inverse(mat2)
    return out


def _fp64_solution(model, result, h: UCEHparams) -> dict[str, torch.Tensor]:
    """eq. 7 solved in float64 on the CPU from the edit's own keys: the accuracy reference."""
    c_e, c_p = result.keys["c_e"].double(), result.keys["c_p"].double()
    m = h.lam * torch.eye(c_e.shape[1], dtype=torch.float64) + h.erase_scale * c_e.T @ c_e \
        + h.preserve_scale * c_p.T @ c_p
    out = {}
    for site in result.sites():
        w = model.weight(site).detach().double().cpu()
        rhs = h.lam * w + h.erase_scale * result.keys[f"v_star:{site}"].double().T @ c_e \
            + h.preserve_scale * w @ c_p.T @ c_p
        out[site] = torch.linalg.solve(m, rhs.T).T
    return out


def sd14_edit_timings(device: str = "cuda", scale: float = 1.0, reference: bool = True) -> dict:
    """One UCE erase (1 concept, 100 preserve prompts; cold and warm) and one ReFACT edit (layer 7)
    on models.load("sd14", "random"); C's statistic (2,000 texts of 24 random vocabulary words, so
    C has full rank on random weights) is timed apart."""
    import models

    from .presets import organism_safe_prompts
    from .refact import refact
    from .refact import text_encoder_of
    from .refact_stats import second_moment, vocabulary_corpus
    from .uce import uce_erase

    m = models.load("sd14", "random", scale=scale, device=device)
    preserve = organism_safe_prompts(100, seed=11)
    cuda = str(device).startswith("cuda")
    out: dict = {"device": str(device), "scale": scale, "dtype": str(m.dtype), "n_preserve": len(preserve)}
    if cuda:
        out["gpu"] = torch.cuda.get_device_name()
        out["model_memory_bytes"] = torch.cuda.memory_allocated()
    h = UCEHparams()
    concept = "a painting of a cat"
    for label in ("uce_cold", "uce"):
        r = _measure(out, label, device, lambda: uce_erase(m, [concept], h, preserve=preserve))
    out["uce_sites"], out["uce_rows"] = len(r.sites()), [r.info["rows_edited"], r.info["rows_preserved"]]
    if reference:
        _sync(device)
        t = time.perf_counter()
        ref = uce_reference_loop(m, [concept], preserve, h)
        _sync(device)
        out["uce_reference_seconds"] = time.perf_counter() - t
        exact = _fp64_solution(m, r, h)
        out["uce_max_abs_error_fp64"] = max(float((m.weight(s).detach().double().cpu() + r.delta.dense(s).double()
                                                   - exact[s]).abs().max()) for s in ref)
        out["uce_reference_max_abs_error_fp64"] = max(float((ref[s].double().cpu() - exact[s]).abs().max()) for s in ref)
        out["uce_max_abs_weight"] = max(float(exact[s].abs().max()) for s in ref)
    site = "text.mlp.7.fc2"
    t = time.perf_counter()
    stats = second_moment(m, site, vocabulary_corpus(text_encoder_of(m, site)[1], 2000, seed=3))
    _sync(device)
    out["refact_stats_seconds"], out["refact_stats_tokens"] = time.perf_counter() - t, stats.count
    r = _measure(out, "refact", device, lambda: refact(m, REFACT_REQUEST, ReFACTHparams(), stats={site: stats}))
    out["refact_steps"] = r.info["steps"]
    return out


def bench_rows(device: str = "cuda", quick: bool = False) -> list[dict]:
    """fadelab.bench rows: UCE (vs the plain loop) and ReFACT on SD1.4's architecture; quick uses
    width scale 0.125. Rates edit_uce_s and edit_refact_s travel in extra["rates"]."""
    import platform

    scale = 0.125 if quick else 1.0
    t = sd14_edit_timings(device, scale)
    name = t.get("gpu") or f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    date = time.strftime("%Y-%m-%d")
    rates = {"edit_uce_s": t["uce_seconds"], "edit_refact_s": t["refact_seconds"]}
    width = "" if scale == 1 else f" (width x{scale:g})"
    return [
        {"benchmark": f"UCE erase on SD1.4{width}: 1 concept + 100 preserve prompts, 32 sites",
         "device": name, "date": date, "fadelab": t["uce_seconds"], "baseline": t["uce_reference_seconds"],
         "unit": "s", "ratio": t["uce_reference_seconds"] / t["uce_seconds"],
         "notes": (f"baseline: the official code's per-site mat1 @ inverse(mat2) with prompts encoded one by one; "
                   f"max |W - W_fp64| fadelab {t['uce_max_abs_error_fp64']:.2g}, baseline "
                   f"{t['uce_reference_max_abs_error_fp64']:.2g} (weights up to {t['uce_max_abs_weight']:.2g}); "
                   f"cold call {t['uce_cold_seconds']:.2f} s"),
         "peak_mem": t.get("uce_peak_bytes"), "extra": {"rates": rates, "timings": t}},
        {"benchmark": f"ReFACT edit on SD1.4{width}: text.mlp.7.fc2, up to 100 Adam steps",
         "device": name, "date": date, "fadelab": t["refact_seconds"], "baseline": None, "unit": "s",
         "ratio": None, "notes": (f"{t['refact_steps']} steps (random weights never reach p(new) 0.99); C over "
                                  f"{t['refact_stats_tokens']} tokens took {t['refact_stats_seconds']:.2f} s apart"),
         "peak_mem": t.get("refact_peak_bytes"), "extra": {"rates": rates}},
    ]


def family_edit_timings(model, n_preserve: int = 100, corpus: int = 2000) -> dict:
    """One UCE erase (1 concept + `n_preserve` preserve prompts; cold and warm) on any family's
    `model`, and on SDXL one ReFACT edit at the default layers of both encoders (C of each site over
    `corpus` random-vocabulary texts, timed apart). Seconds and CUDA peak memory (issue 8)."""
    from . import text as T
    from .presets import organism_safe_prompts
    from .refact import edit_sites, refact, text_encoder_of
    from .refact_stats import second_moment, vocabulary_corpus
    from .uce import uce_erase

    device = str(model.device)
    preserve = organism_safe_prompts(n_preserve, seed=11)
    out: dict = {"family": model.family, "dtype": str(model.dtype).replace("torch.", ""), "n_preserve": n_preserve}
    for label in ("uce_cold", "uce"):
        r = _measure(out, label, device, lambda: uce_erase(model, ["a painting of a cat"], UCEHparams(),
                                                           preserve=preserve))
    out["uce_sites"] = len(r.sites())
    if T.pipeline_kind(model) != "sdxl":
        return out
    h = ReFACTHparams()
    sites = edit_sites(model, h)
    t = time.perf_counter()
    stats = {s: second_moment(model, s, vocabulary_corpus(text_encoder_of(model, s)[1], corpus, seed=3))
             for s in sites}
    _sync(device)
    out["refact_stats_seconds"] = time.perf_counter() - t
    r = _measure(out, "refact", device, lambda: refact(model, REFACT_REQUEST, h, stats=stats))
    out["refact_steps"], out["refact_sites"] = r.info["steps"], sites
    return out
