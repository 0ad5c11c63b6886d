"""submit_imagine: each job carries its server's safety choice, and what depends on the loaded model (the sizes it can
make, whether it has a safety checker) is checked at submit with what the worker reported when it became ready."""
from __future__ import annotations

import pytest

from bot.app import Services
from bot.dispatch.dispatcher import Dispatcher
from bot.dispatch.worker_client import WorkerClient
from bot.services.submissions import submit_imagine
from trainer.contract.errors import UserError
from trainer.contract.imagine_request import NO_SAFETY_CHECKER

GUILD, OTHER_GUILD, CHANNEL = 111111111111111111, 222222222222222222, 333333333333333333
ADMIN, MEMBER = 9009, 1001
TINY_READY = {"event": "ready", "native_side": 64, "safety_checker": False}
SD15_READY = {"event": "ready", "native_side": 512, "safety_checker": True}
SDXL_READY = {"event": "ready", "native_side": 1024, "safety_checker": False, "family": "sdxl"}


@pytest.fixture
def services(settings, store, ledger, concepts, gallery, admin):
    worker = WorkerClient(["never-started"])  # its ready_info is what a test sets
    dispatcher = Dispatcher(settings, ledger, concepts, gallery, worker)
    return Services(settings, store, ledger, concepts, gallery, admin, worker, dispatcher)


async def imagine(services, guild=GUILD, **options):
    return await submit_imagine(services, guild_id=guild, member_id=MEMBER, channel_id=CHANNEL, role_ids=[],
                                prompt="a red fox", **options)


async def test_the_server_safety_choice_goes_into_each_jobs_params(services):
    services.worker.ready_info = SD15_READY
    assert (await imagine(services)).params["safety"] is False  # BOOTHBOT_SAFETY's default
    await services.admin.set_safety(ADMIN, GUILD, True)
    assert (await imagine(services)).params["safety"] is True
    assert (await imagine(services, OTHER_GUILD)).params["safety"] is False  # per server
    await services.admin.set_safety(ADMIN, GUILD, False)
    assert (await imagine(services)).params["safety"] is False


async def test_safety_on_is_refused_at_submit_when_the_model_has_no_checker(services):
    services.worker.ready_info = TINY_READY
    await services.admin.set_safety(ADMIN, GUILD, True)
    with pytest.raises(UserError) as refused:
        await imagine(services)
    assert str(refused.value) == NO_SAFETY_CHECKER
    assert (await imagine(services, OTHER_GUILD)).params["safety"] is False


async def test_a_size_the_loaded_model_cannot_make_is_refused_at_submit(services):
    services.worker.ready_info = TINY_READY
    with pytest.raises(UserError, match=r"512×768 is not a size this model can make.*from 64 to 128 px"):
        await imagine(services, width=512, height=768)
    assert (await imagine(services, width=128, height=64)).params["width"] == 128
    services.worker.ready_info = SD15_READY
    with pytest.raises(UserError, match=r"from 256 to 1024 px\. Of the offered sizes these fit: square 512×512"):
        await imagine(services, width=2048, height=512)
    assert (await imagine(services, width=512, height=768)).params["height"] == 768


async def test_before_the_worker_was_ever_ready_the_worker_checks_the_size(services):
    assert services.worker.ready_info is None
    assert (await imagine(services, width=1024, height=1024)).status == "queued"


async def test_a_shape_becomes_the_loaded_familys_size(services):
    services.worker.ready_info = {**SD15_READY, "family": "sd1"}
    job = await imagine(services, size="portrait")
    assert (job.params["width"], job.params["height"]) == (512, 768) and "size" not in job.params
    services.worker.ready_info = SDXL_READY
    job = await imagine(services, size="portrait")
    assert (job.params["width"], job.params["height"]) == (896, 1152)
    assert (await imagine(services, size="very_wide")).params["width"] == 1344


async def test_a_shape_the_family_does_not_offer_is_refused_with_the_ones_it_does(services):
    services.worker.ready_info = {**SD15_READY, "family": "sd1"}
    with pytest.raises(UserError, match=r"The tall shape is not a size Stable Diffusion 1\.x models offer\. Pick one "
                                        r"of: square 512×512, portrait 512×768, landscape 768×512\."):
        await imagine(services, size="tall")
    services.worker.ready_info = SDXL_READY
    with pytest.raises(UserError, match=r"256×256 is not a size this model can make.*from 512 to 2048 px\. Of the "
                                        r"offered sizes these fit: square 1024×1024, portrait 896×1152"):
        await imagine(services, width=256, height=256)


async def test_before_any_worker_was_ready_the_shape_travels_to_the_worker(services):
    assert services.worker.ready_info is None
    job = await imagine(services, size="wide")
    assert job.params["size"] == "wide" and "width" not in job.params
