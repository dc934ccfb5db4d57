"""Benchmark readers (../shared/data's public files, from a given path) and prompt suites."""

import csv
from pathlib import Path

import pytest

from models.errors import FadelabError
from models.organism import prompts as P
from probes.behaviour import benchmarks as B
from probes.behaviour.run import EvalConfig
from probes.behaviour.suites import SampleSizes, organism_suites, road_suite

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (SHARED / "RoAD_test.csv").exists(),
                                reason="../shared/data is not present")


@needs_data
def test_read_the_public_benchmarks():
    road = B.read_road(SHARED / "RoAD_test.csv")
    assert len(road) == 90 and {r["Type"] for r in road} == {"Appearance", "Role"}
    assert len(B.read_road(SHARED / "RoAD_validation.csv")) == 10  # no Positive_oracle columns
    prompts, seeds, profs = B.read_professions(SHARED / "profession_prompts.csv", ("ceo", "farmer"), 30)
    assert len(prompts) == 60 and profs.count("ceo") == 30
    assert prompts[0] == prompts[10] and seeds[10] == seeds[0] + 1  # 10 templates x 3 seeds
    assert all("ceo" in p.lower() for p in prompts[:30])
    i2p = B.read_i2p(SHARED / "unsafe-prompts4703.csv", 50, seed=0)
    assert len(i2p) == 50 and i2p == B.read_i2p(SHARED / "unsafe-prompts4703.csv", 50, seed=0)
    sexual = B.read_i2p(SHARED / "unsafe-prompts4703.csv", 10, categories=["sexual"])
    assert all("sexual" in r["categories"] for r in sexual)
    coco = B.read_coco(SHARED / "coco_30k.csv", 5)
    assert coco[0]["prompt"].startswith("A bicycle replica")


@needs_data
def test_benchmark_suites_have_the_study_sizes():
    suites = {s.kind: s for s in B.benchmark_suites(SHARED, SampleSizes(), road_rows=[0])}
    road = suites["road"]
    assert len(road) == 11 * 25  # Prompt + 5 positives + 5 negatives, seeds 0-24
    assert road.seeds[:25] == tuple(range(25))
    first = road.items[0]
    row = B.read_road(SHARED / "RoAD_test.csv")[0]
    assert (road.prompts[0], first["text_a"], first["text_b"]) == (row["Prompt"], row["New"], row["Old"])
    spec = [it for it in road.items if it["part"] == "specificity"][0]
    assert (spec["text_a"], spec["text_b"]) == (row["Negative1"], row["Negative_new1"])
    assert len(suites["profession"]) == 6 * 30
    assert len(suites["unsafe"]) == 50 and suites["unsafe"].items[0]["twin"] is None
    assert len(suites["quality"]) == 100


def test_wrong_columns_name_what_is_missing(tmp_path):
    bad = tmp_path / "road.csv"
    with bad.open("w", newline="") as f:
        csv.writer(f).writerows([["Type", "Prompt", "Old"], ["Role", "x", "y"]])
    with pytest.raises(FadelabError, match=r"missing columns New, Positive1, Positive_old1"):
        B.read_road(bad)
    with pytest.raises(FadelabError, match="missing columns prompt, evaluation_seed, profession"):
        B.read_professions(bad, ("ceo",))
    with pytest.raises(FadelabError, match="does not exist"):
        B.read_coco(tmp_path / "nope.csv", 3)
    good = tmp_path / "prof.csv"
    with good.open("w", newline="") as f:
        csv.writer(f).writerows([["prompt", "evaluation_seed", "profession"], ["a ceo", "1", "CEO"]])
    with pytest.raises(FadelabError, match="'pilot' is not in"):
        B.read_professions(good, ("pilot",))


def test_organism_suites_and_road_schema(tmp_path):
    sizes = SampleSizes(road_seeds=2, profession_images=3, unsafe_prompts=4, quality_prompts=5,
                        professions=("ceo", "nurse"))
    s = {x.kind: x for x in organism_suites(sizes)}
    assert len(s["road"]) == len(P.road_requests()) * 11 * 2
    assert len(s["profession"]) == 6 and s["profession"].column("profession")[3:] == ["nurse"] * 3
    assert len(s["unsafe"]) == 4 and all(it["twin"] and it["twin"] != it["prompt"]
                                         for it in s["unsafe"].items)
    assert s["quality"].reference.shape == (5, 64, 64, 3)
    # the organism's RoAD CSV reads back through the public reader into the same suite
    path = P.write_road_csv(tmp_path / "road.csv")
    again = road_suite(B.read_road(path), 2)
    assert again.prompts == s["road"].prompts and again.items == s["road"].items
    with pytest.raises(FadelabError, match="not in the organism's world"):
        organism_suites(SampleSizes(professions=("astronaut",)))


def test_eval_config_from_toml(tmp_path):
    path = tmp_path / "eval.toml"
    path.write_text("[evaluate]\nn_boot = 200\ndrift_n = 0\n[evaluate.sizes]\nroad_seeds = 3\n"
                    "professions = ['ceo']\n[evaluate.generation]\nsteps = 10\n")
    cfg = EvalConfig.from_file(path)
    assert cfg.n_boot == 200 and cfg.sizes.road_seeds == 3 and cfg.sizes.professions == ("ceo",)
    assert cfg.generation.steps == 10 and cfg.sizes.profession_images == 30
    path.write_text("[evaluate]\nn_bots = 2\n")
    with pytest.raises(FadelabError, match="unknown evaluation settings"):
        EvalConfig.from_file(path)
