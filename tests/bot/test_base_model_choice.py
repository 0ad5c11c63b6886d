"""Several base models per bot (issue 13 bullet 4), through the services a command calls with real parts: SQLite in
tmp_path, the real photo intake, and one real worker process given three tiny models (SD 1.x "alpha" and "beta": two
seeds; SDXL "xl") that keeps one of them loaded at a time. A server's default decides /train; a concept keeps its
model, and /imagine with it runs on that model; concepts of two models are refused together; a model taken out of the
settings leaves its concepts intact and usable again once it is back."""
from __future__ import annotations

from dataclasses import replace

import pytest
import pytest_asyncio

from bot.app import Services
from bot.dispatch.worker_client import WorkerClient, worker_command
from bot.errors import UserError
from bot.services.submissions import submit_imagine, submit_training
from bot.settings import Settings
from bot.store.database import Store
from tests.bot.test_token_reservation import FAST_IMAGINE, FAST_TRAIN, make_services, noise_photos

pytestmark = pytest.mark.asyncio(loop_scope="module")

GUILD, OTHER_GUILD, CHANNEL = 111111111111111111, 222222222222222222, 5
ALICE, BOB, ADMIN = 1001, 1002, 9009


@pytest.fixture(scope="module")
def two_models(tiny_model_dir, tiny_sdxl_model_dir, tmp_path_factory) -> dict[str, str]:
    from trainer.models.tiny import make_tiny_model

    beta = make_tiny_model(tmp_path_factory.mktemp("tiny-beta"), seed=1)
    return {"alpha": str(tiny_model_dir), "beta": str(beta), "xl": str(tiny_sdxl_model_dir)}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def two_model_worker(two_models, tmp_path_factory):
    client = WorkerClient(worker_command(model=two_models["alpha"], models=two_models, resident=1,
                                         data_dir=tmp_path_factory.mktemp("wd"), device="cpu", dtype="fp32",
                                         threads=1), cancel_grace_s=10, restart_delays_s=(0.1,))
    await client.start()
    await client.wait_ready(120)
    yield client
    await client.stop()


@pytest.fixture
def settings(tmp_path, two_models):
    return replace(Settings(), data_dir=tmp_path / "data", model=two_models["alpha"],
                   models=tuple(two_models.items()), max_queued_jobs=10, trainings_per_day=10)


@pytest_asyncio.fixture(loop_scope="module")
async def services(settings, two_model_worker):
    store = await Store.open(settings.db_path)
    services = make_services(settings, store, two_model_worker)
    yield services
    await services.dispatcher.stop(grace_s=30)
    await store.close()


async def run(services: Services, job_id: int):
    while (job := await services.ledger.get(job_id)).status in ("queued", "running"):
        assert await services.dispatcher.run_next() is not None, "nothing ran"
    return job


async def train(services: Services, member: int, token: str):
    job, _ = await submit_training(services, guild_id=GUILD, member_id=member, channel_id=CHANNEL, role_ids=[],
                                   token=token, class_name="man", style=False, files=noise_photos(3, member),
                                   options=None)
    return job


async def imagine(services: Services, member: int, prompt: str, guild: int = GUILD):
    return await submit_imagine(services, guild_id=guild, member_id=member, channel_id=CHANNEL, role_ids=[],
                                prompt=prompt, **FAST_IMAGINE)


def resident(services: Services) -> set[str]:
    return {entry["name"] for entry in services.worker.models_info if entry["resident"]}


@pytest.fixture(autouse=True)
def fast_recipe(monkeypatch):
    from bot.services import submissions

    monkeypatch.setattr(submissions, "TRAIN_RECIPE", FAST_TRAIN)


async def test_the_worker_reports_every_model_with_its_family(services):
    facts = {entry["name"]: entry for entry in services.worker.models_info}
    assert {name: entry["family"] for name, entry in facts.items()} == {"alpha": "sd1", "beta": "sd1", "xl": "sdxl"}
    assert facts["alpha"]["resident"] and not facts["beta"]["resident"]
    assert all(entry["problem"] is None for entry in facts.values())


