"""submit_training prepares the photos at the loaded model's own size (from the worker's ready event): 1024 px for
SDXL, 512 px for SD 1.x and whenever the model is not known yet."""
from __future__ import annotations

from dataclasses import replace

import pytest
from PIL import Image

from bot.app import Services
from bot.dispatch.dispatcher import Dispatcher
from bot.dispatch.worker_client import WorkerClient
from bot.services.submissions import submit_training
from trainer.models.tiny import write_sample_photos

GUILD, CHANNEL, MEMBER = 111111111111111111, 333333333333333333, 1001


@pytest.fixture
def services(settings, store, ledger, concepts, gallery, admin, tiny_model_dir):
    settings = replace(settings, model=str(tiny_model_dir), min_photos=3)  # the token check reads its tokenizer
    worker = WorkerClient(["never-started"])  # its ready_info is what a test sets
    return Services(settings, store, ledger, concepts, gallery, admin, worker,
                    Dispatcher(settings, ledger, concepts, gallery, worker))


def photos(directory, side: int = 1300) -> list[tuple[str, object]]:
    """Three made-up photos larger than any model's side, different enough for intake's duplicate check."""
    write_sample_photos(directory, count=3, size=side)
    return [(path.name, path) for path in sorted(directory.iterdir())]


@pytest.mark.parametrize("ready, side", [
    ({"event": "ready", "native_side": 1024, "family": "sdxl"}, 1024),
    ({"event": "ready", "native_side": 512, "family": "sd1"}, 512),
    (None, 512),
])
async def test_photos_are_prepared_at_the_models_own_size(services, ready, side, tmp_path):
    services.worker.ready_info = ready
    job, report = await submit_training(services, guild_id=GUILD, member_id=MEMBER, channel_id=CHANNEL, role_ids=[],
                                        token="squidarth", class_name="dog", style=False,
                                        files=photos(tmp_path / "uploads"))
    assert report.ok
    saved = sorted((services.concepts.concept_dir(job.params["concept_id"]) / "photos").glob("*.png"))
    assert len(saved) == 3
    assert {Image.open(path).size for path in saved} == {(side, side)}
