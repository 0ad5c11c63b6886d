"""The worker interface the dispatcher's lanes use (bot/dispatch/worker_api.py), as the local subprocess provides it."""
from bot.dispatch.worker_api import GpuWorker
from bot.dispatch.worker_client import WorkerClient, worker_command


def test_the_local_subprocess_worker_is_a_gpu_worker_named_after_its_device(tmp_path):
    worker = WorkerClient(worker_command(model=None, data_dir=tmp_path, device="cuda:1"))
    assert isinstance(worker, GpuWorker)
    assert worker.label == "cuda:1"
    assert WorkerClient(["python", "-m", "trainer", "worker"]).label == "auto"
    assert WorkerClient(["x"], label="spare").label == "spare"
