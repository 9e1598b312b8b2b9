"""preview.png: a few images of every class, one row per class, labelled (Pillow only, no matplotlib).

Readable from 2 to about 50 classes; past `MAX_PREVIEW_CLASSES` the first ones (in sorted order) are drawn
and a last line says how many are not shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MAX_PREVIEW_CLASSES = 50
PER_CLASS = 8
THUMB = 64
_GAP = 4
_LABEL_WIDTH = 200
_HEADER = 28
_FOOTER = 24
_INK = (20, 20, 20)
_FAINT = (110, 110, 110)


def write_preview(path: Path, classes: Sequence[str], x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                  y_test: np.ndarray) -> None:
    """Draw up to PER_CLASS images (training first, then test) of each of the first MAX_PREVIEW_CLASSES classes."""
    shown = list(classes[:MAX_PREVIEW_CLASSES])
    row = THUMB + _GAP
    width = _GAP + _LABEL_WIDTH + PER_CLASS * row
    hidden = len(classes) - len(shown)
    height = _HEADER + len(shown) * row + (_FOOTER if hidden else 0) + _GAP
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=11)
    draw.text((_GAP, 6), f"{len(classes)} classes, {len(y_train)} training and {len(y_test)} test images",
              fill=_INK, font=font)
    for r, name in enumerate(shown):
        top = _HEADER + r * row
        train_idx = np.flatnonzero(y_train == r)
        test_idx = np.flatnonzero(y_test == r)
        draw.text((_GAP, top + 8), _fit(draw, name, font, _LABEL_WIDTH - 2 * _GAP), fill=_INK, font=font)
        draw.text((_GAP, top + 30), f"{len(train_idx)} train, {len(test_idx)} test", fill=_FAINT, font=small)
        pictures = [x_train[i] for i in train_idx[:PER_CLASS]]
        pictures += [x_test[i] for i in test_idx[:PER_CLASS - len(pictures)]]
        for c, pixels in enumerate(pictures):
            thumb = Image.fromarray(np.asarray(pixels)).resize((THUMB, THUMB), Image.Resampling.LANCZOS)
            canvas.paste(thumb, (_GAP + _LABEL_WIDTH + c * row, top))
    if hidden:
        draw.text((_GAP, _HEADER + len(shown) * row + 4),
                  f"... and {hidden} more classes, not shown (the first {len(shown)} in sorted order are)",
                  fill=_FAINT, font=font)
    canvas.save(path, format="PNG")


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
         width: int) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow built without FreeType: a Latin-1 bitmap font
        text = text.encode("latin-1", "replace").decode("latin-1")
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
