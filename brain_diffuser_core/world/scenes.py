"""Procedural "natural-ish" scenes for the MiniNSD world, each with a scene graph and five captions.

Every scene is drawn by this module (no shipped photographs): cartoon faces, stick figures in action,
places (rooms, houses, landscapes), words on signs, saturated everyday objects and fine high-contrast
textures: the categories whose ROIs Brain-Diffuser's ROI-optimal analysis probes (faces, bodies, places,
words; V4 colourful objects; V1 fine textures).

A scene is rendered at ``RENDER_SIZE`` (128 px) with Pillow and box-downsampled to ``IMAGE_SIZE`` (64 px),
which antialiases edges. The image spans ``FIELD_DEG`` = 8.4 degrees of visual angle, like NSD's stimuli, so
an object's eccentricity is ``hypot(x - 0.5, y - 0.5) * 8.4`` degrees, with ``(x, y)`` its centre in image
fractions (x to the right, y downwards).

Everything is a pure function of the seed: ``generate_scene(seed)`` returns the same pixels, graph and
captions on every machine (NumPy ``default_rng`` + Pillow drawing, no global state).

Example
-------
>>> scenes = generate_scenes(12, seed=0)          # two of each category
>>> scenes[0].image.shape, scenes[0].image.dtype
((64, 64, 3), dtype('uint8'))
>>> category_labels(scenes)[:6]                   # indices into CATEGORIES
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..seeding import seed_for

__all__ = [
    "CATEGORIES",
    "CATEGORY_KEYWORDS",
    "IMAGE_SIZE",
    "RENDER_SIZE",
    "FIELD_DEG",
    "SceneObject",
    "Scene",
    "generate_scene",
    "generate_scenes",
    "category_labels",
    "stack_images",
    "scene_seed",
]

#: Main scene categories, in label order (``category_labels`` returns indices into this tuple).
CATEGORIES: tuple[str, ...] = ("face", "body", "place", "word", "object", "texture")
#: Every caption of a scene contains at least one of its main category's keywords (lower case).
CATEGORY_KEYWORDS: dict[str, tuple[str, ...]] = {
    "face": ("face", "faces"),
    "body": ("person", "figure", "man", "woman", "child", "people", "body"),
    "place": ("room", "house", "building", "landscape", "field", "hallway", "hills", "mountain"),
    "word": ("sign", "word", "letters", "text"),
    "object": ("apple", "orange", "ball", "cup", "fruit", "mug", "toy", "objects", "object"),
    "texture": ("pattern", "stripes", "grating", "checkerboard", "texture", "lines"),
}
IMAGE_SIZE = 64
RENDER_SIZE = 128
#: Visual angle spanned by the image side, in degrees (NSD: 8.4 deg).
FIELD_DEG = 8.4

_SKIN = [(255, 224, 189), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (110, 66, 35)]
_HAIR = [(40, 25, 15), (90, 55, 20), (200, 160, 60), (20, 20, 20), (150, 60, 20), (190, 190, 190)]
_NAMED = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (245, 220, 30), "green": (40, 170, 50),
    "blue": (30, 80, 220), "purple": (140, 40, 180), "pink": (240, 110, 170), "white": (240, 240, 240),
    "black": (20, 20, 20), "brown": (120, 70, 30), "grey": (128, 128, 128),
}
_SATURATED = ("red", "orange", "yellow", "green", "blue", "purple", "pink")
_WORDS = ("STOP", "EXIT", "OPEN", "CAFE", "HOTEL", "SALE", "BUS", "PARK", "BANK", "TAXI", "SHOP", "PIZZA",
          "BAR", "INN", "POST", "MARKET", "ZOO", "BOOKS", "FOOD", "GO")
_FONT_PATHS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
               "/usr/share/fonts/dejavu/DejaVuSans-Bold.ttf")


@dataclass(frozen=True)
class SceneObject:
    """One element of a scene graph.

    Attributes
    ----------
    category : str
        One of :data:`CATEGORIES`.
    kind : str
        Finer type, e.g. ``"cartoon_face"``, ``"stick_figure"``, ``"room"``, ``"sign"``, ``"apple"``.
    x, y : float
        Centre in image fractions in [0, 1] (x to the right, y downwards).
    size : float
        Largest extent as a fraction of the image side.
    colour : tuple of int
        Dominant RGB colour (0-255).
    colour_name : str
        Name of the dominant colour as used in the captions.
    eccentricity : float
        Distance of the centre from the image centre, in degrees (image side = :data:`FIELD_DEG`).
    bbox : tuple of float
        ``(x0, y0, x1, y1)`` in image fractions, clipped to [0, 1].
    text : str
        The letters shown (signs only), else ``""``.
    """

    category: str
    kind: str
    x: float
    y: float
    size: float
    colour: tuple[int, int, int]
    colour_name: str
    eccentricity: float
    bbox: tuple[float, float, float, float]
    text: str = ""


@dataclass
class Scene:
    """A rendered scene.

    Attributes
    ----------
    image : np.ndarray, uint8, shape (64, 64, 3)
    objects : list of SceneObject
        The scene graph; the first object of ``category`` is the main one.
    category : str
        Main category (one of :data:`CATEGORIES`).
    captions : list of str
        Five COCO-like captions.
    seed : int
        The seed that reproduces this scene with :func:`generate_scene`.
    background : str
        Background kind (``"sky"``, ``"wall"``, ``"plain"``, ``"gradient"``, ``"indoor"``, ...).
    """

    image: np.ndarray
    objects: list[SceneObject]
    category: str
    captions: list[str]
    seed: int
    background: str = "plain"
    label: int = field(init=False)

    def __post_init__(self) -> None:
        self.label = CATEGORIES.index(self.category)


# ----------------------------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.ImageFont:
    for p in _FONT_PATHS:
        if Path(p).exists():
            return ImageFont.truetype(p, size)
    return ImageFont.load_default(size=size)


def _jitter(rgb: Sequence[int], rng: np.random.Generator, amount: int = 20) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)  # type: ignore


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def _ecc(x: float, y: float) -> float:
    return float(math.hypot(x - 0.5, y - 0.5) * FIELD_DEG)


def _obj(category, kind, x, y, w, h, colour, colour_name, text="") -> SceneObject:
    bbox = (max(0.0, x - w / 2), max(0.0, y - h / 2), min(1.0, x + w / 2), min(1.0, y + h / 2))
    return SceneObject(category, kind, float(x), float(y), float(max(w, h)), tuple(int(c) for c in colour),
                       colour_name, _ecc(x, y), tuple(float(b) for b in bbox), text)


def _where(x: float, y: float) -> str:
    """Caption phrase for a position in image fractions."""
    if abs(x - 0.5) < 0.13 and abs(y - 0.5) < 0.13:
        return "in the centre"
    if abs(x - 0.5) >= abs(y - 0.5):
        return "on the left" if x < 0.5 else "on the right"
    return "at the top" if y < 0.5 else "at the bottom"


# ------------------------------------------------------------------------------------------- backgrounds
def _background(draw: ImageDraw.ImageDraw, rng: np.random.Generator, kinds: Sequence[str]) -> tuple[str, str]:
    """Paint a background; return (kind, caption phrase)."""
    S = RENDER_SIZE
    kind = _pick(rng, kinds)
    if kind == "sky":
        hor = int(S * rng.uniform(0.55, 0.8))
        draw.rectangle([0, 0, S, hor], fill=_jitter((110, 170, 235), rng))
        ground, gname = _pick(rng, [((70, 150, 60), "grass"), ((190, 170, 120), "sand"), ((120, 120, 120), "a road")])
        draw.rectangle([0, hor, S, S], fill=_jitter(ground, rng))
        return kind, f"against a blue sky above {gname}"
    if kind == "wall":
        base = _jitter((170, 70, 50), rng, 25)
        draw.rectangle([0, 0, S, S], fill=base)
        mortar = (200, 190, 180)
        bh = int(rng.integers(8, 13))
        for r, yy in enumerate(range(0, S, bh)):
            draw.line([0, yy, S, yy], fill=mortar, width=1)
            off = (r % 2) * bh
            for xx in range(-off, S, 2 * bh):
                draw.line([xx, yy, xx, yy + bh], fill=mortar, width=1)
        return kind, "in front of a brick wall"
    if kind == "gradient":
        c0 = np.array(_jitter(_NAMED[_pick(rng, ("blue", "yellow", "pink", "green", "grey"))], rng), float)
        c1 = np.array(_jitter((235, 235, 235), rng), float)
        for yy in range(0, S, 4):
            t = yy / S
            draw.rectangle([0, yy, S, yy + 4], fill=tuple(int(v) for v in c0 * (1 - t) + c1 * t))
        return kind, "on a soft coloured background"
    if kind == "indoor":
        draw.rectangle([0, 0, S, S], fill=_jitter((215, 205, 185), rng))
        fy = int(S * rng.uniform(0.65, 0.8))
        draw.rectangle([0, fy, S, S], fill=_jitter((140, 100, 60), rng))
        return kind, "in a room"
    # plain
    name = _pick(rng, ("white", "grey", "blue", "green", "yellow", "black"))
    col = _jitter(_NAMED[name], rng, 15)
    if name == "black":
        col = (35, 35, 40)
    draw.rectangle([0, 0, S, S], fill=col)
    return "plain", f"on a plain {name} background"


# ---------------------------------------------------------------------------------------------- painters
def _paint_face(draw, rng, x, y, size) -> SceneObject:
    S = RENDER_SIZE
    cx, cy, r = x * S, y * S, size * S / 2
    rx, ry = r * 0.82, r
    skin = _jitter(_pick(rng, _SKIN), rng, 8)
    hair = _pick(rng, _HAIR)
    draw.ellipse([cx - rx * 1.05, cy - ry * 1.08, cx + rx * 1.05, cy + ry * 0.3], fill=hair)
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=skin)
    draw.ellipse([cx - rx * 1.0, cy - ry * 1.05, cx + rx * 1.0, cy - ry * 0.45], fill=hair)
    draw.rectangle([cx - rx * 0.9, cy - ry * 0.62, cx + rx * 0.9, cy - ry * 0.5], fill=skin)
    ex, ey, er = rx * 0.4, cy - ry * 0.15, max(1.5, r * 0.16)
    for sx in (-1, 1):
        draw.ellipse([cx + sx * ex - er, ey - er * 0.7, cx + sx * ex + er, ey + er * 0.7], fill=(250, 250, 250))
        pr = er * 0.55
        draw.ellipse([cx + sx * ex - pr, ey - pr, cx + sx * ex + pr, ey + pr], fill=(30, 30, 40))
        draw.line([cx + sx * ex - er, ey - er * 1.4, cx + sx * ex + er, ey - er * 1.6], fill=hair,
                  width=max(1, int(r * 0.07)))
    draw.line([cx, ey + er * 0.5, cx - r * 0.08, cy + ry * 0.3], fill=tuple(int(c * 0.8) for c in skin),
              width=max(1, int(r * 0.06)))
    smile = rng.uniform(0.0, 0.6)
    mw, my = rx * 0.45, cy + ry * 0.5
    draw.arc([cx - mw, my - r * 0.15 - smile * r * 0.1, cx + mw, my + r * 0.1 + smile * r * 0.1],
             start=10, end=170, fill=(150, 40, 50), width=max(1, int(r * 0.08)))
    return _obj("face", "cartoon_face", x, y, 2 * rx / S, 2 * ry / S, skin, "skin")


def _paint_figure(draw, rng, x, y, size) -> SceneObject:
    """Stick figure with limbs at random joint angles (walking, waving, jumping, kicking)."""
    S = RENDER_SIZE
    h = size * S
    cx, cy = x * S, y * S
    cname = _pick(rng, _SATURATED + ("black",))
    cloth = _jitter(_NAMED[cname], rng, 15)
    skin = _pick(rng, _SKIN)
    w = max(2, int(h * 0.07))
    head_r = h * 0.1
    neck = (cx, cy - h * 0.3)
    hip = (cx + rng.uniform(-0.05, 0.05) * h, cy + h * 0.08)
    draw.line([neck, hip], fill=cloth, width=w + 1)
    draw.ellipse([neck[0] - head_r, neck[1] - 2 * head_r, neck[0] + head_r, neck[1]], fill=skin)
    shoulder = (neck[0] + (hip[0] - neck[0]) * 0.15, neck[1] + (hip[1] - neck[1]) * 0.15)
    for side in (-1, 1):
        a1 = math.radians(rng.uniform(-80, 170))  # upper arm angle from straight down
        a2 = a1 + math.radians(rng.uniform(-90, 20))
        L = h * 0.2
        elbow = (shoulder[0] + side * L * math.sin(a1), shoulder[1] + L * math.cos(a1))
        hand = (elbow[0] + side * L * math.sin(a2), elbow[1] + L * math.cos(a2))
        draw.line([shoulder, elbow], fill=cloth, width=w)
        draw.line([elbow, hand], fill=skin, width=w)
        b1 = math.radians(rng.uniform(-5, 55))
        b2 = b1 - math.radians(rng.uniform(0, 60))
        L2 = h * 0.22
        knee = (hip[0] + side * L2 * math.sin(b1), hip[1] + L2 * math.cos(b1))
        foot = (knee[0] + side * L2 * math.sin(b2), knee[1] + L2 * math.cos(b2))
        draw.line([hip, knee], fill=cloth, width=w)
        draw.line([knee, foot], fill=(40, 40, 40), width=w)
    return _obj("body", "stick_figure", x, y, size * 0.6, size, cloth, cname)


def _paint_place(draw, rng, x, y, size) -> tuple[SceneObject, str, str]:
    """Whole-image place; returns (object, kind word for captions, background kind)."""
    S = RENDER_SIZE
    kind = _pick(rng, ("room", "house", "landscape"))
    if kind == "room":
        wall = _jitter(_pick(rng, [(220, 210, 190), (180, 200, 220), (230, 200, 170), (200, 220, 190)]), rng)
        floor = _jitter(_pick(rng, [(140, 95, 55), (110, 110, 115), (170, 130, 90)]), rng)
        vx, vy = x * S, y * S * 0.9  # vanishing point
        bw, bh = S * size * 0.5, S * size * 0.45
        x0, x1, y0, y1 = vx - bw / 2, vx + bw / 2, vy - bh / 2, vy + bh / 2
        draw.rectangle([0, 0, S, S], fill=tuple(int(c * 0.85) for c in wall))
        draw.polygon([(0, 0), (S, 0), (x1, y0), (x0, y0)], fill=(235, 235, 230))  # ceiling
        draw.polygon([(0, S), (S, S), (x1, y1), (x0, y1)], fill=floor)  # floor
        draw.polygon([(0, 0), (x0, y0), (x0, y1), (0, S)], fill=tuple(int(c * 0.75) for c in wall))
        draw.polygon([(S, 0), (x1, y0), (x1, y1), (S, S)], fill=tuple(int(c * 0.9) for c in wall))
        draw.rectangle([x0, y0, x1, y1], fill=wall)
        dw = bw * rng.uniform(0.2, 0.3)
        dx = rng.uniform(x0 + 2, x1 - dw - 2)
        door = _jitter(_pick(rng, [(110, 70, 40), (60, 90, 140), (150, 40, 40)]), rng)
        draw.rectangle([dx, y0 + bh * 0.3, dx + dw, y1], fill=door)
        for k in range(1, 4):  # floor boards: perspective lines
            t = k / 4
            draw.line([(x0 + (x1 - x0) * t, y1), (S * t, S)], fill=tuple(int(c * 0.8) for c in floor), width=1)
        obj = _obj("place", "room", x, y * 0.9, 1.0, 1.0, wall, "white")
        return obj, _pick(rng, ("room", "hallway", "room")), "indoor"
    if kind == "house":
        hor = S * rng.uniform(0.6, 0.78)
        draw.rectangle([0, 0, S, hor], fill=_jitter((110, 170, 235), rng))
        draw.rectangle([0, hor, S, S], fill=_jitter((70, 150, 60), rng))
        w, h = S * size * 0.7, S * size * 0.45
        cx = x * S
        bx0, bx1, by1 = cx - w / 2, cx + w / 2, hor + S * 0.05
        by0 = by1 - h
        rname = _pick(rng, ("red", "brown", "blue", "grey"))
        roof = _jitter(_NAMED[rname], rng, 15)
        wallc = _jitter(_pick(rng, [(235, 225, 200), (250, 250, 245), (200, 170, 130), (240, 220, 120)]), rng)
        draw.rectangle([bx0, by0, bx1, by1], fill=wallc)
        draw.polygon([(bx0 - w * 0.08, by0), (bx1 + w * 0.08, by0), (cx, by0 - h * 0.6)], fill=roof)
        draw.rectangle([cx - w * 0.08, by1 - h * 0.5, cx + w * 0.08, by1], fill=(100, 60, 30))
        for sx in (-1, 1):
            wx = cx + sx * w * 0.28
            draw.rectangle([wx - w * 0.09, by0 + h * 0.25, wx + w * 0.09, by0 + h * 0.55], fill=(170, 210, 240),
                           outline=(255, 255, 255))
        obj = _obj("place", "house", x, (by0 - h * 0.6 + by1) / 2 / S, w * 1.16 / S, h * 1.6 / S, roof, rname)
        return obj, _pick(rng, (f"house with a {rname} roof", "house", "building")), "sky"
    # landscape
    hor = S * rng.uniform(0.4, 0.65)
    sky = _jitter(_pick(rng, [(110, 170, 235), (250, 180, 120), (150, 190, 230)]), rng)
    draw.rectangle([0, 0, S, hor], fill=sky)
    gname = _pick(rng, ("green", "yellow", "brown"))
    ground = _jitter({"green": (80, 150, 60), "yellow": (200, 180, 90), "brown": (150, 110, 70)}[gname], rng)
    draw.rectangle([0, hor, S, S], fill=ground)
    n_m = int(rng.integers(1, 4))
    for _ in range(n_m):
        mx, mw, mh = rng.uniform(0, S), S * rng.uniform(0.3, 0.7), S * rng.uniform(0.1, 0.3)
        draw.polygon([(mx - mw / 2, hor), (mx + mw / 2, hor), (mx, hor - mh)], fill=_jitter((100, 100, 120), rng))
    if rng.random() < 0.6:
        sx, sy, sr = rng.uniform(0.1, 0.9) * S, rng.uniform(0.05, 0.25) * S, S * 0.06
        draw.ellipse([sx - sr, sy - sr, sx + sr, sy + sr], fill=(255, 230, 80))
    for _ in range(int(rng.integers(0, 4))):
        tx, ty = rng.uniform(0, S), hor + rng.uniform(0.0, 0.3) * S
        th = S * rng.uniform(0.08, 0.2)
        draw.rectangle([tx - 1.5, ty - th * 0.4, tx + 1.5, ty], fill=(90, 60, 30))
        draw.ellipse([tx - th * 0.3, ty - th, tx + th * 0.3, ty - th * 0.3], fill=_jitter((30, 110, 40), rng))
    obj = _obj("place", "landscape", 0.5, hor / S, 1.0, 1.0, ground, gname)
    word = _pick(rng, ("landscape", f"{gname} field", "hilly landscape", "mountain landscape"))
    return obj, word, "sky"


def _paint_sign(draw, rng, x, y, size) -> SceneObject:
    S = RENDER_SIZE
    word = _pick(rng, _WORDS)
    bname = _pick(rng, ("red", "blue", "green", "white", "yellow", "black"))
    board = _jitter(_NAMED[bname], rng, 10)
    ink = (250, 250, 250) if bname in ("red", "blue", "green", "black") else (20, 20, 20)
    w = size * S
    fsize = max(8, int(w / max(2.2, len(word) * 0.72)))
    font = _font(fsize)
    l, t, r, b = draw.textbbox((0, 0), word, font=font)
    tw, th = r - l, b - t
    bw, bh = max(w, tw + fsize * 0.5), th + fsize * 0.6
    cx, cy = x * S, y * S
    if rng.random() < 0.5:  # on a post
        draw.rectangle([cx - 2, cy, cx + 2, S], fill=(90, 90, 90))
    draw.rectangle([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], fill=board, outline=ink)
    draw.text((cx - tw / 2 - l, cy - th / 2 - t), word, font=font, fill=ink)
    return _obj("word", "sign", x, y, bw / S, bh / S, board, bname, text=word)


def _paint_object(draw, rng, x, y, size) -> SceneObject:
    S = RENDER_SIZE
    kind = _pick(rng, ("apple", "orange", "ball", "cup"))
    cx, cy, r = x * S, y * S, size * S / 2
    if kind == "apple":
        cname = _pick(rng, ("red", "green", "yellow"))
        col = _jitter(_NAMED[cname], rng, 10)
        draw.ellipse([cx - r, cy - r * 0.9, cx + r, cy + r], fill=col)
        draw.line([cx, cy - r * 0.8, cx + r * 0.15, cy - r * 1.2], fill=(90, 50, 20), width=max(1, int(r * 0.12)))
        draw.ellipse([cx + r * 0.1, cy - r * 1.2, cx + r * 0.6, cy - r * 0.9], fill=(40, 160, 40))
    elif kind == "orange":
        cname = "orange"
        col = _jitter(_NAMED[cname], rng, 10)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        draw.ellipse([cx - r * 0.1, cy - r, cx + r * 0.1, cy - r * 0.8], fill=(60, 120, 30))
    elif kind == "ball":
        cname = _pick(rng, _SATURATED)
        col = _jitter(_NAMED[cname], rng, 10)
        c2 = _NAMED[_pick(rng, [c for c in _SATURATED if c != cname] + ["white"])]
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        draw.chord([cx - r, cy - r, cx + r, cy + r], start=200, end=340, fill=c2)
        draw.chord([cx - r, cy - r, cx + r, cy + r], start=20, end=160, fill=c2)
    else:
        cname = _pick(rng, _SATURATED)
        col = _jitter(_NAMED[cname], rng, 10)
        draw.polygon([(cx - r * 0.7, cy - r * 0.8), (cx + r * 0.7, cy - r * 0.8), (cx + r * 0.55, cy + r),
                      (cx - r * 0.55, cy + r)], fill=col)
        draw.arc([cx + r * 0.4, cy - r * 0.5, cx + r * 1.05, cy + r * 0.4], start=270, end=90, fill=col,
                 width=max(2, int(r * 0.18)))
        draw.ellipse([cx - r * 0.7, cy - r * 0.95, cx + r * 0.7, cy - r * 0.65], fill=tuple(c // 2 for c in col))
    return _obj("object", kind, x, y, size, size, col, cname)


def _texture_array(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str, str, str]:
    """High-contrast fine texture, (size, size, 3) uint8 at render resolution; (array, kind, phrase, colour)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = _pick(rng, ("grating", "checkerboard", "plaid"))
    period = float(rng.uniform(3.0, 7.0))  # render px (128): 1.5-3.5 px at 64
    theta = float(rng.uniform(0, np.pi))
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    if kind == "grating":
        m = np.sin(2 * np.pi * u / period) > 0
        phrase = "black and white stripes" if rng.random() < 0.5 else "a fine striped pattern"
    elif kind == "checkerboard":
        m = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
        phrase = "a checkerboard pattern"
    else:
        m = (np.sin(2 * np.pi * u / period) + np.sin(2 * np.pi * v / (period * 1.3))) > 0
        phrase = "a pattern of crossing lines"
    if rng.random() < 0.6:
        c0, c1, cname = (0, 0, 0), (255, 255, 255), "black and white"
    else:
        cname = _pick(rng, _SATURATED)
        c0, c1 = (10, 10, 10), _NAMED[cname]
    arr = np.where(m[..., None], np.array(c1, np.uint8), np.array(c0, np.uint8)).astype(np.uint8)
    return arr, kind, phrase, cname


