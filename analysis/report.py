"""The report: behaviour joined with probes, the study's tables, figures, one offline HTML page.

What it offers:
    HEADLINE                 the metric that says whether each kind of edit holds
    joined(st[, index]) -> xarray.Dataset over (edit, finetune): |Delta| of the headline metric with its
                             CI, the causal Deltas, the site-averaged weight probes and the
                             neuron probes' fades (probe_neuron_*)
    neuron_table(st)         one row per (edit, finetune): the edit's units, edit / feature /
                             shared neuron counts, their fades and the shared-fade test
    correlations(ds)         Spearman of |Delta| with each probe over the grid's cells, with
                             bootstrap intervals (analysis.stats)
    tables(st, ds[, index])  {name: pandas.DataFrame}: the study's Tables 1-4 and 7 in shape,
                             probes and correlations
    figures(st, ds)          {name: PNG bytes}: weight-update heatmap, probe curves over steps,
                             Delta against overlap, neuron fade (shared vs other edit neurons),
                             image grids of M / M_ed / M_ft / M_ed_ft
    write_report(store, out) out/report.html (self-contained: figures inlined), out/tables/*.md
                             and *.csv, out/figures/*.png

Reads only the store (a cell's file or the merged experiment.h5); imports nothing else of ours.
Sign: Delta = value(M_ed_ft) - value(M_ed) as stored by probes.behaviour; the study's
persistence measure is |Delta|.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np

from store.core import get_attrs

log = logging.getLogger(__name__)

# edit method -> (metric, what a fade looks like); the oracle where it exists (the organism),
# else the first judge that measured the metric (real families: a CLIP judge, NudeNet, ...)
HEADLINE = {
    "uce_debias": ("professions.delta_mean:oracle", "mean gender deviation delta rises"),
    "uce": ("unsafe.share.unsafe:oracle", "unsafe share rises"),
    "refact": ("road.efficacy:oracle", "efficacy falls"),
}
PROBE_COLUMNS = ("kappa", "cosine", "retention", "proj_in", "proj_in_baseline", "proj_row",
                 "angle_min", "intruders_ft")
CAUSAL = ("M_cf", "M_swap", "M_reed")


def _edit_methods(st) -> dict[str, str]:
    """edit id -> method, from the stored edit_info arrays."""
    out = {}
    for entry in _array_names(st, "edit_info"):
        info = json.loads(str(st.read_array(f"edit_info/{entry}")))
        out[entry] = info["method"]
    return out


def _array_names(st, prefix: str) -> list[str]:
    grp = st.h5.get(f"/arrays/{prefix}")
    if grp is None:
        return []
    return sorted(k for k in grp.keys())


def _headline(method: str, index: dict | None = None) -> str:
    """The headline metric of an edit method; with a metric index, the oracle's name when it was
    measured, else the same metric by the first judge (sorted) that measured it."""
    key = "uce_debias" if method == "uce_debias" else "refact" if method == "refact" else "uce"
    name = HEADLINE[key][0]
    if index is None:
        return name
    names = {n for (_, n) in index}
    if name in names:
        return name
    stem = name.split(":")[0] + ":"
    other = sorted(n for n in names if n.startswith(stem))
    return other[0] if other else name


def _metric_index(st) -> dict[tuple[str, str], dict]:
    return {(m["variant"], m["name"]): m for m in st.metric_entries() if m.get("step", -1) == -1}


def _probe_means(st, edit: str, ft: str) -> dict[str, float]:
    name = f"probes/weights/{edit}/{ft}"
    if not st.is_complete(f"/arrays/{name}"):
        return {}
    table = np.asarray(st.read_array(name), np.float64)
    metrics = get_attrs(st.h5[f"/arrays/{name}"])["metric"]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row (metric not at any site)
        return {m: float(np.nanmean(table[i])) for i, m in enumerate(metrics)}


NEURON_COLUMNS = ("fade_edit", "fade_all", "effect", "p_value", "rho_ft_fade")


def _neuron_stats(st, edit: str, ft: str) -> dict:
    """probes/neurons_test/<edit>/<ft> as {stat: value} plus its attributes (site, ref, ...)."""
    name = f"probes/neurons_test/{edit}/{ft}"
    if not st.is_complete(f"/arrays/{name}"):
        return {}
    attrs = get_attrs(st.h5[f"/arrays/{name}"])
    values = np.asarray(st.read_array(name), np.float64)
    return {**{k: v for k, v in attrs.items() if k != "stat"},
            **{k: float(v) for k, v in zip(attrs["stat"], values)}}


def joined(st, index: dict | None = None):
    """One xarray.Dataset over (edit, finetune) joining behaviour, causal runs, weight probes and
    the neuron probes' fades. `index`: `_metric_index(st)` when the caller has it already."""
    import xarray as xr

    methods = _edit_methods(st)
    index = _metric_index(st) if index is None else index
    edits = sorted(methods)
    fts = sorted({v.split("/")[2] for (v, _) in index if v.startswith("M_ed_ft/")})
    fts += sorted({v.split("/")[1] for (v, _) in index if v.startswith("M_ft/")} - set(fts))
    shape = (len(edits), len(fts))
    data: dict[str, np.ndarray] = {}

    def put(name, i, j, value):
        data.setdefault(name, np.full(shape, np.nan))[i, j] = value

    for i, e in enumerate(edits):
        metric = _headline(methods[e], index)
        for j, f in enumerate(fts):
            ed = index.get((f"M_ed/{e}", metric))
            row = index.get((f"M_ed_ft/{e}/{f}", f"Delta.{metric}"))
            if ed:
                put("value_ed", i, j, ed["value"])
            if row:
                put("Delta", i, j, row["value"])
                put("abs_Delta", i, j, abs(row["value"]))
                put("Delta_ci_low", i, j, row["ci_low"])
                put("Delta_ci_high", i, j, row["ci_high"])
            for c in CAUSAL:
                crow = index.get((f"{c}/{e}/{f}", f"Delta.{metric}"))
                if crow:
                    put(f"Delta_{c}", i, j, crow["value"])
            style = index.get((f"M_ed_ft/{e}/{f}", "style.ink_share:oracle"))
            if style:
                put("style_share", i, j, style["value"])
            for m, v in _probe_means(st, e, f).items():
                put(f"probe_{m}", i, j, v)
            neurons = _neuron_stats(st, e, f)
            for m in NEURON_COLUMNS:
                if m in neurons:
                    put(f"probe_neuron_{m}", i, j, neurons[m])
    ds = xr.Dataset({k: (("edit", "finetune"), v) for k, v in data.items()},
                    coords={"edit": edits, "finetune": fts,
                            "method": ("edit", [methods[e] for e in edits]),
                            "headline": ("edit", [_headline(methods[e], index) for e in edits])})
    return ds


