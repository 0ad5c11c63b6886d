"""Photo intake in a process of its own: the request and answer files, and the child's side (`python -m
trainer.intake WORK_DIR/request.json`).

The bot (bot/services/photo_intake.py) saves the uploads under names of its own in a work directory, writes the
request beside them and starts the child, which caps its address space before loading NumPy, PIL or OpenCV, runs
`intake_photos` and leaves the accepted photos (photos/NNN.png), the report (report.json) and the thumbnails
(accepted.jpg) there. Whatever an upload does to the child's memory, the bot process never holds it.
This module itself imports only the standard library, so the bot can import it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REQUEST = "request.json"
REPORT = "report.json"
CONTACT_SHEET = "accepted.jpg"
PHOTOS = "photos"
OUT_OF_MEMORY = 3  # the child's exit status when even the cleanup after a MemoryError failed
CANNOT_START = 4  # the libraries did not load (the address-space limit is too low for them)


def write_request(work_dir: Path, files: list[tuple[str, Path]], *, limits: dict, class_name: str, style: bool,
                  memory_mb: int) -> Path:
    """`files`: (name shown to the member, path of the saved upload)."""
    path = work_dir / REQUEST
    path.write_text(json.dumps({"files": [[name, str(file)] for name, file in files], "limits": limits,
                                "class_name": class_name, "style": style, "memory_mb": memory_mb}))
    return path


def main(argv: list[str]) -> int:
    request_path = Path(argv[0])
    work_dir = request_path.parent
    request = json.loads(request_path.read_text())
    from trainer.intake.address_space import limit_address_space

    limit_address_space(int(request["memory_mb"]))
    try:  # now, so that a limit too low to hold the libraries fails here and is told apart from a photo's failure
        import cv2  # noqa: F401
        import numpy  # noqa: F401
        import PIL.Image  # noqa: F401
    except ImportError as why:
        print(f"intake: the libraries do not load within {request['memory_mb']} MB of address space: {why}",
              file=sys.stderr)
        return CANNOT_START
    try:
        from trainer.contract.files import write_bytes_atomic, write_text_atomic
        from trainer.intake.contact_sheet import contact_sheet
        from trainer.intake.photos import IntakeLimits, intake_photos

        report = intake_photos([(name, Path(file)) for name, file in request["files"]], work_dir / PHOTOS,
                               limits=IntakeLimits(**request["limits"]), class_name=request["class_name"],
                               style=bool(request["style"]))
        sheet = contact_sheet([photo.image for photo in report.accepted][:30])
        if sheet is not None:
            write_bytes_atomic(work_dir / CONTACT_SHEET, sheet)
        write_text_atomic(work_dir / REPORT, json.dumps(report.to_dict()))
    except MemoryError:
        return OUT_OF_MEMORY
    return 0