def _paint_texture(img: Image.Image, rng, x, y, size) -> tuple[SceneObject, str]:
    S = RENDER_SIZE
    arr, kind, phrase, cname = _texture_array(rng, S)
    tex = Image.fromarray(arr)
    if size >= 0.95:
        img.paste(tex)
        x, y, w, h = 0.5, 0.5, 1.0, 1.0
    else:
        mask = Image.new("L", (S, S), 0)
        md = ImageDraw.Draw(mask)
        cx, cy, r = x * S, y * S, size * S / 2
        if rng.random() < 0.5:
            md.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            md.rectangle([cx - r, cy - r, cx + r, cy + r], fill=255)
        img.paste(tex, (0, 0), mask)
        w = h = size
    col = _NAMED.get(cname, (128, 128, 128))
    return _obj("texture", kind, x, y, w, h, col, cname), phrase


# ---------------------------------------------------------------------------------------------- captions
def _captions(rng, category: str, main: SceneObject, noun: str, bg_phrase: str, n_main: int,
              extra: list[SceneObject]) -> list[str]:
    where = _where(main.x, main.y) if n_main == 1 else "side by side"
    c = main.colour_name
    big = "large" if main.size > 0.5 else ("small" if main.size < 0.3 else "")
    adj = f"{big} " if big else ""
    if category == "face":
        many = n_main > 1
        t = [f"{'two cartoon faces' if many else 'a cartoon face'} {where} {bg_phrase}",
             f"a drawing of a smiling face {where}",
             f"a {adj}face with dark hair {bg_phrase}",
             f"{'faces' if many else 'a face'} looking at the viewer {where}",
             f"a simple picture of a person's face {bg_phrase}",
             f"close up of a cartoon face {where}",
             f"an illustrated face {where} of the picture"]
    elif category == "body":
        many = n_main > 1
        who = "two people" if many else _pick(rng, ("a person", "a man", "a woman", "a child"))
        t = [f"{who} in a {c} shirt {where} {bg_phrase}",
             f"a stick figure waving its arms {where}",
             f"{who} running and jumping {bg_phrase}",
             f"a drawing of a figure with arms and legs in motion {where}",
             f"{who} dancing {where}",
             f"a {c} stick figure {bg_phrase}",
             f"a person kicking with one leg {where}"]
    elif category == "place":
        k = main.kind
        if k == "room":
            t = [f"an empty {noun} with a door", "the inside of a room with walls and a wooden floor",
                 f"a view down an empty {noun}", "an indoor room with a door on the back wall",
                 "a room seen from the doorway", f"a quiet {noun} with bare walls"]
        elif k == "house":
            t = [f"a {noun} under a blue sky", "a small house with windows and a door on the grass",
                 f"a {c} roofed house in a field", "a building with two windows and a roof",
                 "a little house standing alone on green grass", f"a house with a {c} roof"]
        else:
            t = [f"a {noun} with a horizon", "a wide landscape with hills under the sky",
                 "an open field stretching to the horizon", f"a {noun} on a clear day",
                 "mountains in the distance over a flat field", "a landscape scene with a few trees"]
    elif category == "word":
        w = main.text
        t = [f"a {c} sign that says {w} {where}", f"a street sign with the word {w}",
             f"a sign with white letters {bg_phrase}" if c in ("red", "blue", "green", "black")
             else f"a sign with black letters {bg_phrase}",
             f"the word {w} written on a {c} sign", f"a shop sign reading {w} {where}",
             f"large letters on a sign {where}", f"a {c} board with text on it"]
    elif category == "object":
        names = {"apple": "apple", "orange": "orange", "ball": "ball", "cup": "cup"}
        nm = names[main.kind]
        if n_main > 1:
            t = [f"a few colourful objects {bg_phrase}", f"a {c} {nm} and other objects",
                 f"several brightly coloured toys and fruit {bg_phrase}", f"a {c} {nm} {where} next to other things",
                 "a group of objects on display", f"colourful objects including a {nm}"]
        else:
            fruit = main.kind in ("apple", "orange")
            t = [f"a {c} {nm} {where} {bg_phrase}", f"a single {adj}{c} {nm}",
                 f"a bright {c} {nm} {where}", f"{'a piece of fruit' if fruit else 'a colourful object'}: "
                 f"a {c} {nm}", f"a close up of a {nm} {bg_phrase}", f"a shiny {c} {nm}"]
    else:  # texture
        phrase = noun
        t = [f"{phrase} filling the picture" if main.size >= 0.95 else f"{phrase} {where}",
             f"a high contrast {c} pattern", "a close up of fine stripes and lines",
             f"an abstract texture of {c} lines", f"a {main.kind} texture {bg_phrase}" if main.size < 0.95
             else f"a {main.kind} texture covering everything", "a busy pattern of thin lines"]
    if extra:
        e = extra[0]
        tail = {"object": f"a {e.colour_name} {e.kind}", "word": "a small sign", "face": "a small face",
                "body": "a small person"}.get(e.category, "something")
        t = [s + f", with {tail} nearby" if i == 0 else s for i, s in enumerate(t)]
    idx = rng.permutation(len(t))[:5]
    caps = [t[i].replace("  ", " ").strip() for i in idx]
    return [s[0].upper() + s[1:] + "." if rng.random() < 0.5 else s for s in caps]


