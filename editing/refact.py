"""ReFACT (Arad et al., NAACL 2024): a rank-one edit of a text encoder's MLP fc2.

Offers
    refact(model, request, hparams, stats=None) -> EditResult
    request_from_road(row) -> request           a RoAD row ({"Prompt", "New", "Old", ...})
    edit_sites(model, hparams) -> [site]        text.mlp.<L>.fc2 (and text2.mlp.<L2>.fc2 on SDXL)
    default_layer(model, i), default_fact_token(model)    the family defaults
    lookup_index(tokenizer, prompt, subject)    the subject's last token in a prompt

The edit (paper sec. 3, eq. 2; code: src/refact/compute_u.py, compute_v.py, refact_main.py), on
the fc2 weight W (d_out, d_in) at layer L, bias b:

    k*     = fc2's input at the subject's last token of the request's prompt
    k_bar  = the mean fc2 input at the subject's last token over the 9 ReFACT templates
    u      = C^-1 k_bar / |C^-1 k_bar|     C the uncentred second moment of fc2 inputs (refact_stats)
    v*     = W k* + delta                  (v_init + delta, v_init = W k* + b the fc2 output, less b)
    W_new  = W + (v* - W k*) u^T / (u^T k*)

so W_new k* = v* and W changes only along u (dW x = 0 for every x with u^T x = 0). delta is
optimised with the contrastive_text loss: with f(.) the encoder's text features (the organism's
CLIP projection of the pooled output; SDXL's second encoder's text_embeds; otherwise the pooled
output), the prompts P = {bare prompt} + templates with delta added to fc2's output at the
subject's last token, and targets t = [f(new), f(old)] from the unedited encoder,

    loss = -mean_P log softmax_j(-|f(P) - t_j|)[new] + weight_decay |delta| / |v_init|^2,

Adam (lr), at most max_steps steps, stopping once mean_P p(new) > p_threshold, |delta| projected
to at most clamp_norm_factor |v_init| after each step. On SDXL each encoder gets its own edit
(both at or below the layer the UNet reads, hidden_states[-2]).

Option, a departure from ReFACT (hparams loss="target_text"): loss = mean_P |f(P) - f(new)|^2 /
|f(new) - f(old)|^2 + the same weight decay, stopping once mean_P |f(P) - f(new)| / |f(new) - f(old)|
falls below target_tolerance; it pulls f(P) to f(new) itself, where the softmax is satisfied part
of the way (docs/organism.md, v4).

Departure: v_init is taken at the request's own prompt (ReFACT takes it at the first prompt of a
Python set, which is an arbitrary one of the 10); with it v* - W k* = delta exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from models.delta import WeightDelta
from models.errors import FadelabError
from models.sites import resolve

from . import text as T
from .hparams import ReFACTHparams, hparams_dict
from .refact_stats import SecondMoment, load_stats, organism_corpus, second_moment, text_encoder_of
from .result import EditResult

log = logging.getLogger(__name__)

#: The organism's ReFACT layer and fact token, chosen by the sweep in docs/editing.md.
ORGANISM_LAYER = 3
ORGANISM_FACT_TOKEN = "last"


def request_from_road(row: Mapping[str, str]) -> dict:
    """A ReFACT request from a RoAD row: prompt = subject = Prompt, new = New, old = Old
    (clip_edit.py lower-cases every field; the tokenizer lower-cases anyway)."""
    missing = [k for k in ("Prompt", "New", "Old") if not row.get(k)]
    if missing:
        raise FadelabError(f"RoAD row lacks {missing[0]!r}: it needs Prompt, New and Old")
    return {"prompt": row["Prompt"], "subject": row["Prompt"], "new": row["New"], "old": row["Old"]}


def _check_request(model, request: Mapping) -> dict:
    if not isinstance(request, Mapping):
        raise FadelabError(f"a ReFACT request is a dict with prompt, new, old (and subject), got {type(request).__name__}")
    if "Prompt" in request:
        request = request_from_road(request)
    req = {k: request.get(k) for k in ("prompt", "subject", "new", "old")}
    req["subject"] = req["subject"] or req["prompt"]
    for k in ("prompt", "subject", "new", "old"):
        if not isinstance(req[k], str) or not req[k].strip():
            raise FadelabError(f"ReFACT request field {k!r} is {req[k]!r}: give a non-empty text")
        req[k] = req[k].strip()
    T.check_concepts(model, [req["subject"], req["new"], req["old"]], "ReFACT concept")
    if req["subject"].lower() not in req["prompt"].lower():
        raise FadelabError(f"ReFACT subject {req['subject']!r} does not occur in the prompt {req['prompt']!r}")
    return req


def default_layer(model, encoder_index: int = 0) -> int:
    """The edited layer when hparams leave it None: the organism's sweep choice; else 7/12 of the
    encoder's depth (SD1.x: 7, the paper's; SDXL: 7 and 18)."""
    if model.family == "organism" and encoder_index == 0:
        return ORGANISM_LAYER
    n = model.text_encoders[encoder_index].config.num_hidden_layers
    return int(7 * n / 12)


def default_fact_token(model) -> str:
    """The fact token when hparams leave it None: the organism's sweep choice, else the paper's."""
    return ORGANISM_FACT_TOKEN if model.family == "organism" else "subject_last"


def edit_sites(model, h: ReFACTHparams) -> list[str]:
    """text.mlp.<L>.fc2 (and text2.mlp.<L2>.fc2 on SDXL); layers checked against the encoders."""
    kind = T.pipeline_kind(model)
    if kind == "flux":
        raise FadelabError("ReFACT edits the CLIP text encoder of SD1.x, SDXL and the organism; FLUX is not supported")
    layers = [h.layer if h.layer is not None else default_layer(model, 0)]
    if kind == "sdxl":
        layers.append(h.layer_2 if h.layer_2 is not None else default_layer(model, 1))
    elif h.layer_2 is not None:
        raise FadelabError(f"ReFACT layer_2={h.layer_2}: only SDXL has a second text encoder")
    sites = []
    for i, layer in enumerate(layers):
        n = model.text_encoders[i].config.num_hidden_layers
        top = n - 2 if kind == "sdxl" else n - 1  # SDXL's UNet reads hidden_states[-2]
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= top:
            which = "layer" if i == 0 else "layer_2"
            why = " (the UNet reads hidden_states[-2])" if kind == "sdxl" else ""
            raise FadelabError(f"ReFACT {which}={layer!r} is out of range for {model.family}'s text encoder "
                               f"{i + 1}: accepted 0-{top}{why}")
        sites.append(f"{'text' if i == 0 else 'text2'}.mlp.{layer}.fc2")
    return sites


def lookup_index(tok, prompt: str, subject: str, fact_token: str = "subject_last") -> int:
    """Index of the edited token in the tokenised prompt (<bos> at 0). "subject_last": the
    subject's last token, i.e. the number of tokens of the prompt up to the end of its last
    occurrence of the subject (repr_tools.get_words_idxs_in_templates); "last": <eos>."""
    if fact_token == "last":
        return len(tok(prompt)["input_ids"]) - 1
    at = prompt.lower().rfind(subject.lower())
    if at < 0:
        raise FadelabError(f"subject {subject!r} does not occur in {prompt!r}")
    head = prompt[:at + len(subject)]
    return len(tok(head)["input_ids"]) - 2  # drop <eos>; <bos> shifts by one, -1 for the last


class _Features:
    """f(prompts): the encoder's text features, with an optional delta added to fc2's output."""

    def __init__(self, encoder, tok, module, projection: Tensor | None):
        self.encoder, self.tok, self.module, self.projection = encoder, tok, module, projection
        self.device = next(encoder.parameters()).device
        self.delta: Tensor | None = None
        self.lookup: list[int] = []

    def _hook(self, mod, inp, out):
        if self.delta is None:
            return out
        out = out.clone()
        rows = torch.arange(out.shape[0], device=out.device)
        out[rows, torch.as_tensor(self.lookup, device=out.device)] += self.delta.to(out.dtype)
        return out

    def __call__(self, prompts: list[str]) -> Tensor:
        # padded to the longest prompt only: CLIP's text attention is causal, so rows up to <eos>
        # (the lookup tokens and the pooled output) do not depend on padding after it
        ids = self.tok(prompts, padding="longest", max_length=self.tok.model_max_length,
                       truncation=True, return_tensors="pt").input_ids.to(self.device)
        handle = self.module.register_forward_hook(self._hook)
        try:
            out = self.encoder(input_ids=ids)
        finally:
            handle.remove()
        if getattr(out, "text_embeds", None) is not None:
            return out.text_embeds.float()
        pooled = out.pooler_output.float()
        return pooled @ self.projection.T.to(pooled.device) if self.projection is not None else pooled


def _organism_projection(model) -> Tensor | None:
    """The organism CLIP's text projection (clip/model.safetensors), or None when absent."""
    from safetensors import safe_open

    path = Path(str(model.weights)) / "clip" / "model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("text_projection.weight").float()


