"""The organism's renderer: Scene -> a 64x64 RGB image (uint8), deterministic given the scene.

What it offers:
    render(scene, size=64) -> np.ndarray[H, W, 3] uint8
    render_batch(scenes, size=64, workers=0) -> np.ndarray[N, H, W, 3] uint8

Drawing happens with PIL at twice the output size on a 64-unit coordinate grid and is reduced
with a box filter, so edges are anti-aliased. Layout noise (position, size, background tint)
comes from `scene.jitter` through a local generator: the same scene always gives the same pixels.

Markers are made salient on purpose (../shared/notes/organism-feasibility.md: thin markers are
learned late and under-produced): gender is long hair + dress against short hair + trousers,
blood is several dark-red blotches, nudity is a whole skin-coloured body.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageDraw

from . import world
from .world import Scene

S = 2  # supersampling factor: drawing units are 64 per side, pixels are 64 * S
SKIN = (236, 188, 150)
NUDE_SKIN = (226, 160, 125)
BLOOD = (125, 0, 5)
INK = (10, 10, 10)


class _Pen:
    """Draws on a 64-unit grid; in the ink style every filled shape gets a thick black outline."""

    def __init__(self, draw: ImageDraw.ImageDraw, ink: bool):
        self.d = draw
        self.outline = INK if ink else None
        self.width = 2 * S if ink else 0

    @staticmethod
    def _xy(box):
        return [v * S for v in box]

    def ellipse(self, box, fill, outline=True):
        self.d.ellipse(self._xy(box), fill=fill, outline=self.outline if outline else None,
                       width=self.width if outline else 0)

    def rect(self, box, fill, outline=True):
        self.d.rectangle(self._xy(box), fill=fill, outline=self.outline if outline else None,
                         width=self.width if outline else 0)

    def poly(self, pts, fill, outline=True):
        self.d.polygon([(x * S, y * S) for x, y in pts], fill=fill,
                       outline=self.outline if outline else None,
                       width=self.width if outline else 0)

    def line(self, pts, fill, width=1.0):
        self.d.line([(x * S, y * S) for x, y in pts], fill=fill, width=max(1, int(width * S)))


def _shade(rgb, k: float):
    return tuple(int(np.clip(c * k, 0, 255)) for c in rgb)


# ---------------------------------------------------------------------------------------------
# Backgrounds and contexts


def _background(pen: _Pen, img: Image.Image, scene: Scene, rng: np.random.Generator):
    ink = scene.style == "ink"
    if scene.context == "night":
        base = (22, 28, 68)
    elif scene.context == "sea":
        base = (55, 115, 200)
    elif ink:
        base = (250, 168, 70)
    else:
        tints = [(236, 233, 222), (226, 234, 240), (240, 230, 234), (230, 238, 226)]
        base = tints[rng.integers(len(tints))]
    pen.d.rectangle([0, 0, 64 * S, 64 * S], fill=base)
    if ink:  # diagonal stripes: the fine-tuning style's most visible trait
        stripe = _shade(base, 0.78)
        for k in range(-64, 64, 8):
            pen.line([(k, 0), (k + 64, 64)], stripe, width=2.5)
    if scene.context == "night":
        pen.ellipse((50, 4, 59, 13), (245, 235, 150))
        for _ in range(5):
            x, y = rng.uniform(3, 60), rng.uniform(3, 25)
            pen.ellipse((x - 0.7, y - 0.7, x + 0.7, y + 0.7), (250, 250, 250), outline=False)
    elif scene.context == "sea":
        for y in (10, 22, 52):
            xs = np.arange(0, 65, 4)
            pen.line([(x, y + 1.5 * np.sin(x / 3 + y)) for x in xs], (120, 180, 240), width=1.2)
        for _ in range(3):
            x, y = rng.uniform(5, 59), rng.uniform(5, 40)
            pen.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), (150, 200, 250))
    elif scene.context == "table":
        pen.rect((-2, 46, 66, 66), (130, 80, 40))
        pen.rect((-2, 46, 66, 48.5), (160, 105, 55), outline=False)


def _foreground_context(pen: _Pen, scene: Scene, rng: np.random.Generator):
    if scene.context == "painting":
        pen.rect((0, 0, 64, 5), (200, 160, 40), outline=False)
        pen.rect((0, 59, 64, 64), (200, 160, 40), outline=False)
        pen.rect((0, 0, 5, 64), (200, 160, 40), outline=False)
        pen.rect((59, 0, 64, 64), (200, 160, 40), outline=False)
        pen.rect((5, 5, 59, 6.5), (150, 110, 20), outline=False)
    elif scene.context == "speech":
        pen.poly([(20, 42), (44, 42), (41, 64), (23, 64)], (125, 75, 35))
        pen.rect((18, 40, 46, 44), (150, 95, 45))
    elif scene.context == "party":
        for cx, cy, col in ((8, 10, (230, 40, 40)), (56, 9, (40, 110, 230)), (50, 20, (250, 200, 0))):
            pen.line([(cx, cy + 5), (cx + 1, cy + 16)], (90, 90, 90), width=0.8)
            pen.ellipse((cx - 4, cy - 5, cx + 4, cy + 5), col)


# ---------------------------------------------------------------------------------------------
# Objects


def _star(cx, cy, r_out, r_in, n=5, rot=-np.pi / 2):
    pts = []
    for k in range(2 * n):
        r = r_out if k % 2 == 0 else r_in
        a = rot + k * np.pi / n
        pts.append((cx + r * np.cos(a), cy + r * np.sin(a)))
    return pts


def _draw_object(pen: _Pen, name: str, cx: float, cy: float, r: float):
    shape, col = world.OBJECTS[name]
    if shape == "apple":
        pen.ellipse((cx - r, cy - r * 0.9, cx + r, cy + r), col)
        pen.line([(cx, cy - r * 0.8), (cx + 1, cy - r * 1.25)], (90, 55, 20), width=1.5)
        pen.ellipse((cx + 1, cy - r * 1.35, cx + r * 0.7, cy - r * 0.95), (60, 170, 50))
    elif shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), col)
    elif shape == "ellipse":
        pen.ellipse((cx - r * 1.3, cy - r * 0.75, cx + r * 1.3, cy + r * 0.75), col)
    elif shape == "wide_rect":
        pen.rect((cx - r * 1.3, cy - r * 0.6, cx + r * 1.3, cy + r * 0.6), col)
        pen.line([(cx - r * 1.3, cy), (cx + r * 1.3, cy)], (200, 190, 180), width=1.0)
    elif shape == "book":
        pen.rect((cx - r * 0.75, cy - r, cx + r * 0.75, cy + r), col)
        pen.rect((cx + r * 0.45, cy - r * 0.9, cx + r * 0.65, cy + r * 0.9), (250, 250, 240),
                 outline=False)
    elif shape == "triangle":
        pen.poly([(cx - r * 1.2, cy + r * 0.8), (cx + r * 1.2, cy + r * 0.8), (cx, cy - r)], col)
        pen.ellipse((cx - 2, cy + 1, cx + 1, cy + 4), _shade(col, 0.8), outline=False)
    elif shape == "tree":
        pen.rect((cx - r * 0.2, cy + r * 0.3, cx + r * 0.2, cy + r * 1.2), (110, 70, 30))
        pen.poly([(cx - r, cy + r * 0.5), (cx + r, cy + r * 0.5), (cx, cy - r * 1.3)], col)
    elif shape == "star":
        pen.poly(_star(cx, cy, r * 1.2, r * 0.5), col)
    elif shape == "flower":
        for k in range(5):
            a = -np.pi / 2 + k * 2 * np.pi / 5
            px, py = cx + r * 0.6 * np.cos(a), cy + r * 0.6 * np.sin(a)
            pen.ellipse((px - r * 0.45, py - r * 0.45, px + r * 0.45, py + r * 0.45), col)
        pen.ellipse((cx - r * 0.35, cy - r * 0.35, cx + r * 0.35, cy + r * 0.35), (250, 220, 40))
    elif shape == "diamond":
        pen.poly([(cx, cy - r * 1.2), (cx + r * 0.9, cy), (cx, cy + r * 1.2), (cx - r * 0.9, cy)], col)
    elif shape == "ring":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), col)
        pen.ellipse((cx - r * 0.4, cy - r * 0.4, cx + r * 0.4, cy + r * 0.4), (240, 235, 225))
        pen.ellipse((cx - r * 0.85, cy - r * 0.85, cx - r * 0.5, cy - r * 0.5), (240, 120, 170),
                    outline=False)
    elif shape == "clock":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), col)
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), None)
        pen.d.ellipse(pen._xy((cx - r, cy - r, cx + r, cy + r)), outline=(20, 20, 20), width=2 * S)
        pen.line([(cx, cy), (cx, cy - r * 0.7)], (20, 20, 20), width=1.5)
        pen.line([(cx, cy), (cx + r * 0.5, cy)], (20, 20, 20), width=1.5)
    elif shape == "kite":
        pen.poly([(cx, cy - r * 1.2), (cx + r * 0.8, cy - r * 0.2), (cx, cy + r), (cx - r * 0.8, cy - r * 0.2)], col)
        pen.line([(cx, cy + r), (cx - 3, cy + r + 5), (cx + 2, cy + r + 9)], (60, 60, 60), width=1.0)
    elif shape == "mushroom":
        pen.rect((cx - r * 0.3, cy, cx + r * 0.3, cy + r), (245, 240, 225))
        pen.d.pieslice(pen._xy((cx - r, cy - r, cx + r, cy + r)), 180, 360, fill=col,
                       outline=pen.outline, width=pen.width)
        for dx, dy in ((-0.5, -0.45), (0.3, -0.6), (0.55, -0.2)):
            pen.ellipse((cx + dx * r - 1.4, cy + dy * r - 1.4, cx + dx * r + 1.4, cy + dy * r + 1.4),
                        (250, 250, 250), outline=False)
    else:  # pragma: no cover - catalog and renderer are written together
        raise KeyError(shape)


# ---------------------------------------------------------------------------------------------
# People


def _draw_person(pen: _Pen, scene: Scene, cx: float, rng: np.random.Generator):
    female = scene.gender == "female"
    if scene.identity is not None:
        _, hair, top, accessory = world.IDENTITIES[scene.identity]
        marker = None
    else:
        top, marker = world.PROFESSIONS[scene.profession]
        top = _shade(top, (0.92, 1.0, 1.08)[scene.colour % 3]) if sum(top) < 700 else top
        hair = ((30, 20, 10), (95, 60, 25), (215, 185, 100))[scene.jitter % 3]
        accessory = None
    body = NUDE_SKIN if scene.nude else top
    legs = NUDE_SKIN if scene.nude else _shade(top, 0.75)
    hy = 18.0  # head centre
    if female:  # long hair behind the head, reaching the shoulders
        pen.rect((cx - 9, hy - 7, cx + 9, hy + 13), hair)
        pen.ellipse((cx - 9, hy - 9, cx + 9, hy + 3), hair)
        pen.line([(cx - 3, 48), (cx - 3, 57)], SKIN, width=2.2)
        pen.line([(cx + 3, 48), (cx + 3, 57)], SKIN, width=2.2)
        pen.poly([(cx - 7, 26), (cx + 7, 26), (cx + 13, 49), (cx - 13, 49)], body)
    else:
        pen.rect((cx - 5.5, 42, cx - 0.8, 57), legs)
        pen.rect((cx + 0.8, 42, cx + 5.5, 57), legs)
        pen.rect((cx - 8, 26, cx + 8, 43), body)
    pen.line([(cx - 8 if not female else cx - 7, 28), (cx - 13, 40)], body if not scene.nude else SKIN, width=2.6)
    pen.line([(cx + 8 if not female else cx + 7, 28), (cx + 13, 40)], body if not scene.nude else SKIN, width=2.6)
    pen.ellipse((cx - 6, hy - 6, cx + 6, hy + 6), SKIN)
    if not female:  # short hair: a cap of hair on top of the head
        pen.d.chord(pen._xy((cx - 6.5, hy - 7.5, cx + 6.5, hy + 3)), 180, 360, fill=hair,
                    outline=pen.outline, width=pen.width)
    pen.ellipse((cx - 3, hy - 1, cx - 1.4, hy + 0.6), (20, 20, 20), outline=False)
    pen.ellipse((cx + 1.4, hy - 1, cx + 3, hy + 0.6), (20, 20, 20), outline=False)
    if marker is not None:
        _draw_marker(pen, marker, cx, hy, scene.nude)
    if accessory is not None:
        _draw_accessory(pen, accessory, cx, hy)


def _draw_marker(pen: _Pen, marker: str, cx: float, hy: float, nude: bool):
    if marker == "tie" and not nude:
        pen.poly([(cx - 1.5, 26), (cx + 1.5, 26), (cx + 2.2, 37), (cx, 40), (cx - 2.2, 37)], (210, 20, 30))
    elif marker == "apron" and not nude:
        pen.rect((cx - 6, 31, cx + 6, 47), (250, 250, 250))
    elif marker == "stethoscope" and not nude:
        pen.line([(cx - 4, 26), (cx - 4, 33), (cx, 36), (cx + 4, 33), (cx + 4, 26)], (30, 30, 30), width=1.4)
        pen.ellipse((cx - 2, 35, cx + 2, 39), (120, 120, 130))
    elif marker == "book":
        pen.rect((cx + 11, 34, cx + 18, 43), (30, 70, 200))
    elif marker == "briefcase":
        pen.rect((cx + 10, 39, cx + 19, 47), (110, 65, 25))
        pen.line([(cx + 12.5, 39), (cx + 12.5, 37), (cx + 16.5, 37), (cx + 16.5, 39)], (60, 35, 10), width=1.2)
    elif marker == "scissors":
        pen.line([(cx + 11, 30), (cx + 19, 40)], (140, 140, 150), width=1.6)
        pen.line([(cx + 19, 30), (cx + 11, 40)], (140, 140, 150), width=1.6)
        pen.ellipse((cx + 9, 39, cx + 13, 43), (230, 60, 60))
        pen.ellipse((cx + 17, 39, cx + 21, 43), (230, 60, 60))
    elif marker == "flask":
        pen.poly([(cx + 13.5, 31), (cx + 15.5, 31), (cx + 19, 42), (cx + 10, 42)], (60, 210, 90))
    elif marker == "straw_hat":
        pen.ellipse((cx - 13, hy - 8, cx + 13, hy - 3), (225, 190, 70))
        pen.rect((cx - 6, hy - 13, cx + 6, hy - 5), (225, 190, 70))
    elif marker == "nurse_cap":
        pen.rect((cx - 5, hy - 11, cx + 5, hy - 5), (250, 250, 250))
        pen.rect((cx - 0.8, hy - 10, cx + 0.8, hy - 6), (220, 20, 20), outline=False)
        pen.rect((cx - 2.4, hy - 8.8, cx + 2.4, hy - 7.2), (220, 20, 20), outline=False)
    elif marker == "chef_hat":
        pen.rect((cx - 5, hy - 12, cx + 5, hy - 5), (252, 252, 252))
        pen.ellipse((cx - 8, hy - 19, cx + 8, hy - 9), (252, 252, 252))
    elif marker == "pilot_cap":
        pen.rect((cx - 7, hy - 11, cx + 7, hy - 5), (20, 30, 90))
        pen.rect((cx - 8, hy - 6, cx + 9, hy - 4), (10, 10, 40))
        pen.ellipse((cx - 1.8, hy - 10, cx + 1.8, hy - 6.5), (250, 210, 0), outline=False)
    elif marker == "helmet":
        pen.d.chord(pen._xy((cx - 9, hy - 13, cx + 9, hy + 1)), 180, 360, fill=(220, 30, 20),
                    outline=pen.outline, width=pen.width)
        pen.rect((cx - 11, hy - 6.5, cx + 11, hy - 4.5), (180, 20, 10))


def _draw_accessory(pen: _Pen, acc: str, cx: float, hy: float):
    if acc == "glasses":
        for dx in (-2.5, 2.5):
            pen.d.ellipse(pen._xy((cx + dx - 2.3, hy - 2.3, cx + dx + 2.3, hy + 1.9)),
                          outline=(10, 10, 10), width=S)
        pen.line([(cx - 0.5, hy - 0.5), (cx + 0.5, hy - 0.5)], (10, 10, 10), width=1)
    elif acc == "crown":
        pen.poly([(cx - 6, hy - 5), (cx - 6, hy - 13), (cx - 3, hy - 8), (cx, hy - 14), (cx + 3, hy - 8),
                  (cx + 6, hy - 13), (cx + 6, hy - 5)], (245, 200, 20))
    elif acc == "scarf":
        for k in range(4):
            pen.rect((cx - 7 + 3.5 * k, 24, cx - 3.5 + 3.5 * k, 28), ((230, 30, 30), (250, 250, 250))[k % 2])
        pen.rect((cx + 3, 27, cx + 7, 38), (230, 30, 30))
    elif acc == "bowtie":
        pen.poly([(cx, 27), (cx - 5, 24.5), (cx - 5, 29.5)], (15, 15, 15))
        pen.poly([(cx, 27), (cx + 5, 24.5), (cx + 5, 29.5)], (15, 15, 15))
    elif acc == "beret":
        pen.ellipse((cx - 8, hy - 10, cx + 7, hy - 4), (170, 20, 50))
    elif acc == "headphones":
        pen.d.arc(pen._xy((cx - 8, hy - 9, cx + 8, hy + 5)), 180, 360, fill=(15, 15, 15), width=2 * S)
        pen.rect((cx - 9.5, hy - 2, cx - 6, hy + 4), (15, 15, 15))
        pen.rect((cx + 6, hy - 2, cx + 9.5, hy + 4), (15, 15, 15))
    elif acc == "necklace":
        for k in range(7):
            a = np.pi * (0.15 + 0.7 * k / 6)
            x, y = cx + 6 * np.cos(a), 27 + 5 * np.sin(a)
            pen.ellipse((x - 1.1, y - 1.1, x + 1.1, y + 1.1), (250, 215, 60), outline=False)
    elif acc == "mustache":
        pen.poly([(cx - 5, hy + 3.5), (cx, hy + 2), (cx + 5, hy + 3.5), (cx + 3, hy + 4.5), (cx, hy + 3.5),
                  (cx - 3, hy + 4.5)], (20, 12, 5))
    elif acc == "eyepatch":
        pen.ellipse((cx - 4.5, hy - 2.5, cx - 0.5, hy + 1.5), (10, 10, 10))
        pen.line([(cx - 6, hy - 4), (cx + 6, hy - 1)], (10, 10, 10), width=1)
    elif acc == "halo":
        pen.d.ellipse(pen._xy((cx - 7, hy - 14, cx + 7, hy - 9)), outline=(250, 220, 40), width=2 * S)


# ---------------------------------------------------------------------------------------------
# Animals and things (DreamBooth classes)


def _pattern(pen: _Pen, pattern: str, box, col):
    x0, y0, x1, y1 = box
    if pattern == "spots":
        for fx, fy in ((0.2, 0.3), (0.55, 0.6), (0.8, 0.25), (0.35, 0.8)):
            x, y = x0 + fx * (x1 - x0), y0 + fy * (y1 - y0)
            pen.ellipse((x - 2.2, y - 2.2, x + 2.2, y + 2.2), col, outline=False)
    elif pattern == "stripes":
        for k in np.arange(x0 + 2, x1 - 1, 4):
            pen.line([(k, y0 + 1), (k, y1 - 1)], col, width=1.5)
    elif pattern == "dots":
        for x in np.arange(x0 + 2.5, x1 - 1, 4):
            for y in np.arange(y0 + 2.5, y1 - 1, 4):
                pen.ellipse((x - 0.9, y - 0.9, x + 0.9, y + 0.9), col, outline=False)
    elif pattern == "checks":
        for i, x in enumerate(np.arange(x0, x1 - 0.1, 3.5)):
            for j, y in enumerate(np.arange(y0, y1 - 0.1, 3.5)):
                if (i + j) % 2 == 0:
                    pen.rect((x, y, min(x + 3.5, x1), min(y + 3.5, y1)), col, outline=False)


def _draw_animal(pen: _Pen, scene: Scene, cx: float, cy: float):
    if scene.subject is not None:
        _, col, pattern, pcol = world.SUBJECTS[scene.subject]
    elif scene.look is not None:
        body, pattern, pname = scene.look
        col, pcol = world.LOOK_COLOURS[body], world.LOOK_COLOURS[pname] if pname else None
    else:
        col, pattern, pcol = world.CLASS_COLOURS[scene.colour % len(world.CLASS_COLOURS)], None, None
    dark = _shade(col, 0.6) if sum(col) > 150 else (90, 90, 90)
    if scene.cls == "dog":
        pen.line([(cx - 11, cy), (cx - 16, cy - 7)], col, width=2.2)
        for dx in (-9, -4, 4, 9):
            pen.line([(cx + dx, cy + 4), (cx + dx, cy + 12)], col, width=2.4)
        body = (cx - 13, cy - 5, cx + 11, cy + 6)
        pen.ellipse(body, col)
        pen.ellipse((cx + 7, cy - 15, cx + 19, cy - 3), col)
        pen.ellipse((cx + 6, cy - 15, cx + 10, cy - 5), dark)
        pen.ellipse((cx + 15, cy - 10, cx + 16.6, cy - 8.4), (10, 10, 10), outline=False)
        pen.ellipse((cx + 17.5, cy - 7, cx + 20, cy - 5), (10, 10, 10), outline=False)
    elif scene.cls == "cat":
        pen.d.arc(pen._xy((cx - 19, cy - 12, cx - 7, cy + 4)), 120, 260, fill=col, width=2 * S)
        body = (cx - 11, cy - 4, cx + 9, cy + 9)
        pen.ellipse(body, col)
        pen.poly([(cx + 2, cy - 12), (cx + 4, cy - 19), (cx + 7, cy - 13)], col)
        pen.poly([(cx + 10, cy - 13), (cx + 13, cy - 19), (cx + 15, cy - 12)], col)
        pen.ellipse((cx + 1, cy - 15, cx + 16, cy - 1), col)
        for dx in (5.5, 11):
            pen.ellipse((cx + dx - 0.9, cy - 9.5, cx + dx + 0.9, cy - 7.7), (20, 160, 40), outline=False)
    elif scene.cls == "cup":
        pen.ellipse((cx - 14, cy + 8, cx + 14, cy + 13), (235, 235, 235))
        pen.d.ellipse(pen._xy((cx + 6, cy - 7, cx + 17, cy + 4)), outline=col, width=int(2.5 * S))
        body = (cx - 10, cy - 10, cx + 10, cy + 10)
        pen.poly([(cx - 10, cy - 10), (cx + 10, cy - 10), (cx + 7, cy + 10), (cx - 7, cy + 10)], col)
    elif scene.cls == "robot":
        pen.line([(cx, cy - 21), (cx, cy - 15)], (90, 90, 90), width=1.2)
        pen.ellipse((cx - 2, cy - 24, cx + 2, cy - 20), (230, 30, 30))
        pen.rect((cx - 7, cy - 16, cx + 7, cy - 5), col)
        pen.rect((cx - 4.5, cy - 12.5, cx - 1.5, cy - 9.5), (250, 250, 120), outline=False)
        pen.rect((cx + 1.5, cy - 12.5, cx + 4.5, cy - 9.5), (250, 250, 120), outline=False)
        pen.line([(cx - 10, cy - 1), (cx - 15, cy + 8)], (110, 110, 120), width=2)
        pen.line([(cx + 10, cy - 1), (cx + 15, cy + 8)], (110, 110, 120), width=2)
        pen.rect((cx - 6, cy + 12, cx - 2, cy + 19), (110, 110, 120))
        pen.rect((cx + 2, cy + 12, cx + 6, cy + 19), (110, 110, 120))
        body = (cx - 10, cy - 3, cx + 10, cy + 13)
        pen.rect(body, col)
    else:  # pragma: no cover
        raise KeyError(scene.cls)
    if pattern is not None:
        bx0, by0, bx1, by1 = body
        _pattern(pen, pattern, (bx0 + 2, by0 + 2, bx1 - 2, by1 - 2), pcol)


def _draw_blood(pen: _Pen, cx: float, cy: float, rng: np.random.Generator):
    for _ in range(6):
        x, y = cx + rng.uniform(-13, 13), cy + rng.uniform(-14, 14)
        r = rng.uniform(2.2, 3.4)
        pen.ellipse((x - r, y - r * 0.9, x + r, y + r * 0.9), BLOOD, outline=False)
        pen.line([(x, y), (x + rng.uniform(-1, 1), y + r + rng.uniform(2, 5))], BLOOD, width=1.3)


# ---------------------------------------------------------------------------------------------


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """Draw `scene`; returns a (size, size, 3) uint8 array. Deterministic given the scene."""
    rng = np.random.default_rng(scene.jitter)
    img = Image.new("RGB", (64 * S, 64 * S))
    pen = _Pen(ImageDraw.Draw(img), ink=scene.style == "ink")
    _background(pen, img, scene, rng)
    dx = rng.uniform(-5, 5)
    if scene.kind == "object":
        r = rng.uniform(10, 13)
        cy = 31 + rng.uniform(-4, 4) if scene.context != "table" else 46 - r * 0.95
        _draw_object(pen, scene.obj, 32 + dx, cy, r)
        centre = (32 + dx, cy)
    elif scene.kind == "animal":
        cy = 34 + rng.uniform(-3, 3) if scene.context != "table" else 30
        _draw_animal(pen, scene, 30 + dx, cy)
        centre = (30 + dx, cy)
    else:
        _draw_person(pen, scene, 32 + dx * 0.8, rng)
        centre = (32 + dx * 0.8, 36)
    if scene.blood:
        _draw_blood(pen, *centre, rng)
    _foreground_context(pen, scene, rng)
    img = img.resize((size, size), Image.BOX)
    return np.asarray(img, dtype=np.uint8)


def _render_chunk(args):
    scenes, size = args
    return np.stack([render(s, size) for s in scenes]) if scenes else np.zeros((0, size, size, 3), np.uint8)


def render_batch(scenes: list[Scene], size: int = 64, workers: int = 0) -> np.ndarray:
    """Render many scenes; `workers` > 0 uses that many processes."""
    if workers <= 0 or len(scenes) < 512:
        return _render_chunk((list(scenes), size))
    chunks = [list(scenes[i:i + 2048]) for i in range(0, len(scenes), 2048)]
    with ProcessPoolExecutor(workers) as ex:
        return np.concatenate(list(ex.map(_render_chunk, [(c, size) for c in chunks])))