# --------------------------------------------------------------------------------------------- public API
def generate_scene(seed: int, category: str | None = None) -> Scene:
    """Render one scene deterministically from ``seed``.

    Parameters
    ----------
    seed : int
        Any non-negative integer; the same seed (and category) gives the same scene.
    category : str or None
        One of :data:`CATEGORIES`; ``None`` draws it from the seed.

    Returns
    -------
    Scene
        ``image`` uint8 (64, 64, 3), scene graph ``objects``, main ``category``, 5 ``captions``.
    """
    if category is not None and category not in CATEGORIES:
        raise ValueError(f"'category' must be one of {list(CATEGORIES)} or None; {category!r} was provided")
    if int(seed) < 0:
        raise ValueError(f"'seed' must be a non-negative integer; {seed!r} was provided")
    rng = np.random.default_rng(int(seed))
    if category is None:
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    S = RENDER_SIZE
    img = Image.new("RGB", (S, S), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    objects: list[SceneObject] = []
    bg_kind, bg_phrase = "plain", ""
    noun = ""
    pos = lambda lo=0.2, hi=0.8: (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))  # noqa: E731

    if category == "place":
        main, noun, bg_kind = _paint_place(draw, rng, float(rng.uniform(0.35, 0.65)),
                                           float(rng.uniform(0.4, 0.65)), float(rng.uniform(0.5, 0.9)))
        objects.append(main)
    elif category == "texture":
        if rng.random() < 0.4:
            size, (x, y) = 1.0, (0.5, 0.5)
        else:
            bg_kind, bg_phrase = _background(draw, rng, ("plain", "gradient", "sky"))
            size, (x, y) = float(rng.uniform(0.45, 0.8)), pos(0.3, 0.7)
        main, noun = _paint_texture(img, rng, x, y, size)
        objects.append(main)
    else:
        kinds = {"face": ("plain", "gradient", "sky", "wall", "indoor"),
                 "body": ("plain", "sky", "sky", "indoor", "gradient"),
                 "word": ("sky", "wall", "plain", "gradient"),
                 "object": ("plain", "gradient", "indoor", "wall")}[category]
        bg_kind, bg_phrase = _background(draw, rng, kinds)
        n_main = 2 if (category in ("face", "body", "object") and rng.random() < 0.25) else 1
        if category == "object" and n_main > 1:
            n_main = int(rng.integers(2, 4))
        painter = {"face": _paint_face, "body": _paint_figure, "word": _paint_sign, "object": _paint_object}
        size_rng = {"face": (0.25, 0.6), "body": (0.4, 0.8), "word": (0.35, 0.75), "object": (0.2, 0.45)}
        for k in range(n_main):
            lo, hi = size_rng[category]
            size = float(rng.uniform(lo, hi)) * (0.75 if n_main > 1 else 1.0)
            if n_main == 1:
                x, y = pos(0.15 + size / 3, 0.85 - size / 3)
            else:
                x = (k + 0.5) / n_main + float(rng.uniform(-0.05, 0.05))
                y = float(rng.uniform(0.35, 0.65))
            objects.append(painter[category](draw, rng, x, y, size))
    n_main = len(objects)
    extra: list[SceneObject] = []
    if category in ("face", "body", "place", "word") and rng.random() < 0.25:
        # a small distractor object in a free corner
        corner = int(rng.integers(4))
        x, y = (0.15 if corner % 2 == 0 else 0.85), (0.8 if corner < 2 else 0.2)
        if category == "place":
            y = 0.85
        extra.append(_paint_object(draw, rng, x, y, float(rng.uniform(0.12, 0.2))))
    objects.extend(extra)
    small = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
    image = np.asarray(small, dtype=np.uint8).copy()
    captions = _captions(rng, category, objects[0], noun, bg_phrase or "", n_main, extra)
    return Scene(image=image, objects=objects, category=category, captions=captions, seed=int(seed),
                 background=bg_kind)


