"""Issue 11's ceiling: can any conditioning make the organism's frozen UNet draw a DreamBooth subject?

Textual inversion trains only a placeholder's input embedding, which reaches the UNet through the
frozen text encoder as its 77 output rows. This probe frees those rows themselves: it starts from
the text encoder's output for "a <class>" and optimises the rows chosen by --rows with the
diffusion loss (DDPM noise, the organism's epsilon objective, Adam) on the subject's DreamBooth
images, every weight frozen, then generates from the optimised rows (the organism's sampler and
guidance against the empty prompt) and lets the oracle read the subject. Whatever share this
reaches bounds what textual inversion can reach on that model, up to the optimiser.

    --rows all      every row (the ceiling)
    --rows tokens   <bos> to the caption's <eos> ("a <class>" plus <eos>), the padding rows fixed
    --rows pads     the padding rows after <eos> only (the organism's UNet reads mostly these:
                    docs/organism.md, pad_reliance)
    --rows inputs   not the output rows but every one of the text encoder's 77 input embeddings,
                    passed through the frozen encoder: textual inversion frees a subset of these
                    (its placeholder's rows, shared by every caption), so this bounds it closer
    --rows input_tokens   the input embeddings of <bos> to <eos> only, the padding inputs fixed:
                    the nearest to textual inversion, whose placeholder sits among the tokens

    python scripts/cpu_ti_ceiling_probe.py --steps 600 --n 40 --out OUT [--rows all,tokens,pads]
        [--weights FOLDER] [--subjects dog1,cat1]

writes OUT.json (per subject and row set: the oracle's subject and class shares of n images, the
loss over the first and last 50 steps) and OUT.png (8 images per subject and row set).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.organism import world  # noqa: E402

ROWS = ("all", "tokens", "pads", "inputs", "input_tokens")
#: the contexts write_dreambooth cycles through, so the images are the DreamBooth set's kind
CONTEXTS = ("none", "none", "table", "night", "sea", "painting")


def free_mask(rows: str, n_real: int) -> torch.Tensor:
    """(77, 1) mask of the rows optimised: n_real is the caption's token count with <bos>, <eos>."""
    mask = torch.zeros(77, 1)
    if rows in ("all", "inputs"):
        mask[:] = 1
    elif rows in ("tokens", "input_tokens"):
        mask[:n_real] = 1
    else:
        mask[n_real:] = 1
    return mask


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=5e-2, help="Adam's lr for output rows")
    p.add_argument("--input-lr", type=float, default=2e-3,
                   help="Adam's lr for input embeddings (inputs, input_tokens): theirs are about 0.02 a "
                        "coordinate on the organism, so 5e-2 would move each by more than its size in one step")
    p.add_argument("--images", type=int, default=5, help="training images per subject (DreamBooth's 5)")
    p.add_argument("--n", type=int, default=40, help="images generated per subject and row set")
    p.add_argument("--rows", default="all", help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--subjects", default=",".join(world.SUBJECTS))
    p.add_argument("--weights", default="hub", help="the organism folder (default: the shipped one)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    rows_sets = args.rows.split(",")
    if bad := [r for r in rows_sets if r not in ROWS]:
        p.error(f"--rows {args.rows}: {bad} unknown; accepted {', '.join(ROWS)}")
    subjects = args.subjects.split(",")
    if bad := [s for s in subjects if s not in world.SUBJECTS]:
        p.error(f"--subjects {args.subjects}: {bad} unknown; accepted {', '.join(world.SUBJECTS)}")

    from diffusers import DDPMScheduler

    import models
    from models.organism import render
    from models.organism.nets import WEIGHTS_DIR, oracle_dir, text_core
    from models.organism.oracle import Oracle
    from models.organism.sample import generate

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = models.load("organism", args.weights)
    pipe = model.pipe
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for q in [*unet.parameters(), *vae.parameters(), *te.parameters()]:
        q.requires_grad_(False)
    noise = DDPMScheduler.from_config(pipe.scheduler.config)
    oracle = Oracle.load(oracle_dir(args.weights) or WEIGHTS_DIR / "oracle", "cpu")
    res: dict = {"date": time.strftime("%Y-%m-%d"), "device": "cpu", "weights": args.weights, "steps": args.steps,
                 "lr": args.lr, "input_lr": args.input_lr, "images": args.images, "n": args.n, "subjects": {}}
    figure = []
    for sub in subjects:
        cls = world.SUBJECTS[sub][0]
        scenes = [world.Scene("animal", cls=cls, subject=sub, context=CONTEXTS[i % len(CONTEXTS)], jitter=i)
                  for i in range(args.images)]
        x = torch.from_numpy(np.stack([render.render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            z0 = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
            batch = tok([f"a {cls}"], padding="max_length", max_length=77, return_tensors="pt")
            base = te(batch.input_ids)[0][0]  # (77, width)
        n_real = int(batch.attention_mask.sum())
        for rows in rows_sets:
            t0 = time.time()
            mask = free_mask(rows, n_real)
            handle = None
            if rows.startswith("input"):  # the encoder's input embeddings are free, its output follows
                emb = text_core(te).embeddings.token_embedding
                with torch.no_grad():
                    init = emb(batch.input_ids)[0].clone()
                free = init.clone().requires_grad_(True)
                handle = emb.register_forward_hook(
                    lambda mod, inp, out: (init + mask * (free - init))[None].expand_as(out))
                lr = args.input_lr

                def conditioning():
                    return te(batch.input_ids)[0][0]
            else:
                free = base.clone().requires_grad_(True)
                lr = args.lr

                def conditioning():
                    return base + mask * (free - base)
            opt = torch.optim.Adam([free], lr=lr)
            losses = []
            for _ in range(args.steps):
                cond = conditioning()
                eps = torch.randn_like(z0)
                t = torch.randint(0, noise.config.num_train_timesteps, (len(z0),))
                pred = unet(noise.add_noise(z0, eps, t), t,
                            encoder_hidden_states=cond[None].expand(len(z0), -1, -1)).sample
                loss = torch.nn.functional.mse_loss(pred, eps)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            with torch.no_grad():
                cond = conditioning()[None].expand(args.n, -1, -1).contiguous()
            if handle is not None:  # before generating: the empty prompt's encoding must be the model's
                handle.remove()
            images = generate(pipe, cond, list(range(7000, 7000 + args.n)), progress=False)
            read = oracle.read(images)
            entry = {"subject_share": float(np.mean([s == sub for s in read["subject"]])),
                     "class_share": float(np.mean([c == cls for c in read["cls"]])),
                     "loss_first50": float(np.mean(losses[:50])), "loss_last50": float(np.mean(losses[-50:])),
                     "free_rows": int(mask.sum()), "seconds": round(time.time() - t0, 1)}
            res["subjects"].setdefault(sub, {})[rows] = entry
            print(sub, rows, entry, flush=True)
            figure.append(np.concatenate(list(images[:8]), 1))
    for rows in rows_sets:
        res[f"mean_subject_share_{rows}"] = float(np.mean([res["subjects"][s][rows]["subject_share"]
                                                            for s in subjects]))
    from PIL import Image

    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(figure, 0)).save(args.out.with_suffix(".png"), optimize=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
