"""The oracle: reads the organism's ground truth back from an image.

What it offers:
    OracleNet                  a small CNN with one classification head per world.HEADS entry
    augment(x, generator)      the augmentations the oracle trains with (generation artefacts)
    Oracle.load(folder)        the shipped oracle; Oracle.read(images) -> {head: [label, ...]}
    targets(scenes)            integer targets per head for training and accuracy

Why augmentations: a judge trained only on clean renders misreads generated images (tinted,
noisy backgrounds; ../shared/notes/organism-feasibility.md). The oracle trains on renders passed
through the organism's own VAE (the decoder's artefacts are the generator's artefacts) and on
noise, blur, tint, contrast and shift; its accuracy is reported on clean renders of both styles
and on VAE round trips.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import world

HEAD_NAMES = tuple(world.HEADS)


class OracleNet(nn.Module):
    """Conv stack 64 -> 32 -> 16 -> 8 -> 4, global pooling, one linear head per label family."""

    def __init__(self, width: int = 48):
        super().__init__()
        w = width
        layers, c_in = [], 3
        for c_out in (w, 2 * w, 4 * w, 4 * w):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                       nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                       nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({h: nn.Linear(2 * c_in, len(world.HEADS[h])) for h in HEAD_NAMES})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (N, 3, 64, 64) in [-1, 1] -> {head: logits (N, n_labels)}."""
        f = self.features(x)  # (N, C, 4, 4)
        f = torch.cat([f.mean((2, 3)), f.amax((2, 3))], dim=1)  # (N, 2C)
        return {h: head(f) for h, head in self.heads.items()}


def targets(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    """Integer class targets per head for a list of scenes."""
    labels = [s.labels() for s in scenes]
    return {h: torch.tensor([world.HEADS[h].index(lab[h]) for lab in labels]) for h in HEAD_NAMES}


def to_tensor(images: np.ndarray | torch.Tensor, device="cpu") -> torch.Tensor:
    """uint8 (N, H, W, 3) or float (N, 3, H, W) in [-1, 1] -> float (N, 3, H, W) in [-1, 1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype == torch.uint8:
        images = images.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images.to(device)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random tint, contrast, brightness, blur, noise and shift on x in [-1, 1], (N, 3, H, W)."""
    n = x.shape[0]
    dev = x.device

    def r(*shape):
        return torch.rand(*shape, generator=generator, device=dev)

    x = x * (0.75 + 0.5 * r(n, 1, 1, 1)) + (r(n, 3, 1, 1) - 0.5) * 0.3 + (r(n, 1, 1, 1) - 0.5) * 0.3
    blur = r(n, 1, 1, 1) < 0.3
    k = torch.tensor([1.0, 2.0, 1.0], device=dev)
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    x = torch.where(blur, F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3), x)
    x = x + torch.randn(x.shape, generator=generator, device=dev) * 0.12 * r(n, 1, 1, 1)
    shift = (r(2) * 7 - 3.5).round().int().tolist()
    x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(2, 3))
    return x.clamp(-1.5, 1.5)


class Oracle:
    """The trained oracle. `read` returns the most likely label of every head for each image."""

    def __init__(self, net: OracleNet, device="cpu"):
        self.net = net.to(device).eval()
        self.device = device

    @classmethod
    def load(cls, folder: Path | str, device="cpu") -> "Oracle":
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / "config.json").read_text())
        if tuple(meta["heads"]) != HEAD_NAMES or any(
                tuple(meta["labels"][h]) != world.HEADS[h] for h in HEAD_NAMES):
            raise ValueError(f"oracle at {folder} was trained on another world catalog")
        net = OracleNet(meta["width"])
        net.load_state_dict({k: v.float() for k, v in load_file(folder / "model.safetensors").items()})
        return cls(net, device)

    @staticmethod
    def save(net: OracleNet, folder: Path | str, width: int, dtype=torch.float16) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to(dtype).cpu().contiguous() for k, v in net.state_dict().items()},
                  folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(
            {"width": width, "heads": list(HEAD_NAMES),
             "labels": {h: list(world.HEADS[h]) for h in HEAD_NAMES}}, indent=1))

    @torch.no_grad()
    def probs(self, images, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """Softmax probabilities per head, (N, n_labels), on the CPU."""
        out: dict[str, list[torch.Tensor]] = {h: [] for h in HEAD_NAMES}
        for i in range(0, len(images), batch_size):
            x = to_tensor(images[i:i + batch_size], self.device)
            for h, logits in self.net(x).items():
                out[h].append(logits.float().softmax(-1).cpu())
        return {h: torch.cat(v) if v else torch.zeros(0, len(world.HEADS[h])) for h, v in out.items()}

    def read(self, images, batch_size: int = 512) -> dict[str, list[str]]:
        """The most likely label per head and image: {head: [label, ...]}."""
        return {h: [world.HEADS[h][i] for i in p.argmax(-1).tolist()]
                for h, p in self.probs(images, batch_size).items()}
