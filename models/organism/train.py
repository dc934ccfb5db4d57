"""Training the organism, stage by stage: data, VAE, CLIP, oracle, UNet, card.

What it offers:
    TrainConfig                 every knob, documented (a frozen dataclass; seeded)
    train(out, cfg, stages)     runs the stages in order and writes a StableDiffusionPipeline folder

Stages and what each writes under `out` (a stage whose output exists is skipped, so an
interrupted run resumes at the first missing stage):
    vae     vae/            AutoencoderKL, 64 px <-> 16x16x4, L1 + MSE + 1e-6 KL, base and ink style
    clip    text_encoder/, clip/, tokenizer/
                            CLIPModel trained contrastively (multi-positive InfoNCE: images that
                            share a caption are all positives) on renders of both styles
    oracle  oracle/         OracleNet on fresh renders of both styles, half of them passed through
                            the trained VAE, all augmented (oracle.augment)
    unet    unet/, scheduler/, model_index.json
                            UNet2DConditionModel on VAE latents of base-style renders only, the text
                            encoder frozen, epsilon objective with min-SNR-5 weighting, 10% caption
                            dropout, EMA of the weights (the EMA is what is saved)
    card    card.json, organism.json
                            the acceptance card measured live (models/organism/card.py) and the
                            sampling defaults it selected

The fine-tuning style ("ink") and the DreamBooth subjects never enter the UNet's data, so
fine-tuning is what brings them in.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..build import cast
from ..errors import FadelabError
from . import oracle as oracle_mod
from . import render, world
from .nets import (TOKENIZER_DIR, OrganismConfig, build_scheduler, build_text_model, build_unet, build_vae, save_clip,
                   text_core,
                   tokenizer)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Knobs of `fadelab organism train`.

    Attributes:
        seed: seeds scene sampling, captions, initialisation and noise.
        n_base: base-style training scenes (rendered once, reused every epoch).
        n_ink: fine-tuning-style scenes mixed into VAE, CLIP and oracle training only.
        n_oracle: fresh scenes per style for the oracle (subjects included).
        vae_steps, vae_batch, vae_lr: AutoencoderKL training.
        clip_steps, clip_batch, clip_lr: contrastive CLIP training.
        oracle_steps, oracle_batch, oracle_lr: oracle training.
        unet_steps: UNet optimisation steps; None trains for `unet_minutes` of wall time instead
            (the steps done are recorded in organism.json, so a rerun can fix them).
        unet_minutes: the UNet's time budget when unet_steps is None.
        unet_init: a trained UNet to start the UNet stage from (a pipeline folder or its unet/),
            instead of random weights; the EMA starts from it too and the learning-rate schedule
            (warm-up, cosine) restarts. A device call lasts at most 10 minutes, so a UNet that
            needs longer trains as a chain of such warm restarts; organism.json lists each run
            under "unet_runs".
        unet_batch, unet_lr: UNet training; lr follows a warm-up then cosine decay to 10%.
        ema_decay: EMA of the UNet weights.
        cond_dropout: share of captions replaced by "" (for classifier-free guidance).
        card_n: images per line of the acceptance card.
        workers: rendering processes.
        p_look: share of generic class instances (dog, cat, cup, robot) drawn with a named look
            (world.sample_look: a colour and a pattern, said in the caption), in every stage's
            data. 0 (the shipped organism) keeps the base data as it was; > 0 gives an organism
            whose UNet can draw colours and patterns on any class, so a DreamBooth subject (an
            unseen combination) is within reach of textual inversion (issue 11).
        pad_noise: share of UNet training samples whose text rows after <eos> (the padding rows)
            are replaced, half of the time by the empty prompt's rows there ("clean pads"), half
            by another caption's rows there. SD1.x's UNet largely ignores the padding rows of its
            frozen CLIP (Toker et al., NAACL 2025); the shipped organism's reads its prompts from
            them (card.pad_reliance: the pads decide 0.81 of images), so an edit at a subject's
            token (ReFACT) cannot reach its images. 0 (shipped) leaves the UNet's data as it was.
        unet_compile: run the UNet's training forward through torch.compile (the saved weights
            are the same module's).
        clip_attn_drop: stochastic depth on the CLIP text tower's self-attention while it trains:
            each layer's attention output is dropped for a share of the samples (and the kept
            ones scaled by 1 / (1 - share)), so <eos> cannot gather the subject in one layer and
            ignore it after; one share, or one per layer. The shipped CLIP (0) gathers it at layer
            0, which leaves ReFACT's edit at the subject's token, a later layer's MLP, nothing to
            move (docs/editing.md).
    """

    seed: int = 0
    n_base: int = 160_000
    n_ink: int = 32_000
    n_oracle: int = 60_000
    vae_steps: int = 2500
    vae_batch: int = 256
    vae_lr: float = 1e-3
    clip_steps: int = 2500
    clip_batch: int = 1024
    clip_lr: float = 5e-4
    oracle_steps: int = 2500
    oracle_batch: int = 512
    oracle_lr: float = 2e-3
    unet_steps: int | None = None
    unet_minutes: float = 7.0
    unet_init: str | None = None
    unet_batch: int = 1024
    unet_lr: float = 6e-4
    ema_decay: float = 0.9995
    cond_dropout: float = 0.1
    card_n: int = 200
    workers: int = 8
    p_look: float = 0.0
    pad_noise: float = 0.0
    unet_compile: bool = False
    clip_attn_drop: float | tuple[float, ...] = 0.0


