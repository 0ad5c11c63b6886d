"""`python -m trainer train` on the tiny model: intake report first, a progress bar, the outputs; non-zero exit when
nothing usable is left."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT
from trainer.__main__ import main
from trainer.training.lora_files import read_metadata
from trainer.generation.pnginfo import parse_parameters, read_png_parameters
from trainer.cli.train import ProgressBar
from trainer.training.engine import TrainProgress


def _photos(directory, count=3, size=320):
    directory.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(directory / f"p{i}.png")
    return directory


def _args(photos, out, tiny_model_dir, cache):
    return ["train", "--photos", str(photos), "--token", "squidarth", "--class", "man", "--out", str(out),
            "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32", "--steps", "2", "--rank", "4",
            "--resolution", "32", "--no-prior", "--cache-dir", str(cache)]


@pytest.fixture(scope="module")
def cli_training(tiny_model_dir, tmp_path_factory):
    """`python -m trainer train` run once as a person runs it, class images included: (out dir, completed process)."""
    tmp_path = tmp_path_factory.mktemp("train-cli")
    out = tmp_path / "out"
    args = _args(_photos(tmp_path / "photos"), out, tiny_model_dir, tmp_path / "cache")
    args.remove("--no-prior")
    done = subprocess.run([sys.executable, "-m", "trainer", *args, "--class-images", "3"], cwd=REPO_ROOT,
                          capture_output=True, timeout=600)  # bytes: text mode would turn the bar's \r into \n
    done.stdout, done.stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_cli_stderr_shows_one_bar_per_stage_and_no_library_noise(cli_training):
    stderr = cli_training[1].stderr
    lines = stderr.split("\n")
    assert len(lines) == 4 and lines[-1] == "", stderr  # class images, training, samples
    stages = [r"class images \[[#-]{30}\] \d/3(  ETA \d+ s)?", r"\[[#-]{30}\] \d/2  loss \d\.\d{4}  ETA \d+ s",
              r"making 4 sample images"]
    for line, pattern in zip(lines, stages):
        draws = [draw.strip() for draw in line.split("\r")[1:]]
        assert draws and all(re.fullmatch(pattern, draw) for draw in draws), line
    assert lines[0].rstrip().endswith("3/3  ETA 0 s") and "ETA" in lines[0]


def test_cli_samples_carry_the_a1111_parameters(cli_training, tiny_model_dir):
    samples = sorted((cli_training[0] / "samples").glob("*.png"))
    infos = [parse_parameters(read_png_parameters(path)) for path in samples]
    assert [info["Seed"] for info in infos] == ["0", "1", "2", "3"]
    assert all(info["Prompt"] == "a photo of squidarth man <lora:squidarth:1>" and info["Size"] == "32x32"
               and info["Model"] == tiny_model_dir.name and info["Lora hashes"].startswith("squidarth: ")
               for info in infos)


def test_cli_seconds_are_the_lora_metadata_seconds(cli_training):
    out, done = cli_training
    printed = re.search(r"^trained in (\d+\.\d) s \(2 steps\), then 4 samples in \d+\.\d s$", done.stdout, re.M)
    assert printed, done.stdout
    assert printed.group(1) == read_metadata(out / "lora.safetensors")["boothbot.seconds"]


def test_cli_training_leaves_its_result_and_no_checkpoint(cli_training):
    out = cli_training[0]
    assert not (out / "checkpoint").exists() and (out / "training.json").is_file()


def test_cli_trains_and_prints_where_the_files_are(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(_args(_photos(tmp_path / "photos"), out, tiny_model_dir, tmp_path / "cache"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / "lora.safetensors").is_file() and (out / "lora_kohya.safetensors").is_file()
    assert len(list((out / "samples").glob("*.png"))) == 4
    assert str(out / "lora_kohya.safetensors") in captured.out
    assert "2/2" in captured.err  # the progress bar's last state


def test_cli_exits_non_zero_when_no_photo_is_usable(tiny_model_dir, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.png").write_text("not a picture at all")
    code = main(_args(photos, tmp_path / "out", tiny_model_dir, tmp_path / "cache"))
    captured = capsys.readouterr()
    assert code != 0
    assert "photo" in (captured.out + captured.err).lower()
    assert not (tmp_path / "out" / "lora.safetensors").exists()


def test_progress_bar_line():
    class Stream:
        text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    stream = Stream()
    ProgressBar(stream, width=10)(TrainProgress(step=5, total=10, eta_s=75, loss=0.1234))
    assert stream.text.strip() == "[#####-----] 5/10  loss 0.1234  ETA 1 min"

    stream = Stream()
    bar = ProgressBar(stream, width=10)
    bar(TrainProgress(step=2, total=4, eta_s=3, loss=None, stage="class_images", detail="making class images 2/4"))
    bar(TrainProgress(step=1, total=10, eta_s=9, loss=0.5))
    bar(TrainProgress(step=10, total=10, eta_s=None, loss=None, stage="samples", detail="making 4 sample images"))
    bar.finish()
    lines = [line.split("\r")[-1].strip() for line in stream.text.split("\n")]
    assert lines == ["class images [#####-----] 2/4  ETA 3 s", "[#---------] 1/10  loss 0.5000  ETA 9 s",
                     "making 4 sample images", ""]


def test_cli_flags_come_from_the_spec_options():
    from trainer.__main__ import build_parser
    from trainer.contract.train_spec import TRAIN_OPTIONS

    base = ["train", "--photos", "P", "--token", "squidarth", "--class", "man", "--out", "O"]
    defaults = build_parser().parse_args(base)
    flagged = {name for name, rules in TRAIN_OPTIONS.items() if rules.cli}
    assert flagged == {"style", "steps", "seed", "slice_s", "train_text_encoder", "rank", "learning_rate",
                       "batch_size", "resolution", "prior_preservation", "class_images", "class_image_steps"}
    assert {name: getattr(defaults, name) for name in ("steps", "seed", "rank", "prior_preservation", "style")} == {
        "steps": None, "seed": 0, "rank": 16, "prior_preservation": None, "style": False}
    args = build_parser().parse_args([*base, "--lr", "0.001", "--no-prior", "--no-text-encoder", "--style",
                                      "--class-images", "7", "--slice-s", "2.5"])
    assert (args.learning_rate, args.prior_preservation, args.train_text_encoder, args.style, args.class_images,
            args.slice_s) == (0.001, False, False, True, 7, 2.5)