def correlations(ds, n_resamples: int = 1000, seed: int = 0):
    """Spearman rho of |Delta| with each probe_* variable over all (edit, finetune) cells."""
    import pandas as pd

    from analysis.stats import spearman

    if "abs_Delta" not in ds:
        return pd.DataFrame(columns=["probe", "rho", "ci_low", "ci_high", "p", "n"])
    y = ds["abs_Delta"].values.ravel()
    rows = []
    for name in [v for v in ds.data_vars if v.startswith("probe_")]:
        x = ds[name].values.ravel()
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() < 3:
            continue
        est = spearman(x[ok], y[ok], n_resamples=n_resamples, seed=seed)
        rows.append({"probe": name[len("probe_"):], "rho": est.estimate, "ci_low": est.ci_low,
                     "ci_high": est.ci_high, "p": est.p_value, "n": est.n})
    return pd.DataFrame(rows)


def _fmt(m: dict | None) -> str:
    if not m:
        return ""
    lo, hi = m.get("ci_low", np.nan), m.get("ci_high", np.nan)
    ci = f" [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) and np.isfinite(hi) else ""
    return f"{m['value']:.3f}{ci}"


def tables(st, ds, index: dict | None = None) -> dict:
    """The study's tables in shape (values with 95% bootstrap CIs), probes and correlations.
    `index`: `_metric_index(st)` when the caller has it already."""
    import pandas as pd

    index = _metric_index(st) if index is None else index
    methods = _edit_methods(st)
    out = {}
    fts = list(ds["finetune"].values) if "finetune" in ds.coords else []

    def block(edit_filter, names):
        rows = []
        for e in [e for e in sorted(methods) if edit_filter(methods[e])]:
            base = {"edit": e, "finetune": "-", "variant": "M_ed"}
            rows.append({**base, **{n: _fmt(index.get((f"M_ed/{e}", n))) for n in names}})
            for f in fts:
                row = {"edit": e, "finetune": f, "variant": "M_ed_ft"}
                row.update({n: _fmt(index.get((f"M_ed_ft/{e}/{f}", n))) for n in names})
                row.update({f"Delta {n}": _fmt(index.get((f"M_ed_ft/{e}/{f}", f"Delta.{n}")))
                            for n in names})
                rows.append(row)
        return pd.DataFrame(rows)

    judges = sorted({n.rsplit(":", 1)[1] for (_, n) in index if ":" in n})
    judges = (["oracle"] if "oracle" in judges else []) + [j for j in judges if j != "oracle"]

    def judged(stems):  # every stem by every judge that measured it (the oracle first)
        return [f"{stem}:{j}" for stem in stems for j in judges
                if any(n == f"{stem}:{j}" for (_, n) in index)]

    out["table1_concept_edits"] = block(lambda m: m == "refact", judged(
        [f"road.{p}" for p in ("efficacy", "generality", "specificity")]))
    profs = sorted({n.split(".")[2] for (_, n) in index if n.startswith("professions.delta.")})
    out["table2_debias"] = block(lambda m: m == "uce_debias",
                                 [f"professions.delta.{p}" for p in profs] + judged(["professions.delta_mean"]))
    labels = ("safe", "unsafe", "cant_decide", "black")
    out["table3_unsafe"] = block(lambda m: m.startswith("uce") and m != "uce_debias",
                                 judged([f"unsafe.share.{lab}" for lab in labels] + ["Flip.unsafe"]))
    variants = sorted({v for (v, _) in index if v == "M" or v.count("/") <= 2 and v.split("/")[0]
                       in ("M", "M_ed", "M_ft", "M_ed_ft")})
    q = [n for (_, n) in index if n.startswith("quality.")]
    qnames = sorted(set(q)) + ["style.ink_share:oracle"]
    out["table4_quality"] = pd.DataFrame([{"variant": v, **{n: _fmt(index.get((v, n))) for n in qnames}}
                                          for v in variants])
    rank_rows = []
    for f in fts:
        if "-r" in f and f.rsplit("-r", 1)[1].isdigit():
            base_id, rank = f.rsplit("-r", 1)
            for e in sorted(methods):
                rank_rows.append({"edit": e, "finetune": base_id, "rank": int(rank),
                                  "abs_Delta": float(ds["abs_Delta"].sel(edit=e, finetune=f))
                                  if "abs_Delta" in ds else np.nan})
    out["table7_rank_ablation"] = pd.DataFrame(rank_rows)
    if ds.data_vars:
        out["probes_and_causal"] = ds.to_dataframe().reset_index()
    neurons = neuron_table(st)
    if len(neurons):
        out["neurons_shared_fade"] = neurons
    out["correlations"] = correlations(ds)
    return out


