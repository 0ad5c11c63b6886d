"""Where to crop a training photo: OpenCV's bundled Haar face detectors, and the square crop around what they find.

The detectors come with opencv-python 4.x (`cv2.data.haarcascades`); OpenCV 5 moved them out of the main package.
When a detector is missing, `find_faces` returns None and the caller centre-crops and says so, instead of failing.
"""
from __future__ import annotations

import functools
import logging
import os
import threading

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # x, y, width, height in the image's own pixels

HUMAN = "haarcascade_frontalface_default.xml"
CAT = "haarcascade_frontalcatface_extended.xml"
ANALYSIS_SIDE = 512  # detection runs on a grey copy this long on its longer side: fast, and faces in photos are big

# One CascadeClassifier keeps per-image state while it detects, so the bot's intake threads take turns with it.
_detect_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _cascade(filename: str):
    import cv2

    make = getattr(cv2, "CascadeClassifier", None)
    path = os.path.join(getattr(getattr(cv2, "data", None), "haarcascades", ""), filename)
    if make is None or not os.path.isfile(path):
        log.warning("OpenCV %s lacks the Haar detector %s (opencv-python 5 moved them out; install "
                    "opencv-python-headless<5); photos are centre-cropped", cv2.__version__, filename)
        return None
    cascade = make(path)
    return None if cascade.empty() else cascade


def detector_available(filename: str = HUMAN) -> bool:
    return _cascade(filename) is not None


def grey_for_analysis(image: Image.Image, side: int = ANALYSIS_SIDE) -> np.ndarray:
    """A grey copy scaled so its longer side is `side`: blur and face measures then mean the same for every photo."""
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return np.asarray(image.convert("L").resize(size, Image.Resampling.BILINEAR))


def find_faces(image: Image.Image, filename: str = HUMAN) -> list[Box] | None:
    """Face boxes in `image`'s pixels, largest first; None when this OpenCV has no such detector."""
    cascade = _cascade(filename)
    if cascade is None:
        return None
    grey = grey_for_analysis(image)
    # Faces in a training photo are large; a small minimum size lets texture pass for faces.
    smallest = max(40, min(grey.shape) // 7)
    with _detect_lock:
        found = cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=6, minSize=(smallest, smallest))
    scale = max(image.size) / max(grey.shape)
    boxes = [tuple(int(round(v * scale)) for v in box) for box in found]
    return sorted(boxes, key=lambda box: box[2] * box[3], reverse=True)


def crop_box_around(size: tuple[int, int], face: Box | None) -> tuple[int, int, int, int]:
    """The largest square inside `size`, centred on the face box where one is given, else on the image centre.

    Returns (left, top, right, bottom) as PIL's crop takes it; the square is moved back inside the image when the
    face is near an edge.
    """
    width, height = size
    side = min(width, height)
    if face is None:
        cx, cy = width / 2, height / 2
    else:
        x, y, w, h = face
        cx, cy = x + w / 2, y + h / 2
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, left + side, top + side
