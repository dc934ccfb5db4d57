"""store.Recorder on tiny real modules (a transformers CLIPTextModel), against hand references."""

import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from store import Recorder, Store, StoreError


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    cfg = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, vocab_size=99, max_position_embeddings=9,
                         hidden_act="quick_gelu", bos_token_id=97, eos_token_id=98,
                         pad_token_id=0)
    return CLIPTextModel(cfg).eval()


def _ids(n, seed):
    return torch.randint(0, 99, (n, 9), generator=torch.Generator().manual_seed(seed))


def _tower(model):
    """The text transformer (transformers < 5 wraps it in .text_model)."""
    return getattr(model, "text_model", model)


def _sites(model, kind="fc2"):
    return {f"text.mlp.{i}.{kind}": getattr(layer.mlp, kind)
            for i, layer in enumerate(_tower(model).encoder.layers)}


def test_fc2_inputs_match_hand_reference(clip):
    fc1 = {k.replace("fc2", "fc1"): v for k, v in _sites(clip, "fc1").items()}
    with torch.no_grad(), Recorder(_sites(clip), what="input") as keys, \
            Recorder(fc1, what="output") as pre, \
            Recorder({"final": _tower(clip).final_layer_norm}, what="input") as fin:
        outs = [clip(_ids(3, s), output_hidden_states=True) for s in (1, 2)]
    for i in range(2):
        k = keys.result(f"text.mlp.{i}.fc2")
        z = pre.result(f"text.mlp.{i}.fc1")
        assert k.shape == (6, 9, 64) and len(keys.calls(f"text.mlp.{i}.fc2")) == 2
        torch.testing.assert_close(k, z * torch.sigmoid(1.702 * z), rtol=0, atol=0)  # quick_gelu
    hidden = torch.cat([o.hidden_states[-1] for o in outs])  # input of the final layer norm
    assert torch.equal(fin.result("final"), hidden)


def test_hooks_are_removed_even_when_the_block_raises(clip):
    mods = _sites(clip)
    with pytest.raises(RuntimeError, match="boom"):
        with Recorder(mods) as rec:
            assert all(len(m._forward_hooks) == 1 for m in mods.values())
            raise RuntimeError("boom")
    assert all(len(m._forward_hooks) == 0 for m in mods.values())
    assert rec._handles == []
    with pytest.raises(StoreError, match="bad what"):
        Recorder(mods, what="grad")


def test_unet_mode_timesteps_cfg_branches_and_pooling():
    conv = torch.nn.Conv2d(3, 4, 1)
    uncond, cond = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    want_t = [999, 1]
    with torch.no_grad(), Recorder({"unet.mid": conv}, what="output", reduce="mean_spatial",
                                   cfg=True, timesteps=want_t) as rec:
        for batch in range(2):
            for t in (999, 500, 1):  # a sampling loop; 500 is not recorded
                rec.set_timestep(torch.tensor(t))
                conv(torch.cat([uncond, cond]) * (t + batch))
            rec.end_batch()
    got = rec.result("unet.mid")
    assert got.shape == (4, 2, 2, 4)  # (prompt, timestep, cfg_branch, neuron)
    for batch in range(2):
        for j, t in enumerate(want_t):
            for b, x in enumerate((uncond, cond)):
                ref = conv(x * (t + batch)).mean(dim=(2, 3))
                torch.testing.assert_close(got[2 * batch:2 * batch + 2, j, b], ref)
    with pytest.raises(StoreError, match="set_timestep"):
        with Recorder({"c": conv}, timesteps=[1]):
            conv(torch.randn(1, 3, 2, 2))


def test_streaming_to_store_resumes_after_a_crash(clip, tmp_path):
    path = str(tmp_path / "acts.h5")
    ids = _ids(10, 3)
    prompts = [f"prompt {i}" for i in range(10)]
    with torch.no_grad(), Recorder(_sites(clip), dtype=torch.float16) as ref:
        clip(ids)
    with Store.open(path) as st:  # the first run dies after two batches of four
        with pytest.raises(KeyboardInterrupt), torch.no_grad():
            with Recorder(_sites(clip), dtype=torch.float16, store=st, variant="M",
                          n_prompts=10, coords={"prompt": prompts}) as rec:
                assert rec.start_row == 0
                for s in range(0, 10, 4):
                    if s == 8:
                        raise KeyboardInterrupt
                    clip(ids[s:s + 4])
        assert all(len(m._forward_hooks) == 0 for m in _sites(clip).values())
    with Store.open(path) as st:
        with torch.no_grad(), Recorder(_sites(clip), dtype=torch.float16, store=st, variant="M",
                                       n_prompts=10, coords={"prompt": prompts}) as rec:
            assert rec.start_row == 8
            clip(ids[rec.start_row:])
    with Store.open(path, "r") as st:
        for i in range(2):
            da = st.activations("M", f"text.mlp.{i}.fc2")
            assert da.dims == ("prompt", "token", "neuron") and da.dtype == np.float16
            assert list(da.prompt.values) == prompts
            np.testing.assert_array_equal(da.values, ref.result(f"text.mlp.{i}.fc2").numpy())
