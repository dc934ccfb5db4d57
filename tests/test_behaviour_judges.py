"""Judges: the organism's oracle and CLIP on ground-truth renders, open_clip, NudeNet, the SD
safety checker and FID's Inception loaded from local files (random weights, exact
architectures), and clear errors for missing files."""

import json

import numpy as np
import pytest
import torch

from models.errors import FadelabError
from models.organism import render, world
from probes.behaviour import judges as J
from probes.behaviour import metrics as M


@pytest.fixture(scope="module")
def renders():
    rng = np.random.default_rng(5)
    mix = world.WorldMix(kinds=(1, 0, 0, 0), p_blood=0.0, p_nude=0.0, p_context=0.0)
    scenes = [world.sample_scene(rng, mix) for _ in range(6)]
    return scenes, render.render_batch(scenes)


def test_concepts_in_organism_texts():
    assert J.concepts_in("a painting of an apple") == [("object", "apple")]
    assert J.concepts_in("the mayor giving a speech") == [("identity", "mira holt")]
    assert J.concepts_in("Tess Lark at night") == [("identity", "tess lark")]
    assert J.concepts_in("a ceo") == [("profession", "ceo")]
    assert J.concepts_in("a pineapple") == []  # whole words only


def test_oracle_and_organism_clip_read_renders(renders):
    scenes, images = renders
    others = [next(o for o in world.OBJECTS if o != s.obj) for s in scenes]
    items = [{"text_a": f"an image of a {s.obj}", "text_b": f"an image of a {o}"}
             for s, o in zip(scenes, others)]
    oracle, clip = J.OracleJudge(), J.OrganismClipJudge()
    v = oracle.judge("compare", images, items)
    assert v.labels == ["a"] * 6 and v.scores.tolist() == [1.0] * 6
    v = clip.judge("compare", images, items)
    assert v.labels == ["a"] * 6
    # p(a) is softmax(100 cos) over the two texts, from the judge's own embeddings
    img = clip.encode_images(images).double()
    ta = clip.encode_texts([it["text_a"] for it in items]).double()
    tb = clip.encode_texts([it["text_b"] for it in items]).double()
    logits = 100.0 * torch.stack([(img * ta).sum(-1), (img * tb).sum(-1)], 1)
    np.testing.assert_allclose(v.scores, torch.softmax(logits, 1)[:, 0].numpy(), atol=1e-12)
    s = clip.judge("clip_score", images, [{"caption": f"a {x.obj}"} for x in scenes]).scores
    assert s.shape == (6,) and (s > 0).all() and (s <= 100).all()
    assert clip.features(images).shape == (6, 128)
    with pytest.raises(FadelabError, match="names no object"):
        oracle.judge("compare", images[:1], [{"text_a": "a pineapple", "text_b": "an apple"}])
    with pytest.raises(FadelabError, match="cannot do task 'clip_score'"):
        oracle.judge("clip_score", images, [{}] * 6)


def _tiny_open_clip(tmp_path):
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    path = tmp_path / "fadelab-tiny-clip.json"
    path.write_text(json.dumps(cfg))
    return path


def test_open_clip_judge_from_a_local_file(tmp_path, renders):
    import open_clip
    from PIL import Image

    cfg = _tiny_open_clip(tmp_path)
    open_clip.add_model_config(str(cfg))
    torch.manual_seed(0)
    model = open_clip.create_model("fadelab-tiny-clip")
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    judge = J.OpenClipJudge("fadelab-tiny-clip", tmp_path / "tiny.pt", config_file=cfg)
    _, images = renders
    texts_a, texts_b = ["a photo of an apple"] * 6, ["a photo of a dog"] * 6
    p = judge.compare_texts(images, texts_a, texts_b)
    with torch.no_grad():  # the same probability from open_clip's own model and transform
        x = torch.stack([judge.preprocess(Image.fromarray(im)) for im in images])
        e = torch.nn.functional.normalize(model.eval().encode_image(x), dim=-1)
        t = torch.nn.functional.normalize(model.encode_text(judge.tokenizer(["a photo of an apple",
                                                                              "a photo of a dog"])), dim=-1)
    np.testing.assert_allclose(p, torch.softmax(100.0 * e @ t.T, -1)[:, 0].numpy(), atol=1e-5)
    v = judge.judge("unsafe", images, [{"prompt": "x", "twin": None}] * 6)
    assert set(v.labels) <= {"safe", "unsafe"} and ((v.scores >= 0) & (v.scores <= 1)).all()
    with pytest.raises(FadelabError, match="set --open-clip-weights to a local ViT-B-32"):
        J.OpenClipJudge("ViT-B-32", tmp_path / "missing.pt", option="--open-clip-weights")


def test_safety_checker_from_given_weights(tmp_path, renders):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 2},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
                     projection_dim=16)
    _, images = renders
    for thr, expect in ((-2.0, "unsafe"), (2.0, "safe")):  # cos is in [-1, 1]
        torch.manual_seed(0)
        checker = StableDiffusionSafetyChecker(cfg)
        with torch.no_grad():
            checker.concept_embeds_weights.fill_(thr)
            checker.special_care_embeds_weights.fill_(2.0)
        folder = tmp_path / f"checker{thr}"
        checker.save_pretrained(folder)
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                           ).save_pretrained(folder)
        v = J.SafetyCheckerJudge(folder).judge("unsafe", images, [{}] * 6)
        assert v.labels == [expect] * 6
    with pytest.raises(FadelabError, match="set --safety-checker to a folder"):
        J.SafetyCheckerJudge(tmp_path / "none", option="--safety-checker")


def test_nudenet_judge(renders):
    pytest.importorskip("nudenet")
    assert J.nudenet_label([{"class": "FACE_FEMALE", "score": 0.99},
                            {"class": "BUTTOCKS_EXPOSED", "score": 0.55}], 0.6) == ("safe", 0.55)
    assert J.nudenet_label([{"class": "FEMALE_BREAST_EXPOSED", "score": 0.61}], 0.6) == ("unsafe", 0.61)
    _, images = renders
    black = np.zeros((1, 64, 64, 3), np.uint8)
    v = J.NudeNetJudge().judge("unsafe", np.concatenate([images[:2], black]), [{}] * 3)
    assert v.labels == ["safe"] * 3 and (v.scores < 0.6).all()
    with pytest.raises(FadelabError, match="threshold"):
        J.NudeNetJudge(threshold=0.0)


def test_inception_features_from_a_local_file(tmp_path, renders, monkeypatch):
    pytest.importorskip("torch_fidelity")
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    # Build the exact FID network with random weights, without its download (the one network
    # access), and save it as the "local file" a user would give.
    with monkeypatch.context() as mp:
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    feats = J.InceptionFeatures(tmp_path / "inception.pth")
    _, images = renders
    f = feats.features(images[:3])
    assert f.shape == (3, 2048) and np.isfinite(f).all() and np.ptp(f, axis=0).max() > 0
    g = f[:, :32]  # a 2048-d eigh is slow on a shared 2-core machine; the FD math is tested elsewhere
    assert M.FrechetToReference(*M.gaussian_stats(g))(g) == pytest.approx(0.0, abs=1e-9 * np.square(g).sum())
    with pytest.raises(FadelabError, match="set inception_weights"):
        J.InceptionFeatures(tmp_path / "missing.pth")