STAGES = ("vae", "clip", "oracle", "unet", "card")


def _lr(step: int, total: float, base: float, warmup: int = 200) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1.0, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


class _Data:
    """Rendered scenes, images and captions, built once per run (deterministic given the seed)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self._cache: dict[str, tuple] = {}

    def get(self, name: str):
        if name not in self._cache:
            cfg = self.cfg
            look = cfg.p_look
            spec = {"base": (cfg.n_base, world.WorldMix(p_look=look), 1),
                    "ink": (cfg.n_ink, world.WorldMix(style="ink", p_look=look), 2),
                    "oracle_base": (cfg.n_oracle, world.WorldMix(subjects=True, p_blood=0.2, p_nude=0.15,
                                                                 p_look=look), 3),
                    "oracle_ink": (cfg.n_oracle, world.WorldMix(style="ink", subjects=True, p_blood=0.2,
                                                                p_nude=0.15, p_look=look), 4)}[name]
            n, mix, salt = spec
            rng = np.random.default_rng([cfg.seed, salt])
            scenes = [world.sample_scene(rng, mix) for _ in range(n)]
            captions = [world.caption(s, rng) for s in scenes]
            t = time.time()
            images = render.render_batch(scenes, workers=cfg.workers)
            log.info("rendered %d %s scenes in %.1fs", n, name, time.time() - t)
            self._cache[name] = (scenes, captions, images)
        return self._cache[name]


def _to_x(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) on the device -> float (N, 3, H, W) in [-1, 1]."""
    return images_u8.permute(0, 3, 1, 2).float() / 127.5 - 1


def _copy_tokenizer(out: Path) -> None:
    """Put the shipped CLIP BPE files (vocab.json, merges.txt, config) in out/tokenizer/.

    Copied, never re-saved: a tokenizer's save_pretrained writes only what its backend keeps,
    which differs across transformers versions.
    """
    dst = out / "tokenizer"
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").unlink(missing_ok=True)
    if dst.resolve() == TOKENIZER_DIR.resolve():
        return
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER_DIR / name, dst / name)
    if len(tokenizer(dst)("an apple").input_ids) != 4:
        raise RuntimeError(f"the tokenizer copied to {dst} does not tokenize 'an apple' as CLIP does")


def _save_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str))


# ---------------------------------------------------------------------------------------------


