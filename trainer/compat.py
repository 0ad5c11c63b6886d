"""Do the installed torch, diffusers, transformers and peft work together? Asked at worker start and by `bot check`.

Version numbers alone cannot answer it (transformers 5.24 refuses peft 0.21, which every earlier 5.x accepted), so
the probe does the real thing on a tiny random model on the CPU: a one-step LoRA training of the UNet and the text
encoder, its files saved, then one image generated with that LoRA loaded back. A failure is explained in one line a
newcomer can act on; the traceback stays available for the log.
"""
from __future__ import annotations

import contextlib
import json
import re
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from trainer.contract.files import write_text_atomic

STACK = ("torch", "diffusers", "transformers", "peft", "accelerate", "huggingface-hub")
REPO_ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO_ROOT / "constraints.txt"
_NEEDS_PEFT = re.compile(r"version of PEFT .*? not compatible, please use a version >= ?([0-9][\w.]*)", re.I | re.S)


@dataclass
class StackReport:
    versions: dict[str, str]
    seconds: float = 0.0
    problem: str | None = None  # one line for a person; None when the probe passed
    detail: str = ""            # the traceback, for the log
    out_of_range: list[str] = field(default_factory=list)  # "transformers 5.24.0 (tested: >=5.17,<5.24)"

    @property
    def ok(self) -> bool:
        return self.problem is None

    def describe_versions(self) -> str:
        return describe_versions(self.versions)


def describe_versions(versions: dict[str, str]) -> str:
    return ", ".join(f"{name} {version}" for name, version in versions.items())


def installed_versions() -> dict[str, str]:
    versions = {}
    for name in STACK:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def out_of_tested_range(versions: dict[str, str]) -> list[str]:
    """Installed packages outside the ranges boothbot declares (empty when boothbot itself is not installed)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        declared = metadata.requires("boothbot") or []
    except metadata.PackageNotFoundError:
        return []
    ranges = {}
    for line in declared:
        requirement = Requirement(line)
        if requirement.marker is None:
            ranges[canonicalize_name(requirement.name)] = requirement.specifier
    outside = []
    for name, version in versions.items():
        specifier = ranges.get(canonicalize_name(name))
        if specifier is not None and version != "not installed" and not specifier.contains(version, prereleases=True):
            outside.append(f"{name} {version} (tested: {specifier})")
    return outside


def install_hint() -> str:
    if CONSTRAINTS.is_file():
        return f"install the tested versions: cd {REPO_ROOT} && python3 -m pip install -c constraints.txt -e ."
    return "install the versions boothbot was tested with (see its README)"


def explain(exc: BaseException, versions: dict[str, str]) -> str:
    """One line that says which packages disagree and what to run."""
    text = str(exc)
    needs_peft = _NEEDS_PEFT.search(text)
    if needs_peft:
        return (f"installed transformers {versions['transformers']} needs peft >= {needs_peft.group(1)} "
                f"(installed: peft {versions['peft']}); {install_hint()}")
    if isinstance(exc, ImportError):
        return f"a package LoRA training needs cannot be imported ({text}); {install_hint()}"
    first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return (f"LoRA training does not work with the installed packages ({describe_versions(versions)}): "
            f"{type(exc).__name__}: {first_line}; {install_hint()}")


def check_stack(stamp: Path | None = None) -> StackReport:
    """Run the probe; never raises for a broken stack (that is what it reports).

    `stamp`: a file recording the versions of the last probe that passed; when they are still installed the probe
    is skipped (worker restarts then cost nothing) and the report says so with `seconds` 0.
    """
    report = StackReport(installed_versions())
    if stamp is not None and _read_stamp(stamp) == report.versions:
        return report
    report.out_of_range = out_of_tested_range(report.versions)
    started = time.perf_counter()
    try:
        train_and_load_tiny_lora()
    except Exception as exc:  # noqa: BLE001 - any failure here means the stack cannot train
        report.problem = explain(exc, report.versions)
        report.detail = "".join(traceback.format_exception(exc))
    report.seconds = time.perf_counter() - started
    if stamp is not None and report.ok:
        _write_stamp(stamp, report.versions)
    return report


def _read_stamp(stamp: Path) -> dict | None:
    try:
        return json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_stamp(stamp: Path, versions: dict[str, str]) -> None:
    with contextlib.suppress(OSError):  # only a cache: the next start probes again
        write_text_atomic(stamp, json.dumps(versions))


def train_and_load_tiny_lora() -> None:
    """A one-step LoRA training (UNet + text encoder) on a tiny CPU model, then one image with the saved LoRA."""
    import numpy as np
    from PIL import Image

    from trainer.generation.service import GenerationService
    from trainer.contract.imagine_request import ImagineRequest
    from trainer.contract.prompts import ConceptSpec
    from trainer.models.tiny import build_tiny_pipeline
    from trainer.training.engine import TrainSpec, train_concept

    with tempfile.TemporaryDirectory(prefix="boothbot-compat-") as tmp:
        root = Path(tmp)
        photos = root / "photos"
        photos.mkdir()
        for i in range(3):
            Image.fromarray(np.full((64, 64, 3), (40 * i, 120, 200), np.uint8)).save(photos / f"{i}.png")
        pipe = build_tiny_pipeline()
        spec = TrainSpec(concept_id="compat", token="zxqv", class_name="man", photos_dir=photos,
                         out_dir=root / "concept", steps=1, rank=2, resolution=32, prior_preservation=False,
                         sample_count=0, train_text_encoder=True, cuda_graphs=False, base_model="tiny")
        outcome = train_concept(pipe, spec, cache_dir=root / "cache")
        if outcome.status != "done":
            raise RuntimeError(f"the probe's training ended {outcome.status}")
        concept = ConceptSpec("compat", "zxqv", "man", outcome.result["lora"])
        request = ImagineRequest("a photo of zxqv man", root / "images", seed=0, steps=1, width=64, height=64,
                                 count=1, concepts=(concept,))
        GenerationService(pipe, model_name="tiny").imagine(request)
