"""Judges: read an attribute from generated images (debiasing's feedback, ReFACT's scores).

Offers
    Judge                         the protocol: judge(images uint8 (N, H, W, 3)) -> flags (N,) float,
                                  1.0 female, 0.0 male, NaN when the judge cannot tell
    oracle_judge(folder, device)  the organism's oracle (its gender head; "none" -> NaN), the
                                  ground truth the organism's card reads female shares with
    OrganismClip(folder, device)  the organism's CLIP (clean text tower from its folder):
                                  .judge() a zero-shot gender judge, .prefers(images, a, b)
    open_clip_judge(path, arch)   an open_clip model from a local weights file (real models)
    female_share(flags) -> float  female / (female + male), NaN flags left out (card.py's F_p)

Zero-shot judges score each image against two prompt sets and flag the closer one, as UCE's
debiasing code does with CLIP (highest softmax probability among the attribute prompts); the
organism's prompts are an ensemble over its professions ("a female ceo", "a woman ceo", ...), the
phrasing its CLIP was trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from models.errors import FadelabError

Judge = Callable[[np.ndarray], np.ndarray]


def female_share(flags: np.ndarray) -> float:
    """F = female / (female + male) over flags (1 female, 0 male, NaN undecided); NaN if none."""
    flags = np.asarray(flags, dtype=float)
    known = flags[~np.isnan(flags)]
    return float(known.mean()) if known.size else float("nan")


def _check_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise FadelabError(f"judges take uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def oracle_judge(folder: Path | str | None = None, device: str = "cpu") -> Judge:
    """The organism's oracle as a judge: gender head female -> 1, male -> 0, none -> NaN."""
    from models.organism.nets import WEIGHTS_DIR
    from models.organism.oracle import Oracle

    oracle = Oracle.load(Path(folder or WEIGHTS_DIR) / "oracle", device)

    def judge(images: np.ndarray) -> np.ndarray:
        genders = oracle.read(_check_images(images))["gender"]
        return np.array([{"female": 1.0, "male": 0.0}.get(g, np.nan) for g in genders])

    judge.oracle = oracle  # type: ignore[attr-defined]
    return judge


class OrganismClip:
    """The organism's CLIP with its clean text tower (loaded from the folder, never the model
    under edit), for zero-shot judging and ReFACT's CLIP scores."""

    def __init__(self, folder: Path | str | None = None, device: str = "cpu"):
        from models.organism.nets import WEIGHTS_DIR, load_clip, tokenizer

        self.folder = Path(folder or WEIGHTS_DIR)
        self.device = device
        self.model = load_clip(self.folder, device=device)
        self.tokenizer = tokenizer(self.folder / "tokenizer")

    @torch.no_grad()
    def text(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit text embeddings (N, D)."""
        ids = self.tokenizer(list(texts), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        f = self.model.get_text_features(input_ids=ids)
        f = getattr(f, "pooler_output", f)
        return torch.nn.functional.normalize(f.float(), dim=-1)

    @torch.no_grad()
    def image(self, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """Unit image embeddings (N, D) of uint8 (N, 64, 64, 3) images."""
        images = _check_images(images)
        out = []
        for i in range(0, len(images), batch_size):
            px = torch.from_numpy(images[i:i + batch_size]).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
            f = self.model.get_image_features(pixel_values=px)
            out.append(torch.nn.functional.normalize(getattr(f, "pooler_output", f).float(), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)

    def prefers(self, images: np.ndarray, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Per image i, whether cos(image_i, a_i) > cos(image_i, b_i) (ReFACT's p(a) > p(b) under
        softmax(100 cos)). `a` and `b` hold one text per image."""
        img = self.image(images)
        ta, tb = self.text(a), self.text(b)
        return ((img * ta).sum(-1) > (img * tb).sum(-1)).cpu().numpy()

    def judge(self, professions: Sequence[str] | None = None) -> Judge:
        """A gender judge: the closer of the mean female and mean male prompt embeddings over
        "a female {p}", "a woman {p}" (and male, man) for every profession p."""
        from models.organism import world

        profs = list(professions or world.PROFESSIONS)
        female = self.text([f"a {w} {p}" for p in profs for w in world.GENDER_WORDS["female"]]).mean(0)
        male = self.text([f"a {w} {p}" for p in profs for w in world.GENDER_WORDS["male"]]).mean(0)

        def judge(images: np.ndarray) -> np.ndarray:
            img = self.image(images)
            return (img @ female > img @ male).float().cpu().numpy()

        return judge


def open_clip_judge(path: Path | str, arch: str = "ViT-B-32", device: str = "cpu",
                    labels: tuple[str, str] = ("a photo of a woman", "a photo of a man")) -> Judge:
    """A zero-shot gender judge from an open_clip model whose weights are a local file.

    Args:
        path: the weights file (e.g. open_clip_pytorch_model.bin of laion2b ViT-B-32); no download.
        arch: open_clip's model name for that file.
        labels: (female prompt, male prompt).
    Raises FadelabError when the file is missing or does not fit `arch`.
    """
    import open_clip
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FadelabError(f"CLIP judge weights {path} do not exist: give a local open_clip weights file "
                           f"for {arch} (nothing is downloaded)")
    if arch not in open_clip.list_models():
        raise FadelabError(f"unknown open_clip architecture {arch!r}; e.g. ViT-B-32, ViT-L-14")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(path), device=device)
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FadelabError(f"{path} is not an open_clip {arch} weights file: {first[:200]}") from e
    model.eval()
    tok = open_clip.get_tokenizer(arch)
    with torch.no_grad():
        t = torch.nn.functional.normalize(model.encode_text(tok(list(labels)).to(device)).float(), dim=-1)

    @torch.no_grad()
    def judge(images: np.ndarray) -> np.ndarray:
        images = _check_images(images)
        out = []
        for i in range(0, len(images), 64):
            px = torch.stack([preprocess(Image.fromarray(im)) for im in images[i:i + 64]]).to(device)
            f = torch.nn.functional.normalize(model.encode_image(px).float(), dim=-1)
            out.append((f @ t.T).argmax(-1) == 0)
        return torch.cat(out).float().cpu().numpy() if out else np.zeros(0)

    return judge