def train_vae(out: Path, data: _Data, cfg: TrainConfig, ocfg: OrganismConfig, device) -> None:
    torch.manual_seed(cfg.seed)
    vae = build_vae(ocfg).to(device).train()
    imgs = torch.from_numpy(np.concatenate([data.get("base")[2][:60_000], data.get("ink")[2]])).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    g = torch.Generator(device).manual_seed(cfg.seed)
    for step in tqdm(range(cfg.vae_steps), desc="vae", mininterval=5):
        idx = torch.randint(len(imgs), (cfg.vae_batch,), generator=g, device=device)
        x = _to_x(imgs[idx])
        for grp in opt.param_groups:
            grp["lr"] = _lr(step, cfg.vae_steps, cfg.vae_lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample(generator=g)).sample
        rec = rec.float()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0:
            log.info("vae step %d loss %.4f", step, loss.item())
    vae.eval()
    with torch.no_grad():  # scaling factor: unit variance latents, as SD's 0.18215 does
        x = _to_x(imgs[:4096])
        z = torch.cat([vae.encode(x[i:i + 512]).latent_dist.mean for i in range(0, len(x), 512)])
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
        rec = torch.cat([vae.decode(z[i:i + 512]).sample for i in range(0, len(z), 512)])
        err = (rec.clamp(-1, 1) - x).abs().mean().item() * 127.5
    log.info("vae: scaling_factor %.4f, mean abs reconstruction error %.2f / 255",
             vae.config.scaling_factor, err)
    vae.to(torch.float16).save_pretrained(out / "vae")
    _save_json(out / "vae" / "train.json", {"mean_abs_error_255": err, "steps": cfg.vae_steps})


def attention_drop(text_model, p, generator: torch.Generator) -> list:
    """Stochastic depth on each self-attention of a CLIP text tower while it is in train mode.

    p: one share for every layer, or one per layer (e.g. (0.8, 0.8, 0.8, 0, 0, 0): <eos> must
    gather the subject in layer 3 or later for half of the samples). Every forward, each layer's
    attention output is zeroed for a share p of the batch's samples and the rest scaled by
    1 / (1 - p) (so eval, which drops nothing, sees the same expectation). Returns the hook
    handles; a share of 0 registers none.
    """
    layers = list(text_model.encoder.layers)
    shares = [float(p)] * len(layers) if isinstance(p, (int, float)) else [float(x) for x in p]
    if len(shares) != len(layers) or not all(0 <= x < 1 for x in shares):
        raise FadelabError(f"clip_attn_drop={p!r}: give a share in [0, 1), or one per layer "
                           f"({len(layers)} layers)")

    def hook_for(share: float):
        def hook(mod, inp, out):
            if not mod.training:
                return out
            x = out[0]
            keep = torch.rand(x.shape[0], 1, 1, device=x.device, generator=generator) >= share
            return (x * keep.to(x.dtype) / (1 - share),) + tuple(out[1:])
        return hook

    return [layer.self_attn.register_forward_hook(hook_for(x)) for layer, x in zip(layers, shares) if x > 0]