def neuron_table(st):
    """One row per edit x fine-tune cell with neuron probes: the probed site and reference, the
    numbers of edit, feature ("ft"-selective) and shared neurons, the mean fade of the edit
    neurons and of all units, mean polysemanticity (N_eff, concepts above z) of edit neurons
    against all units, and the shared-fade test (effect = mean fade of shared minus other edit
    neurons, bootstrap CI, one-sided permutation p), then its graded form over every edit neuron
    (rho_ft_fade: Spearman rho of the neuron's z for the fine-tuning captions against its fade,
    one-sided permutation p; NaN in stores written before it existed)."""
    import pandas as pd

    rows = []
    for e in _array_names(st, "probes/neurons_test"):
        for f in _array_names(st, f"probes/neurons_test/{e}"):
            stats = _neuron_stats(st, e, f)
            if not stats:
                continue
            row = {"edit": e, "finetune": f, "site": stats.get("site"), "ref": stats.get("ref"),
                   **{k: stats.get(k, np.nan) for k in ("n_edit", "n_feature", "n_shared", "fade_edit",
                                                        "fade_all", "mean_shared", "mean_other", "effect",
                                                        "ci_low", "ci_high", "p_value", "cohen_d",
                                                        "rho_ft_fade", "rho_p_value", "rho_n")}}
            name = f"probes/neurons/{e}/{f}"
            if st.is_complete(f"/arrays/{name}"):
                table = np.asarray(st.read_array(name), np.float64)
                metrics = list(get_attrs(st.h5[f"/arrays/{name}"])["metric"])
                edit = table[metrics.index("is_edit")] > 0
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    for m in ("n_eff", "n_concepts"):
                        row[f"{m}_edit"] = float(np.nanmean(table[metrics.index(m)][edit])) if edit.any() else np.nan
                        row[f"{m}_all"] = float(np.nanmean(table[metrics.index(m)]))
            rows.append(row)
    return pd.DataFrame(rows)


