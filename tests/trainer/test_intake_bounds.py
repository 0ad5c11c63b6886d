"""Intake's memory bounds, checked before and while decoding: decoded size from the header, 16-bit photos converted
without full-size float copies, zips measured from their central directory before zipfile parses it. The whole
hostile corpus, through the bot, is tests/bot/test_intake_memory.py."""
from __future__ import annotations

import struct
import tracemalloc

import numpy as np

from tests.trainer.hostile import many_entries_zip, png_streamed
from trainer.intake.photos import IntakeLimits, intake_photos

ONE = IntakeLimits(min_photos=1)


def test_a_photo_is_refused_by_its_decoded_size_before_it_is_decoded(tmp_path):
    png_streamed(tmp_path / "alpha.png", 6000, 6000, 8, 6, lambda y: bytes(24000))  # RGBA zeros: 140 KB on disk
    report = intake_photos([tmp_path / "alpha.png"], limits=ONE, class_name="toy")
    assert dict(report.rejected) == {"alpha.png": "is 6000×6000 pixels at 4 × 8-bit channels: 137.3 MB once opened; "
                                                  "the most is 128.0 MB. Send it as an ordinary JPEG, or smaller"}


def test_a_sixteen_bit_giant_is_converted_in_strips_and_scaled_by_depth(tmp_path):
    # 40 megapixels of 16-bit grey, 100 KB on disk; rows get brighter downwards (row y holds y × 10).
    png_streamed(tmp_path / "deep.png", 6300, 6300, 16, 0, lambda y: struct.pack(">H", y * 10) * 6300)
    tracemalloc.start()  # NumPy reports its arrays to tracemalloc (PIL's own buffers are not counted)
    try:
        report = intake_photos([tmp_path / "deep.png"], limits=ONE, class_name="toy")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The 16-bit samples (79 MB) and the 8-bit result (40 MB) once each; a float64 copy alone would be 318 MB.
    assert peak < 160 * 2**20, f"{peak / 2**20:.0f} MB"
    (photo,) = report.accepted
    assert photo.image.size == (512, 512)
    column = np.asarray(photo.image.convert("L"))[:, 256].astype(int)
    assert column[0] < column[-1] and abs(column[-1] - round(6299 * 10 / 65535 * 255)) <= 2


def test_a_zip_whose_end_record_lies_is_measured_from_its_central_directory(tmp_path):
    many_entries_zip(tmp_path / "many.zip", 100_000, claimed=1, zip64=True)  # 4.5 MB of directory, "1 entry"
    report = intake_photos([tmp_path / "many.zip"], limits=ONE, class_name="toy")
    assert dict(report.rejected) == {"many.zip": "has a list of contents of 4.5 MB, far more than a zip of 200 photos "
                                                 "needs; zip just the photos and resend"}
    for zip64 in (False, True):
        many_entries_zip(tmp_path / "few.zip", 300, claimed=1, zip64=zip64)  # small enough to walk: counted
        report = intake_photos([tmp_path / "few.zip"], limits=ONE, class_name="toy")
        assert dict(report.rejected) == {"few.zip": "holds 300 files; the most is 200"}

