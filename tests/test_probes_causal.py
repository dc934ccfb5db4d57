"""Causal probes: the projected fine-tune no longer acts on the edit's keys, and nothing else moves."""

import pytest
import torch

from models import WeightDelta
from models.errors import FadelabError
from probes.causal import edit_basis, gradient_projector, project_grad, project_out


def _pair(seed=0, m=12, n=10, k=3):
    g = torch.Generator().manual_seed(seed)
    c_e = torch.randn(k, n, generator=g)
    d_ed = WeightDelta({"a": torch.randn(m, k, generator=g) @ c_e, "b": torch.randn(m, n, generator=g)},
                       {"method": "uce"})
    d_ft = WeightDelta({"a": torch.randn(m, n, generator=g), "c": torch.randn(4, 4, generator=g),
                        "b": (torch.randn(m, 2, generator=g), torch.randn(2, n, generator=g))},
                       {"method": "lora"})
    return d_ed, d_ft, {"c_e": c_e}


def test_projected_update_leaves_the_keys_alone():
    d_ed, d_ft, keys = _pair()
    out = project_out(d_ft, d_ed, keys)
    # (W_ed + dW_ft') c = W_ed c for every key c: the edit's own mapping is untouched at the site
    assert torch.allclose(out.dense("a") @ keys["c_e"].T, torch.zeros(12, 3), atol=1e-5)
    # the part orthogonal to the keys is kept exactly
    q = edit_basis(d_ed, keys, "a").float()
    kept = d_ft.dense("a") - d_ft.dense("a") @ q @ q.T
    assert torch.allclose(out.dense("a"), kept, atol=1e-6)
    # sites the edit did not touch are unchanged, bit for bit
    assert torch.equal(out.dense("c"), d_ft.dense("c"))
    assert out.provenance["projected_out"]["space"] == "keys"


def test_low_rank_stays_low_rank_and_matches_dense():
    d_ed, d_ft, keys = _pair(1)
    low = project_out(d_ft, d_ed, keys)
    dense = project_out(WeightDelta({s: d_ft.dense(s) for s in d_ft.sites()}), d_ed, keys)
    assert low.is_low_rank("b")
    assert torch.allclose(low.dense("b"), dense.dense("b"), atol=1e-5)


def test_row_space_and_gradient_projection():
    d_ed, _, keys = _pair(2)
    q_keys, q_row = edit_basis(d_ed, keys, "a", "keys"), edit_basis(d_ed, keys, "a", "row")
    # dW_ed = B C_E has the keys' span as its row space: the two bases span the same subspace
    assert torch.allclose(q_keys @ q_keys.T, q_row @ q_row.T, atol=1e-8)
    # keys stored for site a only: site b falls back to the row space of dW_ed (full rank here)
    own = {"c_e:a": keys["c_e"]}
    assert edit_basis(d_ed, own, "a").shape == (10, 3)
    assert edit_basis(d_ed, own, "b").shape == (10, 10)
    g = torch.randn(12, 10)
    once = project_grad(g, q_keys)
    assert torch.allclose(project_grad(once, q_keys), once, atol=1e-5)  # a projection
    assert set(gradient_projector(d_ed, keys)) == {"a", "b"}


def test_bad_input_names_the_value():
    d_ed, d_ft, keys = _pair()
    with pytest.raises(FadelabError, match="space 'cols'"):
        edit_basis(d_ed, keys, "a", "cols")
    with pytest.raises(FadelabError, match="site 'zzz'"):
        edit_basis(d_ed, keys, "zzz")


def test_a_shared_key_is_factored_once_and_per_site_keys_each_time():
    from probes.weights_linalg import BasisCache, row_basis

    d_ed, _, keys = _pair(3)
    bases = BasisCache()
    qa, qb = edit_basis(d_ed, keys, "a", bases=bases), edit_basis(d_ed, keys, "b", bases=bases)
    assert len(bases) == 1 and torch.equal(qa, qb)  # one c_e for both sites: one factorisation
    assert torch.allclose(qa @ qa.T, row_basis(keys["c_e"].double(), 1e-6) @ row_basis(keys["c_e"].double(), 1e-6).T)
    own = {"c_e:a": keys["c_e"], "c_e:b": keys["c_e"].clone()}  # equal values, separate storage
    bases = BasisCache()
    edit_basis(d_ed, own, "a", bases=bases), edit_basis(d_ed, own, "b", bases=bases)
    assert len(bases) == 2
    # the cached answer is the one an uncached call gives
    assert torch.equal(edit_basis(d_ed, keys, "a"), qa)
