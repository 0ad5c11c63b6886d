"""Photo intake against a corpus of bad and odd inputs, each made here with PIL/zipfile, with the verdict expected."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from photos import face_photo, make_photo_set, photo, photo_pixels, zip_of
from trainer.contract.errors import UserError
from trainer.intake.photos import IntakeLimits, crop_box_around, intake_photos
from trainer.contract.naming import class_kind, instance_prompt, normalise_class

GOOD = make_photo_set(3, first_seed=100)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height but whose data is a few bytes: decoding it would be a bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def animated(fmt: str) -> bytes:
    frames = [Image.fromarray(photo_pixels(seed)) for seed in (1, 2, 3)]
    if fmt == "GIF":  # palette frames up front: PIL's own GIF quantising of noisy frames takes seconds
        frames = [frame.convert("P") for frame in frames]
    out = io.BytesIO()
    frames[0].save(out, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


def exif_rotated() -> bytes:
    """A 400×300 landscape JPEG whose EXIF says: rotate 90° clockwise to view (orientation 6)."""
    image = Image.fromarray(photo_pixels(7, (400, 300)))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif.tobytes(), quality=95)
    return out.getvalue()


def sixteen_bit_png() -> bytes:
    ramp = (np.linspace(0, 65535, 320 * 320).reshape(320, 320)).astype(np.uint16)
    out = io.BytesIO()
    image = Image.fromarray(ramp)  # uint16 → mode I;16
    assert image.mode == "I;16"
    image.save(out, "PNG")
    return out.getvalue()


def transparent(mode: str) -> bytes:
    image = Image.fromarray(photo_pixels(9)).convert("RGBA")
    alpha = np.zeros((320, 320), np.uint8)
    alpha[:, 160:] = 255
    image.putalpha(Image.fromarray(alpha))
    if mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = 0
    elif mode != "RGBA":
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def lying_zip(real_size: int, claimed: int) -> bytes:
    """A zip whose entry unpacks to real_size bytes but whose headers claim `claimed`."""
    data = zip_of([("bomb.png", b"\0" * real_size)])
    real, fake = struct.pack("<I", real_size), struct.pack("<I", claimed)
    return data.replace(real, fake)


def mpo() -> bytes:
    """A phone-style JPEG with a second picture inside (PIL calls it MPO): a photo, not an animation."""
    out = io.BytesIO()
    first, second = (Image.fromarray(photo_pixels(seed)) for seed in (51, 52))
    first.save(out, "MPO", save_all=True, append_images=[second])
    return out.getvalue()


SMALL_LIMITS = IntakeLimits(max_photo_bytes=2 * 1024 * 1024, max_unpacked_bytes=8 * 1024 * 1024, max_zip_entries=40)

# (name in the report, bytes, words the verdict must contain; None = accepted)
CORPUS = [
    ("truncated.jpg", photo(1, fmt="JPEG")[:3000], "damaged or incomplete"),
    ("zero.jpg", b"", "empty file"),
    ("notes.png", b"just some text, not an image\n" * 10, "not a photo"),
    ("bomb.png", png_claiming(30000, 30000), "megapixels"),
    ("anim.gif", animated("GIF"), "GIF file"),
    ("tiny.png", photo(2, (16, 16)), "too small (16×16)"),
    ("thin.png", photo(3, (1000, 200)), "too small (1000×200)"),
    ("picture.bmp", photo(4, fmt="BMP"), "BMP file"),
    ("scan.tiff", photo(5, fmt="TIFF"), "TIFF file"),
    ("huge.png", photo(6, (1200, 1200), compress_level=0) + b"\0" * (2 * 1024 * 1024), "the most is 2.0 MB"),
    ("iphone.heic", b"\0\0\0\x18ftypheic" + b"\0" * 200, "HEIC"),
    ("pk.zip", b"PK\x03\x04" + b"garbage" * 50, "damaged zip"),
    ("cmyk.jpg", photo(10, fmt="JPEG", mode="CMYK"), None),
    ("deep.png", sixteen_bit_png(), None),
    ("rotated.jpg", exif_rotated(), None),
    ("rgba.png", transparent("RGBA"), None),
    ("palette.png", transparent("P"), None),
    ("la.png", transparent("LA"), None),
    ("grey.png", photo(11, mode="L"), None),
    ("moving.webp", animated("WEBP"), None),
    ("named-wrong.png", photo(12, fmt="JPEG"), None),
    ("holiday.jpg", zip_of(make_photo_set(1, first_seed=60)), "zip file under another name"),
    ("big-header.png", png_claiming(8000, 6000), "8000×6000 pixels; the most is 40 megapixels"),
    ("moving.png", animated("PNG"), None),
    ("phone.jpg", mpo(), None),
]


@pytest.mark.parametrize("name,data,verdict", CORPUS, ids=[c[0] for c in CORPUS])
def test_each_input_gets_its_verdict(name, data, verdict):
    report = intake_photos(GOOD + [(name, data)], limits=SMALL_LIMITS, class_name="toy")
    rejected = dict(report.rejected)
    if verdict is None:
        assert name not in rejected, rejected.get(name)
        prepared = next(p for p in report.accepted if p.source == name)
        assert prepared.image.mode == "RGB" and prepared.image.size == (512, 512)
    else:
        assert verdict in rejected[name], rejected
        assert name in report.summary()
    assert len(report.accepted) == len(GOOD) + (verdict is None)


def test_exif_orientation_is_applied_not_just_accepted():
    report = intake_photos([("rotated.jpg", exif_rotated())], limits=IntakeLimits(min_photos=1, resolution=300),
                           class_name="toy")
    # The stored 400×300 landscape becomes a 300×400 portrait; its top rows are the stored image's left column.
    stored = photo_pixels(7, (400, 300)).astype(float)
    prepared = np.asarray(report.accepted[0].image, dtype=float)
    upright = np.rot90(stored, k=-1)  # EXIF 6: rotate 90° clockwise
    top = (upright.shape[0] - 300) // 2
    rotated_error = np.abs(prepared - upright[top:top + 300]).mean()
    unrotated_error = np.abs(prepared - stored[:, 50:350]).mean()
    assert rotated_error < 15 and unrotated_error > 2 * rotated_error


def test_sixteen_bit_is_scaled_not_clipped_to_white():
    report = intake_photos([("deep.png", sixteen_bit_png())], limits=IntakeLimits(min_photos=1), class_name="toy")
    pixels = np.asarray(report.accepted[0].image)
    assert pixels.min() < 20 and pixels.max() > 235 and 100 < pixels.mean() < 155


def test_transparency_becomes_white():
    report = intake_photos([("rgba.png", transparent("RGBA"))], limits=IntakeLimits(min_photos=1), class_name="toy")
    left = np.asarray(report.accepted[0].image)[:, :200]
    assert left.min() > 250


def test_exact_and_near_duplicates_are_dropped_with_a_note():
    original = photo(20)
    near = io.BytesIO()
    Image.open(io.BytesIO(original)).resize((300, 300)).save(near, "JPEG", quality=80)
    report = intake_photos(GOOD + [("a.png", original), ("a-copy.png", original), ("a-small.jpg", near.getvalue())],
                           class_name="toy")
    rejected = dict(report.rejected)
    assert "same photo as `a.png`" in rejected["a-copy.png"]
    assert "copy of `a.png`" in rejected["a-small.jpg"]
    assert len(report.accepted) == 4


def test_too_many_photos_keeps_the_first_ones_and_says_so():
    report = intake_photos(make_photo_set(8, size=260), limits=IntakeLimits(max_photos=5), class_name="toy")
    assert len(report.accepted) == 5
    assert [name for name, _ in report.rejected] == ["photo5.png", "photo6.png", "photo7.png"]
    assert all("only the first 5" in reason for _, reason in report.rejected)


def test_too_few_usable_photos_is_not_ok_and_says_what_to_do():
    report = intake_photos(make_photo_set(2) + [("bad.png", b"nope")], class_name="man")
    assert not report.ok
    assert "At least 3 usable photos are needed" in report.summary()


@pytest.mark.parametrize("entries,links,verdict", [
    ([("../evil.png", photo(30))], (), "outside the zip"),
    ([("/etc/evil.png", photo(31))], (), "outside the zip"),
    ([("C:/evil.png", photo(32))], (), "outside the zip"),
    ([("link.png", b"/etc/passwd")], ("link.png",), "is a link"),
    ([("inner.zip", zip_of([("x.png", photo(33))]))], (), "zip inside the zip"),
])
def test_hostile_zip_entries_are_not_unpacked(entries, links, verdict):
    report = intake_photos([("set.zip", zip_of(GOOD + entries, links))], class_name="toy")
    assert any(verdict in reason for _, reason in report.rejected), report.rejected
    assert len(report.accepted) == 3


def test_zip_bomb_is_refused_from_its_headers():
    bomb = zip_of([(f"{i}.png", b"\0" * (3 * 1024 * 1024)) for i in range(2)])
    report = intake_photos([("bomb.zip", bomb)], limits=SMALL_LIMITS, class_name="toy")
    assert all("the most is 2.0 MB" in reason for _, reason in report.rejected) and not report.accepted
    total_bomb = zip_of([(f"{i}.png", b"\0" * (1900 * 1024)) for i in range(6)])
    report = intake_photos([("bomb.zip", total_bomb)], limits=SMALL_LIMITS, class_name="toy")
    assert "unpacks to" in dict(report.rejected)["bomb.zip"]


def test_several_zips_share_one_unpacking_budget():
    # Each zip alone fits the 8 MB budget (4 × 1.9 MB); three of them together must not unpack 22 MB into memory.
    small_bomb = zip_of([(f"{i}.png", b"\0" * (1900 * 1024)) for i in range(4)])
    report = intake_photos([(f"bomb{i}.zip", small_bomb) for i in range(3)], limits=SMALL_LIMITS, class_name="toy")
    rejected = dict(report.rejected)
    assert "bomb0.zip" not in rejected and "unpacks to" in rejected["bomb2.zip"]


def test_zip_that_lies_about_its_size_is_cut_off():
    report = intake_photos([("liar.zip", lying_zip(6 * 1024 * 1024, 1000))], limits=SMALL_LIMITS, class_name="toy")
    assert not report.accepted
    (name, reason), = report.rejected
    assert name == "liar.zip/bomb.png" and ("unpacks to more" in reason or "damaged" in reason)


def test_too_many_zip_entries():
    many = zip_of([(f"{i}.txt", b"x") for i in range(50)])
    report = intake_photos([("many.zip", many)], limits=SMALL_LIMITS, class_name="toy")
    assert "holds 50 files; the most is 40" in dict(report.rejected)["many.zip"]


def test_zip_with_captions_for_a_style_set(tmp_path):
    entries = [(f"art/{name}", data) for name, data in make_photo_set(3)]
    entries += [("art/photo0.txt", b"a red sky over hills"), ("__MACOSX/._photo0.png", b"junk")]
    report = intake_photos([("style.zip", zip_of(entries))], tmp_path, style=True)
    assert report.ok and not report.rejected
    assert report.accepted[0].caption == "a red sky over hills"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000.png", "000.txt", "001.png", "002.png"]
    assert Image.open(tmp_path / "001.png").size == (512, 512)


def test_paths_are_read_with_the_size_checked_first(tmp_path):
    for name, data in make_photo_set(3):
        (tmp_path / name).write_bytes(data)
    (tmp_path / "big.png").write_bytes(b"\0" * (3 * 1024 * 1024))
    report = intake_photos(sorted(tmp_path.iterdir()), limits=SMALL_LIMITS, class_name="dog")
    assert len(report.accepted) == 3 and "the most is 2.0 MB" in dict(report.rejected)["big.png"]


def smooth(seed: int) -> bytes:
    """A plain radial colour gradient: nothing in it a face detector could take for a face."""
    y, x = np.mgrid[0:320, 0:320]
    cx, cy = [(40, 40), (280, 160), (160, 300)][seed]
    distance = np.hypot(x - cx, y - cy)
    pixels = np.stack([distance * 0.6, 255 - distance * 0.5, np.full_like(distance, 60 + seed * 50)], -1)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


def test_person_photos_without_a_face_are_centre_cropped_with_a_warning():
    plain = [(f"plain{i}.png", smooth(i)) for i in range(3)]
    report = intake_photos(plain, class_name="man")
    assert all("no face found" in " ".join(p.warnings) for p in report.accepted) and len(report.accepted) == 3
    assert "`plain0.png`, `plain1.png`, `plain2.png`: no face found" in report.summary()
    objects = intake_photos(plain, class_name="toy")
    assert not any("face" in w for p in objects.accepted for w in p.warnings)


def test_blurry_photo_is_warned_about():
    blurry = io.BytesIO()
    Image.fromarray(photo_pixels(40)).resize((40, 40)).resize((320, 320), Image.Resampling.BICUBIC).save(blurry, "PNG")
    report = intake_photos(GOOD + [("soft.png", blurry.getvalue())], class_name="toy")
    soft = next(p for p in report.accepted if p.source == "soft.png")
    assert any("blurry" in w for w in soft.warnings)
    assert not any("blurry" in w for p in report.accepted if p.source != "soft.png" for w in p.warnings)


@pytest.mark.parametrize("size,face,box", [
    ((400, 300), None, (50, 0, 350, 300)),            # centre crop of a landscape
    ((400, 300), (300, 100, 80, 80), (100, 0, 400, 300)),  # face near the right edge: crop clamps to the edge
    ((300, 600), (100, 40, 100, 100), (0, 0, 300, 300)),   # face at the top of a portrait
    ((300, 600), (100, 300, 100, 100), (0, 200, 300, 500)),  # face in the middle
])
def test_crop_box_centres_on_the_face_inside_the_image(size, face, box):
    assert crop_box_around(size, face) == box


@pytest.mark.parametrize("raw,name,kind", [("man", "man", "person"), ("A Dog", "dog", "animal"), ("men", "man", "person"),
                                           ("the cat", "cat", "animal"), ("art style", "style", "style"),
                                           ("teapot", "teapot", "object")])
def test_class_is_normalised(raw, name, kind):
    assert normalise_class(raw) == name and class_kind(name) == kind


@pytest.mark.parametrize("raw", ["", "a", "x" * 30, "dog!", "<@123>"])
def test_bad_class_is_explained(raw):
    with pytest.raises(UserError, match="isn't a class"):
        normalise_class(raw)


def test_instance_prompts():
    assert instance_prompt("squidarth", "man") == "a photo of squidarth man"
    assert instance_prompt("inkwash", "style") == "inkwash style"


def test_animated_photos_use_the_first_frame_and_say_so_but_phone_jpegs_are_not_animated():
    report = intake_photos(GOOD + [("moving.webp", animated("WEBP")), ("phone.jpg", mpo())], class_name="toy")
    warnings = {p.source: p.warnings for p in report.accepted}
    assert warnings["moving.webp"] == ["is animated; only its first frame is used"]
    assert warnings["phone.jpg"] == []
    used = np.asarray(next(p.image for p in report.accepted if p.source == "moving.webp"), float)
    # Lossy WebP and noise keep it from matching exactly; it is far closer to frame 1 than to frames 2 and 3.
    error = [np.abs(used - np.asarray(Image.fromarray(photo_pixels(seed)).resize((512, 512)), float)).mean()
             for seed in (1, 2, 3)]
    assert error[0] * 2 < min(error[1:]), error


def test_flat_sixteen_bit_grey_stays_mid_grey():
    out = io.BytesIO()
    Image.fromarray(np.full((300, 300), 32768, np.uint16)).save(out, "PNG")
    report = intake_photos([("grey16.png", out.getvalue())], limits=IntakeLimits(min_photos=1), class_name="toy")
    assert abs(np.asarray(report.accepted[0].image).mean() - 128) < 2


def patched_central_directory(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    """Overwrite one field of the (single) central-directory record: what zipfile believes about the entry."""
    at = data.rindex(b"PK\x01\x02")
    return data[:at + offset] + struct.pack(fmt, value) + data[at + offset + struct.calcsize(fmt):]


def test_password_protected_entry_is_refused():
    locked = patched_central_directory(zip_of([("secret.png", photo(70))]), 8, "<H", 0x1)  # general flag: encrypted
    report = intake_photos([("locked.zip", locked)], class_name="toy")
    assert dict(report.rejected) == {"locked.zip/secret.png": "is password-protected; zip the photos without a "
                                                               "password"}


def test_zip_claiming_a_gigabyte_is_refused_from_its_headers():
    claims = patched_central_directory(zip_of([("big.png", photo(71))]), 24, "<I", 1024 ** 3)  # uncompressed size
    report = intake_photos([("claims.zip", claims)], class_name="toy")
    assert dict(report.rejected) == {"claims.zip": "unpacks to 1024.0 MB; the most is 400.0 MB"}


def test_entry_count_is_read_from_the_end_record_before_unpacking():
    many = zip_of([(f"{i}.png", b"") for i in range(500)])
    report = intake_photos([("many.zip", many)], class_name="toy")
    assert dict(report.rejected) == {"many.zip": "holds 500 files; the most is 200"}


def test_loose_caption_files_pair_up_and_orphans_are_noted(tmp_path):
    files = make_photo_set(3) + [("photo1.txt", b"  ink  wash\nlandscape "), ("other.txt", b"no photo")]
    report = intake_photos(files, tmp_path, style=True)
    captions = {p.source: p.caption for p in report.accepted}
    assert captions == {"photo0.png": None, "photo1.png": "ink wash landscape", "photo2.png": None}
    assert (tmp_path / "001.txt").read_text() == "ink wash landscape" and not (tmp_path / "000.txt").exists()
    assert report.notes == ["`other.txt` was read as a caption but no photo has the same name, so it was not used."]
    assert "ℹ `other.txt` was read as a caption" in report.summary()


def test_a_folder_is_read_and_an_unreadable_path_is_reported(tmp_path):
    for name, data in make_photo_set(3):
        (tmp_path / name).write_bytes(data)
    report = intake_photos([tmp_path, tmp_path / "missing.png"], class_name="toy")
    assert len(report.accepted) == 3 and dict(report.rejected) == {"missing.png": "could not be read"}


def test_person_crop_centres_on_the_face():
    # A 640×400 photo with a face near the left edge: a centre crop (x 120..520) would cut through it.
    report = intake_photos(GOOD + [("left.png", face_photo((640, 400), ((100, 200, 70),)))], class_name="woman")
    prepared = next(p for p in report.accepted if p.source == "left.png")
    x, y, w, h = prepared.face
    assert abs(x + w / 2 - 100) < 15 and abs(y + h / 2 - 200) < 15
    assert not any("face" in warning for warning in prepared.warnings)
    # The crop is the 400×400 square at the left edge, so the cheek at (65, 214) lands at (83, 274) of 512.
    assert np.abs(np.asarray(prepared.image)[274, 83].astype(int) - (225, 185, 155)).max() < 30
    centre_crop = intake_photos([("left.png", face_photo((640, 400), ((100, 200, 70),)))],
                                limits=IntakeLimits(min_photos=1), class_name="toy").accepted[0]
    assert centre_crop.face is None  # objects are centre-cropped


def test_several_faces_are_warned_about_and_the_largest_is_used():
    group = face_photo((640, 400), ((150, 200, 60), (470, 200, 90)))
    report = intake_photos([("group.png", group)], limits=IntakeLimits(min_photos=1), class_name="person")
    prepared = report.accepted[0]
    assert "2 faces found; the largest was used; photos of just one person work best" in prepared.warnings
    assert abs(prepared.face[0] + prepared.face[2] / 2 - 470) < 15


def test_animal_photos_do_not_centre_on_a_human_face():
    # An owner's face beside the dog must not pull the crop: dogs are centre-cropped.
    report = intake_photos([("walk.png", face_photo((640, 400), ((80, 200, 70),)))],
                           limits=IntakeLimits(min_photos=1), class_name="dog")
    assert report.accepted[0].face is None and not any("face" in w for w in report.accepted[0].warnings)


def test_without_a_face_detector_photos_are_centre_cropped_and_the_member_is_told(monkeypatch):
    import cv2

    from trainer.intake import faces as intake_faces

    # What OpenCV 5 looks like: no CascadeClassifier in cv2.
    monkeypatch.delattr(cv2, "CascadeClassifier")
    intake_faces._cascade.cache_clear()
    try:
        report = intake_photos([("me.png", face_photo())], limits=IntakeLimits(min_photos=1), class_name="man")
    finally:
        intake_faces._cascade.cache_clear()
    assert report.ok and report.accepted[0].face is None
    assert not any("face" in w for w in report.accepted[0].warnings)  # no "no face found": nobody looked
    assert any("Faces could not be looked for" in note for note in report.notes)


def test_intake_threads_running_at_once_get_the_same_answers():
    from concurrent.futures import ThreadPoolExecutor

    sets = [[(f"face{i}.png", face_photo((640, 400), ((120 + 40 * i, 200, 70),)))] for i in range(6)]
    limits = IntakeLimits(min_photos=1)
    alone = [intake_photos(files, limits=limits, class_name="man").accepted[0].face for files in sets]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda files: intake_photos(files, limits=limits, class_name="man").accepted[0].face,
                                 sets))
    assert together == alone and all(alone)


def test_summary_fits_in_a_discord_message_and_keeps_the_verdict():
    bad = [(f"tiny_{i}_photo.png", photo(80 + i, (100 + i, 100))) for i in range(60)]
    report = intake_photos(bad, class_name="man")
    text = report.summary()
    assert len(text) <= 2000
    assert text.startswith("0 photos accepted, 60 left out.")
    assert "more lines" in text and text.endswith("on the shorter side).")
    assert "`tiny_0_photo.png`" in text  # names are shown as typed, not as Discord markdown


def test_report_as_dict():
    report = intake_photos(GOOD + [("zero.jpg", b"")], class_name="toy")
    data = report.to_dict()
    assert data["ok"] is True and [a["source"] for a in data["accepted"]] == ["photo0.png", "photo1.png", "photo2.png"]
    assert data["rejected"] == [{"source": "zero.jpg", "reason": "is an empty file"}]
    assert set(data) == {"ok", "accepted", "rejected", "warnings", "notes"}
