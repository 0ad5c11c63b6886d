"""ResidentModels: the worker's base models, loaded on first need with the real loader (tiny SD 1.x and SDXL models
on the CPU), the least recently used evicted at the count limit or when free memory would not hold the next one."""
from __future__ import annotations

import pytest

from trainer.contract.errors import UserError
from trainer.generation.service import native_side
from trainer.models.resident import ResidentModels, parse_catalog


@pytest.fixture(scope="module")
def catalog(tiny_model_dir, tiny_sdxl_model_dir, tmp_path_factory) -> dict[str, str]:
    from trainer.models.tiny import make_tiny_model

    beta = make_tiny_model(tmp_path_factory.mktemp("tiny-beta"), seed=1)
    return {"alpha": str(tiny_model_dir), "beta": str(beta), "xl": str(tiny_sdxl_model_dir)}


def shelf(catalog, keep, **kwargs) -> ResidentModels:
    models = ResidentModels(catalog, device="cpu", dtype="fp32", keep=keep, **kwargs)
    models.survey()
    return models


def test_the_survey_reads_each_models_family_and_size_from_its_files(catalog, tmp_path):
    models = shelf({**catalog, "gone": str(tmp_path / "missing")}, keep=1)
    facts = {entry["name"]: entry for entry in models.facts()}
    assert {name: facts[name]["family"] for name in catalog} == {"alpha": "sd1", "beta": "sd1", "xl": "sdxl"}
    assert "does not exist" in facts["gone"]["problem"] and facts["gone"]["family"] is None
    assert not any(entry["resident"] for entry in facts.values())  # nothing is loaded by a survey
    loaded = models.get("xl")
    assert facts["xl"]["native_side"] == native_side(loaded.pipe)  # read from its configs before any load
    assert type(loaded.pipe).__name__ == "StableDiffusionXLPipeline" and loaded.family == "sdxl"


def test_the_least_recently_used_model_makes_room_at_the_count_limit(catalog):
    changes = []
    models = shelf(catalog, keep=2)
    models.on_change = lambda: changes.append(models.resident_names())
    alpha = models.get("alpha")
    models.get("xl")
    assert models.get("alpha") is alpha  # resident: not loaded again, and now the most recently used
    models.get("beta")
    assert models.resident_names() == ["alpha", "beta"]  # xl, the least recently used, went
    assert changes == [["alpha"], ["alpha", "xl"], ["alpha"], ["alpha", "beta"]]  # each load and eviction reported
    facts = {entry["name"]: entry["resident"] for entry in models.facts()}
    assert facts == {"alpha": True, "beta": True, "xl": False}


def test_a_model_that_would_not_fit_the_free_memory_evicts_others_first(catalog):
    free = {"bytes": None}
    models = shelf(catalog, keep=3, free_memory=lambda: free["bytes"])
    models.get("alpha")
    models.get("beta")
    free["bytes"] = 1  # what the GPU reports free now: less than the next model's weights
    models.get("xl")
    assert models.resident_names() == ["xl"]


def test_a_model_the_worker_was_not_given_is_a_clear_error(catalog):
    with pytest.raises(UserError, match="no base model called gamma"):
        shelf(catalog, keep=1).get("gamma")


def test_the_catalog_argument_round_trips():
    assert parse_catalog("a=/m/a, b=org/model,,") == {"a": "/m/a", "b": "org/model"}