@torch.no_grad()
def _fc2_io(encoder, tok, module, prompts: list[str], lookup: list[int]) -> tuple[Tensor, Tensor]:
    """fc2's input and output at the lookup tokens: (N, d_in), (N, d_out), float32."""
    got = {}

    def hook(mod, inp, out):
        got["in"], got["out"] = inp[0], out

    ids = tok(prompts, padding="longest", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(next(encoder.parameters()).device)  # causal: see _Features
    handle = module.register_forward_hook(hook)
    try:
        encoder(input_ids=ids)
    finally:
        handle.remove()
    rows = torch.arange(len(prompts))
    idx = torch.as_tensor(lookup)
    return got["in"][rows, idx].float(), got["out"][rows, idx].float()


def _stats_for(model, site: str, stats, h: ReFACTHparams) -> SecondMoment:
    if isinstance(stats, Mapping):
        stats = stats.get(site)
    if isinstance(stats, (str, Path)):
        stats, meta = load_stats(stats)
        if meta.get("site") not in (None, "", site):
            raise FadelabError(f"statistics file is for site {meta['site']!r}, not {site!r}")
    if isinstance(stats, SecondMoment):
        return stats
    if stats is None and model.family == "organism":
        log.info("computing C at %s over %d organism captions", site, h.corpus_size)
        return second_moment(model, site, organism_corpus(h.corpus_size, h.seed))
    raise FadelabError(f"ReFACT on {model.family} needs C, the second moment of {site}'s inputs: pass "
                       f"stats=editing.second_moment(model, {site!r}, texts) or a file from `fadelab edit refact-stats`")


def _optimise(feats: _Features, prompts: list[str], lookup: list[int], targets: Tensor,
              v_init: Tensor, h: ReFACTHparams) -> tuple[Tensor, dict]:
    """delta minimising h.loss (the module doc's contrastive_text, or the target_text departure);
    returns (delta, diagnostics)."""
    delta = torch.zeros_like(v_init, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=h.lr)
    feats.lookup = lookup
    max_norm = h.clamp_norm_factor * v_init.norm()
    p_new, steps, dist = 0.0, 0, float("nan")
    for it in range(h.max_steps):
        feats.delta = delta
        f = feats(prompts)  # (P, D)
        if h.similarity == "l2":
            scores = -torch.cdist(f[None], targets[None])[0]  # (P, 2)
        else:
            scores = torch.nn.functional.normalize(f, dim=-1) @ torch.nn.functional.normalize(targets, dim=-1).T
        logp = scores.log_softmax(-1)[:, 0]
        p_new = float(logp.detach().exp().mean())
        if h.loss == "target_text":
            ratio = (f - targets[0]).norm(dim=-1) / (targets[0] - targets[1]).norm()  # (P,)
            dist = float(ratio.detach().mean())
            done, fit = dist < h.target_tolerance, (ratio ** 2).mean()
        else:
            done, fit = p_new > h.p_threshold, -logp.mean()
        if done or it == h.max_steps - 1:
            break
        loss = fit + h.weight_decay * delta.norm() / v_init.norm() ** 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        with torch.no_grad():
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    feats.delta = None
    diag = {"steps": steps, "p_new": p_new}
    if h.loss == "target_text":
        diag["target_distance"] = dist
    return delta.detach(), diag


def refact(model, request: Mapping, hparams: ReFACTHparams | None = None, stats=None) -> EditResult:
    """Edit `model` so that request["subject"] in its prompt means request["new"], not ["old"].

    Args:
        request: {"prompt", "subject" (default: the prompt), "new", "old"}, or a RoAD row.
        stats: C for each edited site: a SecondMoment, a statistics file, or {site: either};
            None computes it from the organism's captions (organism only).
    Raises FadelabError for an empty or unknown concept, a subject missing from the prompt, a
    layer out of range, a prompt longer than the tokenizer allows, or missing statistics.
    """
    h = hparams or ReFACTHparams()
    req = _check_request(model, request)
    sites = edit_sites(model, h)
    fact_token = h.fact_token or default_fact_token(model)
    prompts = list(dict.fromkeys([req["prompt"]] + [t.format(req["subject"]) for t in h.templates]))
    T.check_lengths(model, prompts + [req["new"], req["old"]])
    deltas, keys, per_site = {}, {}, {}
    for site in sites:
        encoder, tok = text_encoder_of(model, site)
        module = resolve(model, site)
        w = module.weight.detach().float()
        lookup = [lookup_index(tok, p, req["subject"], fact_token) for p in prompts]
        k_in, k_out = _fc2_io(encoder, tok, module, prompts, lookup)
        k_star, v_init = k_in[0], k_out[0]  # the request's own prompt
        templ = [i for i, p in enumerate(prompts) if p != req["prompt"]] or [0]
        k_bar = k_in[templ].mean(0)
        c = _stats_for(model, site, stats, h).moment().to(k_bar.device)
        if c.shape[0] != k_bar.shape[0]:
            raise FadelabError(f"statistics have dimension {c.shape[0]}, {site} takes {k_bar.shape[0]} inputs")
        c_inv_k = torch.linalg.solve(c, k_bar.double())
        u = (c_inv_k / c_inv_k.norm()).float()
        denom = float(u @ k_star)
        if abs(denom) < 1e-8 * float(k_star.norm()):
            raise FadelabError(f"u^T k* is {denom:.3g} at {site}: k* is orthogonal to u; choose another layer")
        projection = _organism_projection(model) if model.family == "organism" else None
        feats = _Features(encoder, tok, module, projection)
        grads = [p.requires_grad for p in encoder.parameters()]
        try:
            for p in encoder.parameters():
                p.requires_grad_(False)
            with torch.no_grad():
                targets = feats([req["new"], req["old"]])  # the unedited encoder
            delta, diag = _optimise(feats, prompts, lookup, targets, v_init, h)
        finally:
            for p, g in zip(encoder.parameters(), grads):
                p.requires_grad_(g)
        v_star = w @ k_star + delta  # weight part: v_init - b + delta
        b_vec = ((v_star - w @ k_star) / denom)[:, None]  # (d_out, 1)
        deltas[site] = (b_vec.cpu(), u[None, :].cpu())  # dW = B A = (v* - W k*) u^T / (u^T k*)
        for name, value in (("k_star", k_star), ("k_bar", k_bar), ("u", u), ("v_star", v_star)):
            keys[f"{name}:{site}"] = value.detach().float().cpu()
        per_site[site] = {**diag, "delta_norm": float(delta.norm()), "v_init_norm": float(v_init.norm()),
                          "u_dot_k_star": denom}
        log.info("ReFACT %s at %s: %d steps, p(new) %.3f", req["prompt"], site, diag["steps"], diag["p_new"])
    prov = {"method": "refact", "hparams": hparams_dict(h), "parent": str(model.weights)}
    info = {"fact_token": fact_token, "steps": max(d["steps"] for d in per_site.values()),
            "p_new": min(d["p_new"] for d in per_site.values()), "per_site": per_site}
    return EditResult(WeightDelta(deltas, prov), keys, "refact", req, h, info)