async def test_a_training_uses_the_server_default_and_its_concept_keeps_that_model(services):
    assert await services.base_models.default_for(GUILD) == "alpha"  # the bot's default until an admin chooses
    assert await services.base_models.set_default(ADMIN, GUILD, "beta") == "beta"
    assert await services.base_models.default_for(OTHER_GUILD) == "alpha"  # per server
    assert (await services.admin.audit(GUILD))[0]["action"] == "base_model"

    job = await train(services, ALICE, "zorblat")
    assert job.params["model"] == "beta"
    done = await run(services, job.id)
    assert done.status == "succeeded", done.error
    assert resident(services) == {"beta"}  # loaded for the training; alpha made room (one resident model)
    concept = await services.concepts.by_token(GUILD, "zorblat")
    assert (concept.status, concept.base_model, concept.base_family) == ("ready", "beta", "sd1")

    # The server goes back to alpha: the concept still runs on beta, and the job says why.
    await services.base_models.set_default(ADMIN, GUILD, None)
    with_concept = await imagine(services, ALICE, "a photo of zorblat")
    assert (with_concept.params["model"], with_concept.params["model_for"]) == ("beta", ["zorblat"])
    params = await services.dispatcher.worker_params(with_concept)
    assert [c["token"] for c in params["concepts"]] == ["zorblat"]
    done = await run(services, with_concept.id)
    assert done.status == "succeeded", done.error
    assert "<lora:zorblat:1>" in done.result["parameters"]
    assert resident(services) == {"beta"}
    plain = await imagine(services, ALICE, "a red fox")
    assert plain.params["model"] == "alpha" and "model_for" not in plain.params
    assert (await run(services, plain.id)).status == "succeeded"
    assert resident(services) == {"alpha"}  # evicted and loaded as the jobs need them


async def test_imagine_jobs_of_different_models_never_share_a_denoising_loop():
    from bot.jobs.kinds import imagine_batch_key

    options = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64}
    assert imagine_batch_key({**options, "model": "alpha"}) == imagine_batch_key({**options, "model": "alpha"})
    assert imagine_batch_key({**options, "model": "alpha"}) != imagine_batch_key({**options, "model": "beta"})


async def test_a_training_on_the_sdxl_model_records_its_family(services):
    await services.base_models.set_default(ADMIN, GUILD, "xl")
    job = await train(services, BOB, "grelvin")
    assert job.params["model"] == "xl"
    done = await run(services, job.id)
    assert done.status == "succeeded", done.error
    assert resident(services) == {"xl"}
    concept = await services.concepts.by_token(GUILD, "grelvin")
    assert (concept.status, concept.base_model, concept.base_family) == ("ready", "xl", "sdxl")


async def test_concepts_of_different_models_in_one_prompt_are_refused_naming_each(services):
    sd1 = await services.concepts.create(GUILD, BOB, "quillop", "dog", base_model="alpha", base_family="sd1")
    await services.concepts.mark_ready(sd1.id, str(services.concepts.concept_dir(sd1.id) / "lora.safetensors"), None)
    xl = await services.concepts.create(GUILD, BOB, "vexmor", "cat", base_model="xl", base_family="sdxl")
    await services.concepts.mark_ready(xl.id, str(services.concepts.concept_dir(xl.id) / "lora.safetensors"), None)
    beta = await services.concepts.create(GUILD, BOB, "tarnol", "cat", base_model="beta", base_family="sd1")
    await services.concepts.mark_ready(beta.id, str(services.concepts.concept_dir(beta.id) / "l.safetensors"), None)
    with pytest.raises(UserError) as refused:
        await imagine(services, BOB, "quillop and vexmor on a beach")
    text = str(refused.value)
    assert "different base models" in text
    assert "quillop on alpha (Stable Diffusion 1.x)" in text and "vexmor on xl (SDXL)" in text
    with pytest.raises(UserError, match=r"quillop on alpha \(Stable Diffusion 1\.x\); tarnol on beta"):
        await imagine(services, BOB, "quillop and tarnol")  # one family, two models: refused as well
    assert await services.ledger.list_jobs(guild_id=GUILD, owner_id=BOB) == []


async def test_a_model_taken_out_of_the_settings_loses_nothing(services, settings):
    concept = await services.concepts.create(GUILD, BOB, "plindor", "dog", base_model="beta", base_family="sd1")
    await services.concepts.mark_ready(concept.id, str(services.concepts.concept_dir(concept.id) / "l.safetensors"),
                                       None)
    queued = await imagine(services, BOB, "plindor in the snow")
    without_beta = make_services(replace(settings, models=(("alpha", settings.model),)), services.store,
                                 services.worker)
    with pytest.raises(UserError, match=r"plindor was trained on the base model beta, which this bot does not offer "
                                        r"right now\. Nothing is lost"):
        await imagine(without_beta, BOB, "plindor in the snow")
    with pytest.raises(UserError, match="needs the base model beta, which this bot no longer offers"):
        await without_beta.dispatcher.worker_params(queued)  # a job queued before: failed with that, not a crash
    assert (await without_beta.concepts.get(concept.id)).status == "ready"  # the concept stays
    assert (await imagine(services, BOB, "plindor in the snow")).params["model"] == "beta"  # back: works again


async def test_a_server_default_removed_from_the_settings_falls_back_to_the_bots(services, settings):
    await services.base_models.set_default(ADMIN, OTHER_GUILD, "beta")
    without_beta = make_services(replace(settings, models=(("alpha", settings.model),)), services.store,
                                 services.worker)
    assert await without_beta.base_models.default_for(OTHER_GUILD) == "alpha"
    with pytest.raises(UserError, match="no base model called gamma; it has alpha, beta"):
        await services.base_models.set_default(ADMIN, GUILD, "gamma")