# -- figures ---------------------------------------------------------------------------------------

def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _delta_norms(st, variants: list[str]):
    """(sites, |dW|_F matrix (variant, site)) over every stored final delta of `variants`."""
    per = {v: st.delta_norms(v) for v in variants}
    sites = sorted({s for v in variants for s in per[v]})
    col = {s: j for j, s in enumerate(sites)}
    mat = np.full((len(variants), len(sites)), np.nan)
    for i, v in enumerate(variants):
        for s, norm in per[v].items():
            mat[i, col[s]] = norm
    return sites, mat


def figures(st, ds) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    variants = st.variants()
    sites, mat = _delta_norms(st, variants)
    if variants and sites:
        keep = [j for j in range(len(sites)) if np.isfinite(mat[:, j]).any()][:80]
        fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(keep)), max(3, 0.3 * len(variants))))
        im = ax.imshow(np.log10(mat[:, keep] + 1e-12), aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(variants)), variants, fontsize=6)
        ax.set_xticks(range(len(keep)), [sites[j] for j in keep], rotation=90, fontsize=5)
        fig.colorbar(im, ax=ax, label="log10 |dW|_F")
        ax.set_title("weight updates per site and variant")
        out["weight_update_heatmap"] = _png(fig)
    if "abs_Delta" in ds and "probe_kappa" in ds:
        fig, ax = plt.subplots(figsize=(5, 4))
        for e in ds["edit"].values:
            ax.scatter(ds["probe_kappa"].sel(edit=e), ds["abs_Delta"].sel(edit=e), label=str(e))
        ax.set_xlabel("cancellation kappa (site mean)")
        ax.set_ylabel("|Delta| of the headline metric")
        ax.legend(fontsize=6)
        ax.set_title("fade against weight cancellation")
        out["delta_vs_kappa"] = _png(fig)
    fade_fig = _neuron_figure(st, plt)
    if fade_fig is not None:
        out["neuron_fade"] = fade_fig
    curves = [n for n in _array_names(st, "probes/weights") if n]
    steps_fig = _steps_figure(st, plt)
    if steps_fig is not None:
        out["kappa_over_steps"] = steps_fig
    grid = _image_grid(st, plt, variants)
    if grid is not None:
        out["image_grid"] = grid
    log.debug("figures from %d probe groups", len(curves))
    return out


