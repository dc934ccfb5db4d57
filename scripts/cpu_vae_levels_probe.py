"""Do 32x32 latents keep the DreamBooth subjects' patterns that the organism's 16x16 latents lose?

Issue 11's ceiling (docs/organism.md): a round trip through the organism's VAE smears the
subjects' spots, stripes, dots and checks into tints, so no token can make the UNet draw them.
`fadelab organism train --vae-levels 2` builds a VAE with 32x32x4 latents instead of 16x16x4.
Before a GPU retrain, this probe trains both VAEs from scratch on the CPU with the same short
budget on the same renders (looks at p_look 0.5, as the retrain would use), and compares their
round trips (encode mean, decode) of 32 renders per subject with those of fully trained VAE
folders given as references:

    mae            mean |round trip - render| over pixels, in /255
    highpass_rel   mean |HP(round trip) - HP(render)| / mean |HP(render)|, HP(x) = x minus its
                   3x3 box blur: 0 keeps every edge; colour errors along outlines count too
    highpass_corr  correlation of HP(round trip) with HP(render) over pixels and channels: near
                   1 where the edges of patterns and outlines come back, whatever their colour
    pattern_corr   the same inside the object only (pixels off the background colour, eroded by
                   2 pixels so that outlines drop out): mostly the pattern's own edges
    oracle         share of round trips the shipped oracle reads as the subject (it keys on
                   tints as well as patterns, so it is a weak check)

    python scripts/cpu_vae_levels_probe.py --steps 400 --batch 32 --n 6000 --out OUT [--levels 3,2] \
        [REFERENCE_FOLDER ...]

trains OUT-vae3/ and OUT-vae2/ (--levels picks), then measures them and every reference folder
(each holding a vae/; --steps 0 trains nothing, e.g. to measure the folders of an earlier run).

writes OUT.json and OUT.png (per subject: 4 renders, then each VAE's round trips of them).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusers import AutoencoderKL  # noqa: E402
from models.organism import render, world  # noqa: E402
from models.organism.nets import VAE_LEVELS, WEIGHTS_DIR, sizes_for_vae_levels  # noqa: E402
from models.organism.oracle import Oracle  # noqa: E402
from models.organism.train import TrainConfig, _Data, _to_x, train_vae  # noqa: E402


def highpass(x: torch.Tensor) -> torch.Tensor:
    return x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def subject_renders(n: int = 32) -> dict[str, np.ndarray]:
    """uint8 renders (n, 64, 64, 3) of each DreamBooth subject, jitter 0 ... n - 1."""
    return {sub: np.stack([render.render(world.Scene("animal", cls=cls, subject=sub, jitter=j)) for j in range(n)])
            for sub, (cls, *_) in world.SUBJECTS.items()}


def round_trips(vae: AutoencoderKL, imgs: np.ndarray) -> tuple[np.ndarray, dict]:
    """uint8 round trips (encode mean, decode) of `imgs` and the measures of the module docstring
    but the oracle's."""
    with torch.no_grad():
        x = _to_x(torch.from_numpy(imgs))
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        hx, hy = highpass(x), highpass(y)
        corner = x[:, :, :1, :1]  # the background colour of each render
        obj = ((x - corner).abs().amax(1, keepdim=True) > 0.1).float()
        inner = (-F.max_pool2d(-obj, 5, stride=1, padding=2)).bool().expand_as(hx)
        m = {"mae": float((y - x).abs().mean()) * 127.5,
             "highpass_rel": float((hy - hx).abs().mean() / hx.abs().mean()),
             "highpass_corr": float(torch.corrcoef(torch.stack([hx.flatten(), hy.flatten()]))[0, 1]),
             "pattern_corr": float(torch.corrcoef(torch.stack([hx[inner], hy[inner]]))[0, 1])}
    return ((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy(), m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, required=True, help="VAE steps of each level (0: train nothing)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n", type=int, default=6000, help="base renders (and n/5 ink renders)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--levels", default="3,2", help=f"comma-separated, of {sorted(VAE_LEVELS)}")
    p.add_argument("--latent-channels", type=int, default=4, help="latent channels of the VAEs trained here")
    p.add_argument("references", nargs="*", type=Path)
    args = p.parse_args()
    accepted = {str(k): k for k in VAE_LEVELS}
    if bad := [x for x in args.levels.split(",") if x not in accepted]:
        p.error(f"--levels {args.levels}: {bad} unknown; accepted {sorted(VAE_LEVELS)}")
    levels = [accepted[x] for x in args.levels.split(",")]
    if not 1 <= args.latent_channels <= 64:
        p.error(f"--latent-channels {args.latent_channels}: accepted 1 to 64")
    steps, batch, n, out, references = args.steps, args.batch, args.n, args.out, args.references
    lc = args.latent_channels
    torch.set_num_threads(2)
    cfg = TrainConfig(n_base=n, n_ink=max(1, n // 5), vae_steps=steps, vae_batch=batch, workers=2, p_look=0.5)
    data = _Data(cfg)
    vaes: dict[str, AutoencoderKL] = {}
    res: dict = {"steps": steps, "batch": cfg.vae_batch, "n_base": cfg.n_base, "n_ink": cfg.n_ink,
                 "p_look": cfg.p_look, "trained_here": {}, "vaes": {}}
    for level in levels if steps else ():
        ocfg = sizes_for_vae_levels(level, lc)
        folder = out.parent / (f"{out.name}-vae{level}" + ("" if lc == 4 else f"c{lc}"))
        t = time.time()
        train_vae(folder, data, cfg, ocfg, torch.device("cpu"))
        name = (f"{level} levels, {ocfg.latent_size}x{ocfg.latent_size}x{lc} latents, "
                f"{steps} CPU steps of {batch}")
        res["trained_here"][name] = {"seconds": round(time.time() - t, 1), "folder": str(folder)}
        vaes[name] = AutoencoderKL.from_pretrained(folder / "vae").float().eval()
        print(name, res["trained_here"][name], flush=True)
    for ref in references:
        vaes[f"reference {ref}"] = AutoencoderKL.from_pretrained(ref / "vae").float().eval()
    oracle = Oracle.load(WEIGHTS_DIR / "oracle", "cpu")
    rows = []
    for sub, imgs in subject_renders().items():
        row = [np.concatenate(list(imgs[:4]), 1)]
        for name, vae in vaes.items():
            y, m = round_trips(vae, imgs)
            m["oracle"] = float(np.mean([s == sub for s in oracle.read(y)["subject"]]))
            res["vaes"].setdefault(name, {})[sub] = {k: round(v, 3) for k, v in m.items()}
            print(sub, name, res["vaes"][name][sub], flush=True)
            row.append(np.concatenate(list(y[:4]), 1))
        rows.append(np.concatenate(row, 1))
    for name, per in res["vaes"].items():
        per["mean"] = {k: round(float(np.mean([v[k] for s, v in per.items() if s != "mean"])), 3)
                       for k in ("mae", "highpass_rel", "highpass_corr", "pattern_corr", "oracle")}
    Image.fromarray(np.concatenate(rows, 0)).save(out.with_suffix(".png"), optimize=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