def train_clip(out: Path, data: _Data, cfg: TrainConfig, ocfg: OrganismConfig, device) -> None:
    torch.manual_seed(cfg.seed)
    tok = tokenizer()
    base, ink = data.get("base"), data.get("ink")
    captions = base[1] + ink[1]
    uniq, inv = np.unique(np.asarray(captions), return_inverse=True)
    # padded to the longest caption, not 77: the text attention is causal, so <eos> and the pooled
    # output (all the loss reads) do not depend on the padding after it
    ids = torch.tensor(tok(list(uniq), padding="longest", max_length=77, truncation=True).input_ids)
    ids, cap_id = ids.to(device), torch.from_numpy(inv).to(device)
    imgs = torch.from_numpy(np.concatenate([base[2], ink[2]])).to(device)
    model = build_text_model(ocfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.1)
    g = torch.Generator(device).manual_seed(cfg.seed + 1)
    attention_drop(model.text_model, cfg.clip_attn_drop, torch.Generator(device).manual_seed(cfg.seed + 2))
    for step in tqdm(range(cfg.clip_steps), desc="clip", mininterval=5):
        idx = torch.randint(len(imgs), (cfg.clip_batch,), generator=g, device=device)
        x = oracle_mod.augment(_to_x(imgs[idx]), g) if step % 2 else _to_x(imgs[idx])
        c = cap_id[idx]
        for grp in opt.param_groups:
            grp["lr"] = _lr(step, cfg.clip_steps, cfg.clip_lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            o = model(input_ids=ids[c], pixel_values=x)
        logits = o.logits_per_image.float()  # (B, B): image i against caption of sample j
        pos = (c[:, None] == c[None, :]).float()
        tgt = pos / pos.sum(1, keepdim=True)
        loss = 0.5 * (-(tgt * logits.log_softmax(1)).sum(1).mean()
                      - (tgt * logits.t().log_softmax(1)).sum(1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 500 == 0:
            log.info("clip step %d loss %.4f", step, loss.item())
    model.eval()
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(model.config.text_config)
    text_core(text_encoder).load_state_dict(model.text_model.state_dict())
    text_encoder.to(torch.float16).save_pretrained(out / "text_encoder")
    _copy_tokenizer(out)
    save_clip(model, out, ocfg)


def train_oracle(out: Path, data: _Data, cfg: TrainConfig, ocfg: OrganismConfig, device) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float32).to(device).eval()
    sb, _, ib = data.get("oracle_base")
    si, _, ii = data.get("oracle_ink")
    scenes = sb + si
    imgs = torch.from_numpy(np.concatenate([ib, ii])).to(device)
    tg = {h: v.to(device) for h, v in oracle_mod.targets(scenes).items()}
    width = 48
    net = oracle_mod.OracleNet(width).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.oracle_lr, weight_decay=0.01)
    g = torch.Generator(device).manual_seed(cfg.seed + 2)
    for step in tqdm(range(cfg.oracle_steps), desc="oracle", mininterval=5):
        idx = torch.randint(len(imgs), (cfg.oracle_batch,), generator=g, device=device)
        x = _to_x(imgs[idx])
        half = cfg.oracle_batch // 2
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            z = vae.encode(x[:half]).latent_dist.sample(generator=g)
            x = torch.cat([vae.decode(z).sample.float().clamp(-1, 1), x[half:]])
        x = oracle_mod.augment(x, g)
        for grp in opt.param_groups:
            grp["lr"] = _lr(step, cfg.oracle_steps, cfg.oracle_lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = net(x)
        loss = sum(F.cross_entropy(logits[h].float(), tg[h][idx]) for h in oracle_mod.HEAD_NAMES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0:
            log.info("oracle step %d loss %.4f", step, loss.item())
    oracle_mod.Oracle.save(net.eval(), out / "oracle", width)


def noisy_pads(emb: torch.Tensor, cid: torch.Tensor, is_pad: torch.Tensor, empty: int, p: float,
               g: torch.Generator) -> torch.Tensor:
    """The UNet's conditioning emb[cid] (B, 77, width), with the padding rows (is_pad[cid]) of a
    share p of the samples replaced: half of those by the empty caption's rows there, half by a
    random caption's (TrainConfig.pad_noise). p = 0 draws nothing from g."""
    cond = emb[cid]
    if p <= 0:
        return cond
    r = torch.rand(len(cid), generator=g, device=cid.device)
    other = torch.randint(len(emb), (len(cid),), generator=g, device=cid.device)
    src = torch.where(r < p / 2, torch.full_like(cid, empty), other)
    swap = (is_pad[cid] & (r < p)[:, None])[..., None]
    return torch.where(swap, emb[src], cond)


def cuda_settings(device: torch.device) -> None:
    """On CUDA, TF32 for matmuls and convolutions: what every training stage runs with (train sets
    it; the step-speed probe too, so it times the same step)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def unet_step(unet, opt, ema: list, z0: torch.Tensor, cond: torch.Tensor, alphas: torch.Tensor,
              g: torch.Generator, lr: float, ema_d: float) -> torch.Tensor:
    """One UNet training step on clean latents z0 (B, 4, h, w) and conditioning rows cond: noise and
    timesteps drawn from g, epsilon objective with min-SNR-5 weights, bf16 autocast on CUDA,
    gradients clipped at 1.0, AdamW at lr, then the fp32 EMA copies `ema` lerped by 1 - ema_d.
    Returns the loss as a tensor (no device sync). train_unet and the step-speed probe
    (scripts/device_unet_speed_probe.py) both run it."""
    device = z0.device
    noise = torch.randn(z0.shape, generator=g, device=device)
    t = torch.randint(0, 1000, (len(z0),), generator=g, device=device)
    a = alphas[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
    snr = alphas[t] / (1 - alphas[t])
    w = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr  # min-SNR-5 for epsilon targets
    for grp in opt.param_groups:
        grp["lr"] = lr
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        pred = unet(zt.contiguous(memory_format=torch.channels_last), t, cond.float()).sample
    loss = (w * ((pred.float() - noise) ** 2).mean((1, 2, 3))).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = opt.param_groups[0]["params"]  # unet's, in order: the order of `ema`
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    with torch.no_grad():
        torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - ema_d)
    return loss.detach()


def _unet_init_source(folder: Path, ocfg: OrganismConfig) -> Path:
    """The UNet folder that --unet-init names (a pipeline folder or its unet/), checked against the
    sizes this run builds; FadelabError naming the folder otherwise. Runs before any stage."""
    src = folder / "unet" if (folder / "unet" / "config.json").exists() else folder
    conf = json.loads((src / "config.json").read_text()) if (src / "config.json").exists() else {}
    if conf.get("_class_name") != "UNet2DConditionModel":
        raise FadelabError(f"--unet-init {folder}: no UNet there (expected a UNet2DConditionModel config.json "
                           f"in it or in its unet/)")
    want = build_unet(ocfg).config
    keys = ("block_out_channels", "down_block_types", "sample_size", "cross_attention_dim")
    differ = [k for k in keys if json.loads(json.dumps(conf.get(k))) != json.loads(json.dumps(want[k]))]
    if differ:
        raise FadelabError(f"--unet-init {folder}: its UNet has other sizes ({', '.join(differ)}: "
                           f"{[conf.get(k) for k in differ]}, this run builds {[want[k] for k in differ]})")
    return src


def train_unet(out: Path, data: _Data, cfg: TrainConfig, ocfg: OrganismConfig, device) -> int:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float32).to(device).eval()
    text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder").to(device, torch.float32).eval()
    tok = tokenizer()
    scenes, captions, images = data.get("base")
    uniq, inv = np.unique(np.asarray(captions + [""]), return_inverse=True)
    empty = int(inv[-1])
    inv = torch.from_numpy(inv[:-1]).to(device)
    with torch.no_grad():
        ids = torch.tensor(tok(list(uniq), padding="max_length", max_length=77, truncation=True).input_ids)
        eos = (ids == tok.eos_token_id).int().argmax(1)
        is_pad = (torch.arange(ids.shape[1])[None] > eos[:, None]).to(device)  # (U, 77)
        emb = torch.cat([text_encoder(ids[i:i + 2048].to(device))[0].to(torch.bfloat16)
                         for i in range(0, len(ids), 2048)])  # (U, 77, width)
        imgs = torch.from_numpy(images)
        sf = vae.config.scaling_factor
        lat = torch.cat([(vae.encode(_to_x(imgs[i:i + 1024].to(device))).latent_dist.mean * sf)
                         .to(torch.bfloat16) for i in range(0, len(imgs), 1024)])  # (N, 4, 16, 16)
    log.info("unet data: %d latents, %d unique captions", len(lat), len(uniq))
    del vae
    noise_sched, sampler = build_scheduler()
    alphas = noise_sched.alphas_cumprod.to(device)
    if cfg.unet_init:  # checked by train() before any stage ran
        unet = UNet2DConditionModel.from_pretrained(_unet_init_source(Path(cfg.unet_init), ocfg),
                                                    torch_dtype=torch.float32)
        log.info("unet: starting from %s", cfg.unet_init)
    else:
        unet = build_unet(ocfg)
    unet = unet.to(device).train()
    unet.to(memory_format=torch.channels_last)
    ema = [p.detach().clone().float() for p in unet.parameters()]
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
    step_unet = torch.compile(unet) if cfg.unet_compile else unet  # shares unet's parameters
    g = torch.Generator(device).manual_seed(cfg.seed + 3)
    budget = cfg.unet_minutes * 60
    total = cfg.unet_steps or 10_000  # refined from the measured speed when time-budgeted
    t0, step = time.time(), 0
    bar = tqdm(total=cfg.unet_steps, desc="unet", mininterval=5)
    while True:
        if cfg.unet_steps is not None and step >= cfg.unet_steps:
            break
        elapsed = time.time() - t0
        if cfg.unet_steps is None:
            if elapsed >= budget:
                break
            if step == 100:
                total = int(budget / (elapsed / 100))
        idx = torch.randint(len(lat), (cfg.unet_batch,), generator=g, device=device)
        z0 = lat[idx].float()
        cid = inv[idx]
        drop = torch.rand(cfg.unet_batch, generator=g, device=device) < cfg.cond_dropout
        cid = torch.where(drop, torch.full_like(cid, empty), cid)
        cond = noisy_pads(emb, cid, is_pad, empty, cfg.pad_noise, g)
        loss = unet_step(step_unet, opt, ema, z0, cond, alphas, g,
                         lr=_lr(step, total, cfg.unet_lr, warmup=300), ema_d=min(cfg.ema_decay, (1 + step) / (10 + step)))
        if step % 50 == 0 and not torch.isfinite(loss):  # a sync: not every step, so the GPU runs ahead
            raise FloatingPointError(f"unet loss became {loss.item()} at step {step}")
        step += 1
        bar.update(1)
        if step % 500 == 0:
            log.info("unet step %d loss %.4f (%.1f steps/s)", step, loss.item(), step / (time.time() - t0))
    bar.close()
    if step and not torch.isfinite(loss):  # the last steps since a check: never save a broken UNet
        raise FloatingPointError(f"unet loss became {loss.item()} by step {step}")
    with torch.no_grad():
        for p, e in zip(unet.parameters(), ema):
            p.copy_(e)
    unet.eval().to(memory_format=torch.contiguous_format)
    log.info("unet: %d steps in %.0fs", step, time.time() - t0)
    # assemble the pipeline folder around the trained parts
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(out / "vae", torch_dtype=torch.float16),
        text_encoder=CLIPTextModel.from_pretrained(out / "text_encoder", torch_dtype=torch.float16),
        tokenizer=tok,
        unet=cast(unet, torch.float16, "cpu"), scheduler=sampler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    # shards under 16 MB (a device call brings back files of at most 16 MiB) but above the text
    # encoder's 15.06 MB, so its file from the clip stage is rewritten in place, not duplicated
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size="16MB")
    _copy_tokenizer(out)
    return step


def train(out: Path | str, cfg: TrainConfig = TrainConfig(), stages=STAGES,
          ocfg: OrganismConfig = OrganismConfig(), device: str | None = None) -> dict:
    """Run `stages` in order into `out`; stages whose output exists are skipped (resume)."""
    for stage in stages:  # all checked before any is run
        if stage not in STAGES:
            raise FadelabError(f"unknown stage {stage!r}; accepted: {', '.join(STAGES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda_settings(dev)
    data = _Data(cfg)
    done = {"vae": out / "vae", "clip": out / "clip", "oracle": out / "oracle",
            "unet": out / "model_index.json", "card": out / "card.json"}
    meta_path = out / "organism.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta.setdefault("train", asdict(cfg))
    sizes = json.loads(json.dumps(asdict(ocfg)))  # tuples as the JSON lists organism.json holds
    if meta.setdefault("config", sizes) != sizes:
        changed = sorted(k for k, v in sizes.items() if v != meta["config"].get(k))
        raise FadelabError(f"{out} was trained with other network sizes ({', '.join(changed)}: "
                           f"{[meta['config'].get(k) for k in changed]}); resume with the same sizes or "
                           f"use another --out")
    if cfg.unet_init and "unet" in stages and not done["unet"].exists():
        _unet_init_source(Path(cfg.unet_init), ocfg)
    timings = meta.setdefault("seconds", {})
    for stage in stages:
        if done[stage].exists():
            log.info("stage %s: already done, skipped", stage)
            continue
        t = time.time()
        if stage == "vae":
            train_vae(out, data, cfg, ocfg, dev)
        elif stage == "clip":
            train_clip(out, data, cfg, ocfg, dev)
        elif stage == "oracle":
            train_oracle(out, data, cfg, ocfg, dev)
        elif stage == "unet":
            steps = train_unet(out, data, cfg, ocfg, dev)
            if cfg.unet_init is None:
                meta["unet_runs"] = []
            meta.setdefault("unet_runs", []).append({"init": cfg.unet_init, "steps": steps,
                                                     "minutes": cfg.unet_minutes if cfg.unet_steps is None else None})
            meta["unet_steps_done"] = sum(r["steps"] for r in meta["unet_runs"])
        elif stage == "card":
            from .card import measure, select_guidance

            sampling = select_guidance(out, device=str(dev), n=cfg.card_n)
            meta["sampling"] = sampling
            _save_json(meta_path, meta)
            card = measure(out, n=cfg.card_n, device=str(dev))
            _save_json(done["card"], card)
        timings[stage] = round(time.time() - t, 1)
        _save_json(meta_path, meta)
        log.info("stage %s done in %.0fs", stage, timings[stage])
    return meta