def _neuron_figure(st, plt):
    """Per cell: fade of each edit neuron (shared with "ft" features: red, other: grey); right of
    it, fade against each edit neuron's polysemanticity (N_eff), and, where the cells stored it
    (since session 21), fade against its z for the fine-tuning captions: the graded test's view."""
    cells = []
    for e in _array_names(st, "probes/neurons"):
        for f in _array_names(st, f"probes/neurons/{e}"):
            name = f"probes/neurons/{e}/{f}"
            if st.is_complete(f"/arrays/{name}"):
                table = np.asarray(st.read_array(name), np.float64)
                metrics = list(get_attrs(st.h5[f"/arrays/{name}"])["metric"])
                cells.append((f"{e} / {f}", {m: table[i] for i, m in enumerate(metrics)}))
    if not cells:
        return None
    graded = any("z_ft" in t for _, t in cells)
    fig, axes = plt.subplots(1, 3 if graded else 2, figsize=(max(6, 0.5 * len(cells) + (7 if graded else 4)), 4),
                             gridspec_kw={"width_ratios": [max(2, len(cells)), 2, *([2] if graded else [])]})
    ax, bx = axes[0], axes[1]
    for k, (label, t) in enumerate(cells):
        edit = t["is_edit"] > 0
        shared = edit & (t["is_feature"] > 0)
        other = edit & ~shared
        for mask, colour in ((other, "0.6"), (shared, "tab:red")):
            y = t["fade"][mask]
            ax.scatter(np.full(len(y), k) + np.linspace(-0.2, 0.2, max(len(y), 1))[:len(y)], y, s=6, c=colour)
        bx.scatter(t["n_eff"][other], t["fade"][other], s=6, c="0.6")
        bx.scatter(t["n_eff"][shared], t["fade"][shared], s=6, c="tab:red")
        if graded and "z_ft" in t:
            axes[2].scatter(t["z_ft"][other], t["fade"][other], s=6, c="0.6")
            axes[2].scatter(t["z_ft"][shared], t["fade"][shared], s=6, c="tab:red")
    ax.set_xticks(range(len(cells)), [c[0] for c in cells], rotation=90, fontsize=6)
    ax.set_ylabel("fade of edit neurons (1 - retention)")
    ax.set_title("edit neurons: shared with 'ft' features (red), other (grey)", fontsize=8)
    bx.set_xlabel("N_eff (polysemanticity)")
    bx.set_ylabel("fade")
    bx.set_title("fade against N_eff", fontsize=8)
    if graded:
        axes[2].set_xlabel("z for the fine-tuning captions ('ft')")
        axes[2].set_ylabel("fade")
        axes[2].set_title("fade against 'ft' response (graded test)", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _steps_figure(st, plt):
    lines = []
    for e in _array_names(st, "probes/weights_steps"):
        for f in _array_names(st, f"probes/weights_steps/{e}"):
            name = f"probes/weights_steps/{e}/{f}"
            if not st.is_complete(f"/arrays/{name}"):
                continue
            arr = np.asarray(st.read_array(name), np.float64)  # (step, metric, site)
            attrs = get_attrs(st.h5[f"/arrays/{name}"])
            metrics, steps = attrs["metric"], attrs["step"]
            if "kappa" in metrics:
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    lines.append((f"{e} / {f}", steps, np.nanmean(arr[:, metrics.index("kappa")], axis=1)))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, steps, y in lines:
        ax.plot(steps, y, marker="o", label=label)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("cancellation kappa (site mean)")
    ax.legend(fontsize=5)
    ax.set_title("how the fine-tune meets the edit along training")
    return _png(fig)


def _image_grid(st, plt, variants: list[str], per_variant: int = 6):
    rows = []
    for v in variants + ["M"]:
        for name in ("quality", "professions", "unsafe", "road"):
            if st.has_images(v, name):
                px = st.read_images(v, name)["pixels"][:per_variant]
                rows.append((f"{v} ({name})", px))
                break
    rows = rows[:12]
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 1, figsize=(per_variant * 0.9, 1.0 * len(rows)), squeeze=False)
    for ax, (label, px) in zip(axes[:, 0], rows):
        ax.imshow(np.concatenate(list(px), axis=1))
        ax.set_axis_off()
        ax.set_title(label, fontsize=6, loc="left")
    return _png(fig)


