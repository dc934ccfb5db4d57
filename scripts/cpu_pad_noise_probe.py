"""CPU probe (2026-11-28): continue training the shipped organism UNet with noisy pads (train.noisy_pads) and
measure card.pad_reliance before and after.  python scripts/cpu_pad_noise_probe.py N_SCENES STEPS LR PAD_NOISE
(session 5 ran 4000 200 1e-4 1.0: about 20 minutes on the 2-core CPU)."""
import sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
import numpy as np, torch
import models
from models.families import ORGANISM_DIR
from models.organism import world, render, card
from models.organism.oracle import Oracle
from models.organism.nets import tokenizer
from models.organism.train import noisy_pads, build_scheduler
torch.manual_seed(0)
N, STEPS, B, LR, PN = int(sys.argv[1]), int(sys.argv[2]), 64, float(sys.argv[3]), float(sys.argv[4])
m = models.load("organism", device="cpu"); pipe = m.pipe
orc = Oracle.load(ORGANISM_DIR / "oracle", "cpu")
t0 = time.time()
rng = np.random.default_rng([0, 1])
scenes = [world.sample_scene(rng, world.WorldMix()) for _ in range(N)]
caps = [world.caption(s, rng) for s in scenes]
imgs = render.render_batch(scenes, workers=2)
tok = tokenizer()
uniq, inv = np.unique(np.asarray(caps + [""]), return_inverse=True)
empty = int(inv[-1]); inv = torch.from_numpy(inv[:-1])
with torch.no_grad():
    ids = torch.tensor(tok(list(uniq), padding="max_length", max_length=77, truncation=True).input_ids)
    eos = (ids == tok.eos_token_id).int().argmax(1)
    is_pad = torch.arange(77)[None] > eos[:, None]
    te = pipe.text_encoder.float()
    emb = torch.cat([te(ids[i:i+512])[0] for i in range(0, len(ids), 512)])
    vae = pipe.vae.float(); sf = vae.config.scaling_factor
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    lat = torch.cat([vae.encode(x[i:i+256]).latent_dist.mean * sf for i in range(0, len(x), 256)])
print("data", round(time.time() - t0), "s", flush=True)
before = card.pad_reliance(pipe, orc, seeds=2)
print("before", before, flush=True)
unet = pipe.unet; unet.float().train()
sched, _ = build_scheduler(); alphas = sched.alphas_cumprod
opt = torch.optim.AdamW(unet.parameters(), lr=LR, weight_decay=0.0)
g = torch.Generator().manual_seed(1)
for step in range(STEPS):
    idx = torch.randint(len(lat), (B,), generator=g)
    cid = inv[idx]
    drop = torch.rand(B, generator=g) < 0.1
    cid = torch.where(drop, torch.full_like(cid, empty), cid)
    cond = noisy_pads(emb, cid, is_pad, empty, PN, g)
    z0 = lat[idx]; noise = torch.randn(z0.shape, generator=g); t = torch.randint(0, 1000, (B,), generator=g)
    a = alphas[t].view(-1, 1, 1, 1); zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
    snr = alphas[t] / (1 - alphas[t]); w = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    loss = (w * ((unet(zt, t, cond).sample - noise) ** 2).mean((1, 2, 3))).mean()
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0); opt.step()
    if step % 25 == 0: print(step, round(loss.item(), 4), round(time.time() - t0), "s", flush=True)
unet.eval()
after = card.pad_reliance(pipe, orc, seeds=2)
print("after", after, flush=True)
print("fidelity", card.fidelity(pipe, orc, 32, progress=False), flush=True)