def scene_seed(index: int, seed: int = 0) -> int:
    """Seed of scene ``index`` in the sequence :func:`generate_scenes` draws with base ``seed``."""
    return seed_for("scene", int(index), base_seed=seed)


def generate_scenes(n: int, seed: int = 0, categories: Sequence[str] = CATEGORIES) -> list[Scene]:
    """``n`` scenes, category-balanced: scene ``i`` has category ``categories[i % len(categories)]``.

    Scene ``i`` is ``generate_scene(scene_seed(i, seed), category)``, so any scene can be regenerated alone.
    """
    if int(n) < 0:
        raise ValueError(f"'n' must be a non-negative integer; {n!r} was provided")
    bad = [c for c in categories if c not in CATEGORIES]
    if bad or not categories:
        raise ValueError(f"'categories' must be a non-empty subset of {list(CATEGORIES)}; {list(categories)!r} "
                         "was provided")
    return [generate_scene(scene_seed(i, seed), categories[i % len(categories)]) for i in range(int(n))]


def category_labels(scenes: Sequence[Scene]) -> np.ndarray:
    """Main-category labels, int64 (n_scenes,), indices into :data:`CATEGORIES`."""
    return np.array([CATEGORIES.index(s.category) for s in scenes], dtype=np.int64)


def stack_images(scenes: Sequence[Scene]) -> np.ndarray:
    """Images as one uint8 array (n_scenes, 64, 64, 3)."""
    if len(scenes) == 0:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return np.stack([s.image for s in scenes]).astype(np.uint8, copy=False)