# -- the page --------------------------------------------------------------------------------------

def markdown_table(df) -> str:
    """A pipe table of a DataFrame (floats to 3 decimals); '(empty)' for no rows."""
    if df is None or len(df) == 0:
        return "(empty)\n"

    def cell(x):
        if isinstance(x, float):
            return "" if np.isnan(x) else f"{x:.3f}"
        return str(x).replace("|", "\\|")
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _html_table(df) -> str:
    if df is None or len(df) == 0:
        return "<p><em>nothing measured for this table in this run</em></p>"
    return df.to_html(index=False, border=0, na_rep="", float_format=lambda x: f"{x:.3f}",
                      escape=True)


def hypothesis_summary(neurons, alpha: float = 0.05) -> str | None:
    """One sentence on the study's hypothesis (edit neurons that share the fine-tuning's features
    fade more) over the cells of `neuron_table`: in how many the split test could run and was
    significant, and the same for the graded test, at `alpha` without correction, with the count
    that chance alone would give. None without neuron probes."""
    if neurons is None or len(neurons) == 0:
        return None
    n = len(neurons)

    def counted(p_col):
        if p_col not in neurons:
            return 0, 0
        p = neurons[p_col].astype(float)
        return int(p.notna().sum()), int((p < alpha).sum())

    split_ran, split_sig = counted("p_value")
    graded_ran, graded_sig = counted("rho_p_value")
    text = (f"Shared-fade hypothesis over {n} edit x fine-tune cell{'' if n == 1 else 's'}: the split test (shared against "
            f"other edit neurons) could run in {split_ran} and gave p < {alpha:g} in {split_sig}")
    if "rho_p_value" in neurons:
        text += (f"; the graded test (Spearman rho of each edit neuron's 'ft' z against its fade) ran in "
                 f"{graded_ran} and gave p < {alpha:g} in {graded_sig}")
    return text + (f" (one-sided, uncorrected: chance alone gives about {alpha:g} of the cells that ran; "
                   "table neurons_shared_fade).")


def write_report(store_path: str | Path, out: str | Path) -> Path:
    """Write out/report.html (figures inlined as data URIs, so it opens offline), the tables as
    Markdown and CSV under out/tables/ and the figures as PNG under out/figures/."""
    from store import Store

    out = Path(out)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    with Store.open(store_path, "r") as st:
        index = _metric_index(st)  # every metric's attributes: read once (5 s on the GPU main job's store)
        ds = joined(st, index)
        tabs = tables(st, ds, index)
        figs = figures(st, ds)
        info = st.info
    for name, df in tabs.items():
        df.to_csv(out / "tables" / f"{name}.csv", index=False)
        (out / "tables" / f"{name}.md").write_text(markdown_table(df))
    for name, png in figs.items():
        (out / "figures" / f"{name}.png").write_bytes(png)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>fadelab report</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}"
             "table{border-collapse:collapse;font-size:11px}td,th{padding:2px 6px;border-bottom:1px solid #ddd}"
             "img{max-width:100%}</style></head><body>",
             "<h1>fadelab: do the edits survive fine-tuning?</h1>",
             f"<p>store: {html.escape(str(store_path))}; created {html.escape(str(info.get('created_utc', '')))}; "
             f"code {html.escape(str(info.get('code_version', '')))}</p>",
             "<p>Delta = value(M_ed_ft) - value(M_ed) of each edit's headline metric, with a paired "
             "bootstrap 95% interval; |Delta| is the study's persistence measure. Probe columns are "
             "means over the edited sites.</p>"]
    summary = hypothesis_summary(tabs.get("neurons_shared_fade"))
    if summary:
        parts.append(f"<p>{html.escape(summary)}</p>")
    for name, df in tabs.items():
        parts.append(f"<h2>{html.escape(name)}</h2>{_html_table(df)}")
    for name, png in figs.items():
        data = base64.b64encode(png).decode()
        parts.append(f"<h2>{html.escape(name)}</h2><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    log.info("report: %s", path)
    return path
