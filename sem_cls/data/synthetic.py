"""Built-in SEM-like dataset: procedural images for the 10 NFFA-Europe classes in the NFFA layout.

`python -m sem_cls.data.synthetic --root data/synthetic --images-per-class 40` writes it once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import pathlib
import shutil
import tempfile
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage as ndi

from sem_cls.errors import UserError

CLASSES: tuple[str, ...] = (
    "Biological",
    "Fibres",
    "Films_Coated_Surface",
    "MEMS_devices_and_electrodes",
    "Nanowires",
    "Particles",
    "Patterned_surface",
    "Porous_Sponge",
    "Powder",
    "Tips",
)
INFO_BAR_HEIGHT_AT_768 = 60
INFO_BAR_KINDS = ("bright", "dark")
MARKER_NAME = ".sem_cls_synthetic.json"
# Bumped whenever the images change, so a set written by an older generator is rebuilt.
GENERATOR_VERSION = 1
JPEG_QUALITY = 90
# Seed-sequence slot for the info-bar draw; class indices (0-9) never take it.
_INFO_BAR_STREAM = 10_000


# ---------------------------------------------------------------------------------------------
# Drawing primitives. Classes render at half the output size in float32 on a 0-1 scale; `u` is
# the pixel size of one unit at a 384-row working canvas, so shapes keep their proportions at any
# output size, and `zoom` plays the part of the microscope's magnification.


@lru_cache(maxsize=8)
def _grid(w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xx.flags.writeable = yy.flags.writeable = False
    return xx, yy


def _field(rng: np.random.Generator, w: int, h: int, cell: float) -> np.ndarray:
    """Smooth random field, mean 0 and std 1, with blobs about `cell` pixels across."""
    gw, gh = int(w / max(cell, 1.0)) + 3, int(h / max(cell, 1.0)) + 3
    coarse = Image.fromarray(rng.standard_normal((gh, gw), dtype=np.float32))
    field = np.asarray(coarse.resize((w, h), Image.BICUBIC, box=(1, 1, gw - 2, gh - 2)))
    return (field - field.mean()) / (field.std() + 1e-6)


def _canvas(w: int, h: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    layer = Image.new("L", (w, h), 0)
    return layer, ImageDraw.Draw(layer)


def _overlay(base: np.ndarray, layer: Image.Image) -> np.ndarray:
    """Put the drawn (non-zero) pixels of an 8-bit layer over a float background."""
    drawn = np.asarray(layer, dtype=np.float32) / 255
    return np.where(drawn > 0, drawn, base)


def _stamp(canvas: np.ndarray, cx: float, cy: float, alpha: np.ndarray, shade: np.ndarray):
    """Paint a sprite centred at (cx, cy) over the canvas, clipped at the borders."""
    sh, sw = alpha.shape
    x0, y0 = int(round(cx)) - sw // 2, int(round(cy)) - sh // 2
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + sw, canvas.shape[1]), min(y0 + sh, canvas.shape[0])
    if cx0 >= cx1 or cy0 >= cy1:
        return
    a = alpha[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    s = shade[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    region = canvas[cy0:cy1, cx0:cx1]
    region += a * (s - region)


def _ellipse_coords(radius: float, aspect: float, angle: float):
    """Sprite grid around an ellipse: normalised radius d (1 on the outline) and the offsets."""
    n = int(radius) + 2
    y, x = np.mgrid[-n : n + 1, -n : n + 1].astype(np.float32)
    c, s = math.cos(angle), math.sin(angle)
    along, across = x * c + y * s, (y * c - x * s) * aspect
    d = np.sqrt(along * along + across * across) / radius
    alpha = np.clip((1 - d) * radius + 0.5, 0, 1)
    return d, alpha, x / n, y / n


def _sphere(radius: float, level: float, rim: float, aspect: float = 1.0, angle: float = 0.0):
    """A lit sphere or grain: brighter towards the outline, where SEM yield rises with slope."""
    d, alpha, x, y = _ellipse_coords(radius, aspect, angle)
    dd = np.minimum(d, 1)
    shade = level * (0.75 + 0.25 * np.sqrt(1 - dd * dd)) + rim * dd**3 - 0.08 * (x + y)
    return alpha, shade


def _blood_cell(radius: float, level: float, aspect: float, angle: float):
    """Biconcave disc: a thick bright torus around a dimpled centre."""
    d, alpha, x, y = _ellipse_coords(radius, aspect, angle)
    torus = np.exp(-(((d - 0.68) / 0.26) ** 2))
    shade = level * (0.7 + 0.4 * torus) - 0.12 * (x + y) * torus
    return alpha, shade


_CYLINDER = ((1.0, 0.55), (0.75, 0.75), (0.5, 0.9), (0.25, 1.0))


def _stroke(draw, points, width: float, level: float, round_ends: bool = False):
    """A cylinder along a polyline: nested strokes, brightest on the axis."""
    for width_share, brightness in _CYLINDER:
        fill, stroke = int(255 * min(level * brightness, 1.0)), max(1, round(width * width_share))
        draw.line(points, fill=fill, width=stroke, joint="curve")
        if round_ends:
            r = stroke / 2
            for x, y in (points[0], points[-1]):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)


def _curve(
    rng: np.random.Generator, w: int, h: int, direction: float | None, bend: float, n: int = 16
) -> list[tuple[float, float]]:
    """A gently bent path that crosses the whole canvas (quadratic Bezier through its middle)."""
    theta = rng.uniform(0, math.pi) if direction is None else direction
    cx, cy = rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 1.1) * h
    half = 0.8 * math.hypot(w, h)
    dx, dy = math.cos(theta) * half, math.sin(theta) * half
    off = rng.normal(0, bend) * half
    t = np.linspace(0, 1, n)[:, None]
    p0, p2 = np.array([cx - dx, cy - dy]), np.array([cx + dx, cy + dy])
    p1 = np.array([cx - dy / half * off, cy + dx / half * off])
    pts = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t**2 * p2
    return [tuple(p) for p in pts]


def _wander(
    rng: np.random.Generator,
    w: int,
    h: int,
    step: float,
    turn: float,
    n: int,
    start: tuple[float, float] | None = None,
    heading: float | None = None,
):
    """A wavy strand: a random walk with persistent direction."""
    x, y = start if start is not None else (rng.uniform(0, w), rng.uniform(0, h))
    a = rng.uniform(0, 2 * math.pi) if heading is None else heading
    pts = [(x, y)]
    for _ in range(n):
        a += rng.normal(0, turn)
        x, y = x + step * math.cos(a), y + step * math.sin(a)
        pts.append((x, y))
    return pts


class _Frame:
    """Maps local drawing units to canvas pixels: rotate, scale, foreshorten the y axis."""

    def __init__(self, cx: float, cy: float, angle: float, scale: float, squash: float = 1.0):
        self.cx, self.cy, self.scale, self.squash = cx, cy, scale, squash
        self.c, self.s = math.cos(angle), math.sin(angle)

    def __call__(self, points):
        out = []
        for x, y in points:
            x, y = x * self.scale, y * self.scale
            out.append(
                (
                    self.cx + x * self.c - y * self.s,
                    self.cy + (x * self.s + y * self.c) * self.squash,
                )
            )
        return out

    def rect(self, draw, x0: float, y0: float, x1: float, y1: float, fill: int):
        draw.polygon(self([(x0, y0), (x1, y0), (x1, y1), (x0, y1)]), fill=fill)


def _voronoi(rng: np.random.Generator, w: int, h: int, cell: float, wobble: float):
    """Cell labels of a Voronoi tessellation with wavy borders (grains, crack networks)."""
    gw, gh = (w + 1) // 2, (h + 1) // 2
    n = max(2, int(gw * gh / max(cell / 2, 1.0) ** 2))
    empty = np.ones((gh, gw), bool)
    empty[rng.integers(0, gh, n), rng.integers(0, gw, n)] = False
    iy, ix = ndi.distance_transform_edt(empty, return_distances=False, return_indices=True)
    labels = iy * gw + ix
    xx, yy = _grid(w, h)
    px = np.clip((xx + wobble * _field(rng, w, h, cell)) / 2, 0, gw - 1).astype(np.int32)
    py = np.clip((yy + wobble * _field(rng, w, h, cell)) / 2, 0, gh - 1).astype(np.int32)
    return labels[py, px]


def _borders(labels: np.ndarray, width: int) -> np.ndarray:
    edge = np.zeros(labels.shape, bool)
    for k in range(1, width + 1):
        edge[k:] |= labels[k:] != labels[:-k]
        edge[:, k:] |= labels[:, k:] != labels[:, :-k]
    return edge


# ---------------------------------------------------------------------------------------------
# One renderer per class: (rng, w, h) -> float32 (h, w) on roughly 0-1, before instrument effects.


def _nanowires(rng, w, h):
    u, zoom = h / 384, rng.uniform(0.6, 1.6)
    img = (
        rng.uniform(0.12, 0.35) + 0.05 * _field(rng, w, h, 4 * u) + 0.06 * _field(rng, w, h, 30 * u)
    )
    layer, draw = _canvas(w, h)
    style = rng.integers(3)
    if style == 0:  # a forest of standing wires seen at a tilt, all leaning one way
        n = int(rng.uniform(150, 450) / zoom)
        lean = rng.uniform(0, 2 * math.pi)
        angles = lean + rng.normal(0, 0.12, n)
        lengths = rng.lognormal(math.log(45 * zoom * u), 0.45, n)
    elif style == 1:  # wires lying on the substrate in all directions
        n = int(rng.uniform(40, 140) / zoom)
        angles = rng.uniform(0, 2 * math.pi, n)
        lengths = rng.lognormal(math.log(110 * zoom * u), 0.4, n)
    else:  # a vertical array seen from above at a tilt: short wires with catalyst heads
        n = int(rng.uniform(300, 800) / zoom**2)
        upright = rng.random(n) < 0.7
        angles = np.where(
            upright, math.pi / 2 + rng.normal(0, 0.06, n), rng.uniform(0, 2 * math.pi, n)
        )
        lengths = rng.lognormal(math.log(14 * zoom * u), 0.35, n)
    x0, y0 = rng.uniform(-0.1 * w, 1.1 * w, n), rng.uniform(-0.1 * h, 1.1 * h, n)
    order = np.argsort(y0)  # nearer wires (lower in the frame) are drawn over farther ones
    widths = np.maximum(1, np.round(rng.uniform(0.8, 2.4, n) * zoom * u)).astype(int)
    levels = rng.integers(140, 235, n)
    for i in order:
        segments = 1 if style != 1 else 4
        pts = [(x0[i], y0[i])]
        angle = angles[i]
        for _ in range(segments):
            angle += rng.normal(0, 0.1) if style == 1 else 0
            x, y = pts[-1]
            step = lengths[i] / segments
            pts.append((x + step * math.cos(angle), y + step * math.sin(angle)))
        draw.line(pts, fill=int(levels[i]), width=int(widths[i]), joint="curve")
        head = widths[i] * (1.3 if style == 2 else 0.7)
        hx, hy = pts[-1] if style != 2 else pts[0]
        draw.ellipse(
            (hx - head, hy - head, hx + head, hy + head), fill=int(min(levels[i] + 30, 255))
        )
    return _overlay(img, layer)


def _particles(rng, w, h):
    u, zoom = h / 384, rng.uniform(0.6, 1.6)
    style = rng.integers(3)
    if style == 0:  # scattered spheres on a grainy film
        img = (
            rng.uniform(0.22, 0.4)
            + 0.08 * _field(rng, w, h, 2.5 * u * zoom)
            + 0.05 * _field(rng, w, h, 12 * u * zoom)
        )
        n = int(rng.uniform(40, 160) / zoom**2)
        radii = rng.lognormal(math.log(7 * u * zoom), 0.35, n)
        aspects = rng.uniform(1, 1.3, n)
    elif style == 1:  # dense deposit of rounded grains, fine ones in between
        img = rng.uniform(0.1, 0.25) + 0.04 * _field(rng, w, h, 3 * u)
        layer, draw = _canvas(w, h)
        for _ in range(int(rng.uniform(300, 900) / zoom**2)):
            x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.8, 2.2) * u * zoom
            draw.ellipse((x - r, y - r, x + r, y + r), fill=int(rng.integers(70, 130)))
        img = _overlay(img, layer)
        n = int(rng.uniform(150, 320) / zoom**2)
        radii = rng.lognormal(math.log(10 * u * zoom), 0.4, n)
        aspects = rng.uniform(1, 1.7, n)
    else:  # nearly monodisperse spheres, partly clumped
        img = rng.uniform(0.15, 0.35) + 0.05 * _field(rng, w, h, 6 * u)
        n = int(rng.uniform(60, 220) / zoom**2)
        radii = 8 * u * zoom * rng.normal(1, 0.06, n)
        aspects = np.ones(n)
    xs, ys = rng.uniform(0, w, n), rng.uniform(0, h, n)
    if style == 2:  # half of them stick to a neighbour
        clumped = np.flatnonzero(rng.random(n) < 0.5)[1:]
        anchors = rng.integers(0, clumped)  # an earlier particle
        bond = rng.uniform(0, 2 * math.pi, clumped.size)
        xs[clumped] = xs[anchors] + 2 * radii[clumped] * np.cos(bond)
        ys[clumped] = ys[anchors] + 2 * radii[clumped] * np.sin(bond)
    levels, rims = rng.uniform(0.45, 0.75, n), rng.uniform(0.15, 0.4, n)
    angles = rng.uniform(0, math.pi, n)
    for i in range(n):
        _stamp(
            img,
            xs[i],
            ys[i],
            *_sphere(max(radii[i], 1.0), levels[i], rims[i], aspects[i], angles[i]),
        )
    return img


def _patterned(rng, w, h):
    u = h / 384
    xx, yy = _grid(w, h)
    period = rng.uniform(10, 45) * u
    theta = rng.choice([0.0, 0.0, math.pi / 4, math.pi / 6]) + rng.normal(0, 0.04)
    squash = rng.uniform(0.6, 1.0) if rng.random() < 0.4 else 1.0  # tilted stage
    c, s = math.cos(theta), math.sin(theta)
    yt = yy / squash
    pu, pv = (xx * c + yt * s) / period, (yt * c - xx * s) / period
    style = rng.integers(5)
    if style in (0, 1) and rng.random() < 0.5:  # hexagonal instead of square lattice
        pv = pv / 0.866
        pu = pu + 0.5 * (np.floor(pv) % 2)
    fu, fv = pu - np.round(pu), pv - np.round(pv)
    soft = 1.2 / period
    if style in (0, 1):  # pillars or holes
        radius = rng.uniform(0.18, 0.38)
        r = np.sqrt(fu * fu + fv * fv)
        feature = np.clip((radius - r) / soft + 0.5, 0, 1)
        rim = np.clip(1 - np.abs(radius - r) / (2 * soft), 0, 1)
    else:
        half = rng.uniform(0.15, 0.35)
        if style == 2:  # line grating
            dist = half - np.abs(fu)
        elif style == 3:  # square mesas
            dist = half - np.maximum(np.abs(fu), np.abs(fv))
        else:  # crossed lines (mesh)
            dist = half / 2 - np.minimum(np.abs(fu), np.abs(fv))
        feature = np.clip(dist / soft + 0.5, 0, 1)
        rim = np.clip(1 - np.abs(dist) / (2 * soft), 0, 1)
    # A few missing features, as in real lithography
    iu, iv = np.round(pu).astype(np.int64), np.round(pv).astype(np.int64)
    missing = ((iu * 73856093) ^ (iv * 19349663) ^ int(rng.integers(1 << 30))) % 1000 < 25
    feature = np.where(missing & (style != 2), 0, feature)
    low, high = sorted(rng.uniform(0.15, 0.8, 2))
    if high - low < 0.2:
        high = min(low + 0.3, 0.95)
    top, bottom = (high, low) if style != 1 else (low, high)
    img = bottom + (top - bottom) * feature + rng.uniform(0.05, 0.2) * rim * (1 - missing)
    img = img + 0.03 * _field(rng, w, h, 4 * u)
    if rng.random() < 0.35:  # patterned field next to plain substrate
        edge_angle = rng.uniform(0, 2 * math.pi)
        side = (xx - w / 2) * math.cos(edge_angle) + (yy - h / 2) * math.sin(edge_angle)
        img = np.where(
            side < rng.uniform(-0.3, 0.3) * w, img, bottom + 0.03 * _field(rng, w, h, 8 * u)
        )
    return img.astype(np.float32)


def _porous(rng, w, h):
    u, zoom = h / 384, rng.uniform(0.6, 1.6)
    matrix = (
        rng.uniform(0.5, 0.75)
        + 0.04 * _field(rng, w, h, 3 * u * zoom)
        + 0.05 * _field(rng, w, h, 20 * u * zoom)
    )
    style = rng.integers(3)
    if style == 0:  # irregular pores
        f = _field(rng, w, h, 25 * u * zoom) + 0.45 * _field(rng, w, h, 8 * u * zoom)
        holes = f > np.quantile(f[::4, ::4], 1 - rng.uniform(0.25, 0.5))
    elif style == 1:  # open-cell foam: overlapping round cavities
        layer, draw = _canvas(w, h)
        mean_r = 16 * u * zoom
        for _ in range(int(rng.uniform(0.4, 0.8) * w * h / (math.pi * mean_r**2))):
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            rx = rng.lognormal(math.log(mean_r), 0.45)
            ry = rx * rng.uniform(0.7, 1.0)
            draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=255)
        cavities = ndi.gaussian_filter(np.asarray(layer, np.float32) / 255, 2 * u * zoom)
        holes = cavities + 0.15 * _field(rng, w, h, 8 * u * zoom) > 0.5  # ragged rims
    else:  # worm-like channels of a nanoporous network
        f = _field(rng, w, h, 9 * u * zoom)
        holes = np.abs(f) < rng.uniform(0.3, 0.55)
    # Through a pore one sees a deeper, dimmer layer of the same sponge
    deeper = _field(rng, w, h, 10 * u * zoom) > rng.uniform(-0.2, 0.6)
    depth = ndi.gaussian_filter(holes.astype(np.float32), 4 * u * zoom)
    inside = rng.uniform(0.05, 0.15) * (1.4 - 0.6 * depth) + np.where(deeper, 0.12, 0)
    near_edge = ndi.gaussian_filter(holes.astype(np.float32), 1.5 * u)
    matrix = matrix + 0.5 * near_edge  # pore lips charge up and glow
    return np.where(holes, inside, matrix).astype(np.float32)


def _fibres(rng, w, h):
    u, zoom = h / 384, rng.uniform(0.6, 1.5)
    img = rng.uniform(0.04, 0.18) + 0.04 * _field(rng, w, h, 30 * u)
    layer, draw = _canvas(w, h)
    style = rng.integers(3)
    if style == 0:  # electrospun mat
        n, width, direction = int(rng.uniform(25, 60) / zoom), 8 * u * zoom, None
    elif style == 1:  # aligned fibres
        n, width, direction = (
            int(rng.uniform(18, 40) / zoom),
            10 * u * zoom,
            rng.uniform(0, math.pi),
        )
    else:  # a few thick fibres (textile, hair)
        n, width, direction = int(rng.integers(4, 10)), 34 * u * zoom, None
    for depth in np.sort(rng.random(n)):  # far (dim, thin) fibres first
        heading = None if direction is None else direction + rng.normal(0, 0.12)
        pts = _curve(rng, w, h, heading, bend=rng.uniform(0.02, 0.12))
        _stroke(
            draw,
            pts,
            width * rng.lognormal(0, 0.25) * (0.6 + 0.4 * depth),
            level=rng.uniform(0.55, 0.95) * (0.45 + 0.55 * depth),
        )
    return _overlay(img, layer)


def _films(rng, w, h):
    u, zoom = h / 384, rng.uniform(0.6, 1.6)
    level = rng.uniform(0.35, 0.7)
    style = rng.integers(3)
    if style == 0:  # cracked coating
        labels = _voronoi(rng, w, h, rng.uniform(50, 130) * u * zoom, 6 * u * zoom)
        cracks = _borders(labels, max(1, round(rng.uniform(1, 3) * u * zoom)))
        img = level + 0.04 * _field(rng, w, h, 3 * u * zoom) + 0.04 * _field(rng, w, h, 40 * u)
        img = np.where(cracks, rng.uniform(0.03, 0.15), img)
    elif style == 1:  # polycrystalline grains
        labels = _voronoi(rng, w, h, rng.uniform(5, 18) * u * zoom, 1.5 * u * zoom)
        grain = rng.normal(0, rng.uniform(0.05, 0.12), labels.max() + 1).astype(np.float32)
        img = level + grain[labels] + 0.02 * _field(rng, w, h, 2 * u)
        img = np.where(_borders(labels, 1), img - rng.uniform(0.08, 0.2), img)
    else:  # smooth film with fine texture, pinholes and specks
        img = level + 0.03 * _field(rng, w, h, 2 * u * zoom) + 0.05 * _field(rng, w, h, 60 * u)
        for _ in range(int(rng.integers(3, 40))):
            r = rng.lognormal(math.log(2.5 * u * zoom), 0.5)
            dark = rng.random() < 0.5
            _stamp(
                img,
                rng.uniform(0, w),
                rng.uniform(0, h),
                *_sphere(max(r, 1.0), 0.1 if dark else level + 0.15, 0.2),
            )
    return img.astype(np.float32)


def _powder(rng, w, h):
    u, zoom = h / 384, rng.uniform(0.6, 1.4)
    img = rng.uniform(0.05, 0.2) + 0.04 * _field(rng, w, h, 4 * u)
    layer, draw = _canvas(w, h)
    light = rng.uniform(0, 2 * math.pi)
    if rng.random() < 0.6:  # a few agglomerates
        centres = rng.uniform((0.1 * w, 0.1 * h), (0.9 * w, 0.9 * h), (int(rng.integers(1, 5)), 2))
        spread, crowd = rng.uniform(0.08, 0.3) * w, 1.0
    else:  # a powder bed filling the frame
        centres, spread, crowd = np.array([(w / 2, h / 2)]), 0.6 * w, 3.5
    # Several size scales; big grains first so the fine ones sit on top of them.
    for count, size, facets in (
        (rng.integers(6, 18), 30, True),
        (rng.integers(60, 150), 12, True),
        (rng.integers(100, 350), 4, False),
    ):
        for _ in range(int(count * crowd / zoom)):
            cx, cy = centres[rng.integers(len(centres))] + rng.normal(0, spread, 2)
            r = rng.lognormal(math.log(size * u * zoom), 0.3)
            k = int(rng.integers(5, 9))
            angles = np.sort(rng.uniform(0, 2 * math.pi, k))
            radii = r * rng.uniform(0.55, 1.0, k)
            verts = list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles), strict=True))
            base = rng.uniform(0.45, 0.75)
            if not facets:
                draw.polygon(verts, fill=int(255 * base))
                continue
            ax, ay = cx + rng.normal(0, 0.25 * r), cy + rng.normal(0, 0.25 * r)
            for j in range(k):
                (x1, y1), (x2, y2) = verts[j], verts[(j + 1) % k]
                facing = math.atan2((y1 + y2) / 2 - ay, (x1 + x2) / 2 - ax)
                shade = base + 0.22 * math.cos(facing - light) + rng.normal(0, 0.04)
                draw.polygon(
                    [(ax, ay), (x1, y1), (x2, y2)], fill=int(255 * np.clip(shade, 0.05, 1))
                )
    return _overlay(img, layer)


def _tips(rng, w, h):
    u = h / 384
    img = (
        rng.uniform(0.1, 0.45) + 0.06 * _field(rng, w, h, 60 * u) + 0.02 * _field(rng, w, h, 3 * u)
    )
    xx, yy = _grid(w, h)
    style = rng.integers(3)
    if style == 1:  # AFM probe: cantilever with a pyramid at its free end
        layer, draw = _canvas(w, h)
        frame = _Frame(
            rng.uniform(0.35, 0.65) * w,
            rng.uniform(0.35, 0.65) * h,
            rng.uniform(0, 2 * math.pi),
            u * rng.uniform(0.8, 1.4),
            rng.uniform(0.7, 1),
        )
        beam = rng.uniform(50, 90)
        frame.rect(draw, -700, -beam, 40, beam, int(255 * rng.uniform(0.35, 0.55)))
        height, half = rng.uniform(80, 140), rng.uniform(35, 60)
        apex = (rng.uniform(-20, 20) + height, rng.uniform(-10, 10))
        for (p, q), shade in (
            (((0, -half), (0, 0)), rng.uniform(0.55, 0.7)),
            (((0, 0), (0, half)), rng.uniform(0.75, 0.95)),
        ):
            draw.polygon(frame([p, q, apex]), fill=int(255 * shade))
        return _overlay(img, layer)
    # Needle (etched wire) or cone standing on a substrate, shaded like a body of revolution
    ax, ay = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
    axis = rng.uniform(0, 2 * math.pi) if style == 0 else math.pi / 2 + rng.normal(0, 0.3)
    c, s = math.cos(axis), math.sin(axis)
    t, across = (xx - ax) * c + (yy - ay) * s, (yy - ay) * c - (xx - ax) * s
    r_apex = rng.uniform(1, 4) * u
    slope, power = (
        (rng.uniform(0.06, 0.3), rng.uniform(0.7, 1.0))
        if style == 0
        else (rng.uniform(0.3, 0.7), 1.0)
    )
    half = r_apex + slope * np.maximum(t, 0) ** power * (h ** (1 - power))
    inside = np.where(t >= 0, np.abs(across) < half, t * t + across * across < r_apex**2)
    if style == 2:
        base = rng.uniform(0.3, 0.6) * h
        inside &= t < base
        img = np.where(t > base - np.abs(across) * 0.3, img + 0.08 * _field(rng, w, h, 4 * u), img)
    q = np.clip(np.abs(across) / half, 0, 1)
    level = rng.uniform(0.5, 0.8)
    body = level * (0.5 + 0.5 * np.sqrt(1 - q * q)) + 0.25 * q**6 - 0.1 * np.sign(across) * q
    return np.where(inside, body, img).astype(np.float32)


def _mems(rng, w, h):
    u = h / 384
    layer, draw = _canvas(w, h)
    frame = _Frame(
        w / 2 + rng.normal(0, 0.1 * w),
        h / 2 + rng.normal(0, 0.1 * h),
        rng.choice([0, math.pi / 2]) + rng.normal(0, 0.08),
        u * rng.uniform(0.6, 1.5),
        rng.uniform(0.65, 1.0),
    )
    top = int(255 * rng.uniform(0.55, 0.85))
    style = rng.integers(4)
    if style == 0:  # comb drive: interdigitated fingers between two anchors
        pitch, finger, overlap = rng.uniform(14, 26), rng.uniform(4, 9), rng.uniform(40, 90)
        span = int(rng.integers(10, 24)) * pitch
        frame.rect(draw, -span / 2, -overlap - 60, span / 2, -overlap - 25, top)
        frame.rect(draw, -span / 2, overlap + 25, span / 2, overlap + 60, top)
        for x in np.arange(-span / 2, span / 2, pitch):
            frame.rect(draw, x, -overlap - 25, x + finger, overlap - 5, top)
            frame.rect(draw, x + pitch / 2, -overlap + 5, x + pitch / 2 + finger, overlap + 25, top)
        frame.rect(draw, -40, overlap + 60, 40, 400, top)
    elif style == 1:  # bond pads with traces running to interdigitated electrodes
        pad = rng.uniform(60, 110)
        n = int(rng.integers(3, 7))
        xs = (np.arange(n) - (n - 1) / 2) * pad * 1.5
        for x in xs:
            frame.rect(draw, x - pad / 2, -260 - pad, x + pad / 2, -260, top)
            frame.rect(draw, x - pad / 2 + 8, -252 - pad, x + pad / 2 - 8, -268, min(top + 30, 255))
            frame.rect(draw, x - 4, -260, x + 4, -80, top)
            frame.rect(draw, min(x, 0) - 4, -80, max(x, 0) + 4, -72, top)
        pitch = rng.uniform(10, 20)
        frame.rect(draw, -160, -80, 160, -64, top)
        frame.rect(draw, -160, 80, 160, 96, top)
        for i, x in enumerate(np.arange(-150, 150, pitch)):
            y0, y1 = (-64, 60) if i % 2 == 0 else (-44, 80)
            frame.rect(draw, x, y0, x + pitch * 0.4, y1, top)
    elif style == 2:  # suspended plate with release holes on serpentine springs
        half = rng.uniform(90, 150)
        frame.rect(draw, -half, -half, half, half, top)
        hole, step = rng.uniform(5, 9), rng.uniform(18, 28)
        for x in np.arange(-half + step / 2, half - hole, step):
            for y in np.arange(-half + step / 2, half - hole, step):
                frame.rect(draw, x, y, x + hole, y + hole, 0)
        for sx in (-1, 1):
            x = sx * half
            for _ in range(int(rng.integers(3, 6))):
                x1 = x + sx * 14
                frame.rect(draw, min(x, x1), -60, max(x, x1) + 6, -54, top)
                frame.rect(draw, x1, -60, x1 + 6, 60, top)
                x = x1
            frame.rect(draw, min(x, x + sx * 70), -90, max(x, x + sx * 70), 90, top)
    else:  # array of cantilevers of graded length from a common anchor
        n, width = int(rng.integers(4, 10)), rng.uniform(14, 30)
        frame.rect(draw, -n * width * 1.2, -220, n * width * 1.2, -140, top)
        lengths = np.linspace(rng.uniform(60, 120), rng.uniform(200, 320), n)
        for i, length in enumerate(lengths):
            x = (i - (n - 1) / 2) * width * 2.2
            frame.rect(draw, x - width / 2, -140, x + width / 2, -140 + length, top)
    top_mask = np.asarray(layer) > 0
    # Tilted view: the side walls show as a bright band below the top surfaces
    wall = max(2, round(rng.uniform(2, 7) * u))
    walls = np.zeros_like(top_mask)
    walls[wall:] = top_mask[:-wall]
    walls &= ~top_mask
    substrate = (
        rng.uniform(0.1, 0.35) + 0.03 * _field(rng, w, h, 3 * u) + 0.04 * _field(rng, w, h, 50 * u)
    )
    surface = np.asarray(layer, np.float32) / 255 + 0.03 * _field(rng, w, h, 2 * u)
    img = np.where(walls, min(top / 255 + 0.15, 1.0), substrate)
    return np.where(top_mask, surface, img).astype(np.float32)


def _biological(rng, w, h):
    u, zoom = h / 384, rng.uniform(0.7, 1.4)
    style = rng.integers(4)
    if style == 0:  # red blood cells, sometimes caught in fibrin strands
        img = rng.uniform(0.05, 0.25) + 0.05 * _field(rng, w, h, 20 * u)
        for _ in range(int(rng.uniform(8, 30) / zoom**2)):
            x, y, r = rng.uniform(0, w), rng.uniform(0, h), 38 * u * zoom * rng.normal(1, 0.08)
            aspect, angle = rng.uniform(1, 1.8), rng.uniform(0, math.pi)
            alpha, _ = _blood_cell(r, 0, aspect, angle)
            _stamp(img, x + 0.15 * r, y + 0.15 * r, 0.6 * alpha, np.zeros_like(alpha))  # shadow
            _stamp(img, x, y, *_blood_cell(r, rng.uniform(0.45, 0.7), aspect, angle))
        if rng.random() < 0.5:
            layer, draw = _canvas(w, h)
            for _ in range(int(rng.integers(15, 50))):
                draw.line(
                    _wander(rng, w, h, 20 * u, 0.35, int(rng.integers(8, 30))),
                    fill=int(rng.integers(170, 235)),
                    width=max(1, round(u)),
                )
            img = _overlay(img, layer)
        return img
    if style == 1:  # rod-shaped bacteria in colonies
        img = rng.uniform(0.15, 0.4) + 0.03 * _field(rng, w, h, 5 * u)
        layer, draw = _canvas(w, h)
        centres = rng.uniform((0, 0), (w, h), (int(rng.integers(2, 6)), 2))
        for _ in range(int(rng.uniform(40, 160) / zoom**2)):
            cx, cy = centres[rng.integers(len(centres))] + rng.normal(0, 0.18 * w, 2)
            width = 11 * u * zoom * rng.normal(1, 0.1)
            length = width * rng.uniform(1.5, 4.5)
            a = rng.uniform(0, 2 * math.pi)
            dx, dy = math.cos(a) * length / 2, math.sin(a) * length / 2
            _stroke(
                draw,
                [(cx - dx, cy - dy), (cx + dx, cy + dy)],
                width,
                rng.uniform(0.7, 0.95),
                round_ends=True,
            )
        return _overlay(img, layer)
    if style == 2:  # epithelium: a cobblestone of domed cells, lit from one side
        borders = _borders(_voronoi(rng, w, h, rng.uniform(40, 90) * u * zoom, 4 * u * zoom), 1)
        dome = np.sqrt(ndi.distance_transform_edt(~borders)) + 0.4 * _field(rng, w, h, 3 * u)
        gy, gx = np.gradient(ndi.gaussian_filter(dome, 1.5 * u))
        light = rng.uniform(0, 2 * math.pi)
        slope = gx * math.cos(light) + gy * math.sin(light)
        img = rng.uniform(0.3, 0.5) + 0.03 * dome + rng.uniform(0.3, 0.6) * slope
        return img.astype(np.float32)
    # adherent cells: domed bodies with thin filopodia reaching out
    img = rng.uniform(0.1, 0.3) + 0.03 * _field(rng, w, h, 6 * u)
    layer, draw = _canvas(w, h)
    cells = [
        (rng.uniform(0, w), rng.uniform(0, h), rng.lognormal(math.log(45 * u * zoom), 0.25))
        for _ in range(int(rng.integers(2, 8)))
    ]
    for x, y, r in cells:
        for _ in range(int(rng.integers(8, 30))):
            a = rng.uniform(0, 2 * math.pi)
            start = (x + 0.8 * r * math.cos(a), y + 0.8 * r * math.sin(a))
            draw.line(
                _wander(rng, w, h, 12 * u * zoom, 0.3, int(rng.integers(3, 10)), start, a),
                fill=int(rng.integers(150, 220)),
                width=max(1, round(u)),
            )
    img = _overlay(img, layer)
    for x, y, r in cells:
        alpha, shade = _sphere(
            r, rng.uniform(0.5, 0.7), 0.3, rng.uniform(1, 1.6), rng.uniform(0, math.pi)
        )
        _stamp(img, x, y, alpha, shade + 0.06 * rng.standard_normal(shade.shape).astype(np.float32))
    return img


_RENDERERS = {
    "Biological": _biological,
    "Fibres": _fibres,
    "Films_Coated_Surface": _films,
    "MEMS_devices_and_electrodes": _mems,
    "Nanowires": _nanowires,
    "Particles": _particles,
    "Patterned_surface": _patterned,
    "Porous_Sponge": _porous,
    "Powder": _powder,
    "Tips": _tips,
}


# ---------------------------------------------------------------------------------------------
# Instrument: detector response, scan noise and the info bar.


def _microscope(
    rng: np.random.Generator, specimen: np.ndarray, size: tuple[int, int]
) -> np.ndarray:
    """Specimen signal at working size -> noisy 8-bit micrograph at the output size."""
    width, height = size
    h, w = specimen.shape
    if rng.random() < 0.5:
        specimen = specimen[:, ::-1]
    if rng.random() < 0.5:
        specimen = specimen[::-1]
    img = ndi.gaussian_filter(specimen, rng.uniform(0.5, 1.2))
    # Edge effect: secondary-electron yield rises where the surface is steep
    gy, gx = np.gradient(ndi.gaussian_filter(img, 1.0))
    img = img + rng.uniform(0.8, 3.0) * np.sqrt(gx * gx + gy * gy)
    xx, yy = _grid(w, h)
    img = img + rng.normal(0, 0.08) * (xx / w - 0.5) + rng.normal(0, 0.08) * (yy / h - 0.5)
    img = img - rng.uniform(0, 0.15) * ((xx / w - 0.5) ** 2 + (yy / h - 0.5) ** 2)
    img = (img - 0.5) * rng.uniform(0.75, 1.3) + 0.5 + rng.uniform(-0.1, 0.1)
    # Soft clip into the detector's range; black and white stay clear of the info bar's levels
    img = 0.5 + 0.42 * np.tanh((img - 0.5) / 0.42)
    img = img ** rng.uniform(0.8, 1.25)
    full = np.asarray(Image.fromarray(img.astype(np.float32)).resize(size, Image.BICUBIC)) * 255
    # Shot noise grows with the signal; each scan line gets its own offset
    shot = rng.uniform(0.4, 1.1) * np.sqrt(np.maximum(full, 1)) + rng.uniform(2, 5)
    full = full + shot * rng.standard_normal((height, width), dtype=np.float32)
    full += rng.normal(0, rng.uniform(0.5, 3), (height, 1)).astype(np.float32)
    for row in rng.integers(0, height, rng.poisson(0.5)):  # scan-line glitches
        full[row : row + 2] = np.roll(full[row : row + 2], int(rng.integers(-6, 7)), axis=1)
    return np.clip(full, 0, 255).astype(np.uint8)


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_SCALES = ("100 nm", "200 nm", "300 nm", "500 nm", "1 µm", "2 µm", "10 µm", "20 µm", "100 µm")


def _draw_length(
    draw: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    text: str,
    font: ImageFont.FreeTypeFont,
    ink: int,
) -> None:
    """Draw a length such as "2 µm"; the default font has no µ, so it is a u with a tail."""
    x, y = xy
    number, micro, unit = text.partition("µ")
    draw.text((x, y), number, fill=ink, font=font)
    if not micro:
        return
    x += draw.textlength(number, font=font)
    draw.text((x, y), "u", fill=ink, font=font)
    left, top, _, bottom = font.getbbox("u")
    stem = max(1, round(font.size / 12))
    draw.line(
        [(x + left + stem / 2, y + top), (x + left + stem / 2, y + bottom + 0.35 * (bottom - top))],
        fill=ink,
        width=stem,
    )
    draw.text((x + draw.textlength("u", font=font), y), unit, fill=ink, font=font)


def _info_bar(rng: np.random.Generator, width: int, height: int, kind: str) -> np.ndarray:
    """An instrument data bar: flat band, scale bar on the left, acquisition settings."""
    bar_height = max(4, round(INFO_BAR_HEIGHT_AT_768 * height / 768))
    if kind == "bright":
        background, ink = int(rng.integers(249, 256)), int(rng.integers(0, 50))
    else:
        background, ink = int(rng.integers(0, 6)), int(rng.integers(215, 256))
    bar = Image.new("L", (width, bar_height), background)
    draw = ImageDraw.Draw(bar)
    font = _font(max(4, round(bar_height * 0.28)))
    pad = bar_height * 0.12
    line_y = bar_height * 0.72
    length = width * rng.uniform(0.05, 0.13)
    _draw_length(draw, (pad, pad), str(rng.choice(_SCALES)), font, ink)
    draw.line(
        [(pad, line_y), (pad + length, line_y)], fill=ink, width=max(1, round(bar_height / 20))
    )
    mag = 10 ** rng.uniform(2, 5.3)
    mag_text = f"{mag / 1000:.2f} K X" if mag >= 1000 else f"{mag:.0f} X"
    rows = (
        [
            f"EHT = {rng.choice([1, 2, 3, 5, 10, 15, 20]):.2f} kV",
            f"WD = {rng.uniform(2, 15):.1f} mm",
            f"Signal A = {rng.choice(['InLens', 'SE2', 'BSD'])}",
            f"Date: {rng.integers(1, 29)} {rng.choice(_MONTHS)} {rng.integers(2008, 2018)}",
        ],
        [
            f"Mag = {mag_text}",
            f"Stage at T = {rng.uniform(0, 60):.1f} °",
            f"Photo No. = {rng.integers(1, 9999)}",
            f"Time: {rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}:{rng.integers(0, 60):02d}",
        ],
    )
    start = rng.uniform(0.18, 0.26)
    for r, texts in enumerate(rows):
        for col, text in enumerate(texts):
            x = width * (start + col * 0.19)
            draw.text((x, pad + r * bar_height * 0.42), text, fill=ink, font=font)
    if rng.random() < 0.5:  # some instruments frame the bar, just inside its edge
        inset = max(1, bar_height // 30)
        draw.rectangle((inset, inset, width - 1 - inset, bar_height - 1 - inset), outline=ink)
    return np.asarray(bar)


# ---------------------------------------------------------------------------------------------
# Public API


def render_image(
    class_name: str,
    rng: np.random.Generator,
    size: tuple[int, int] = (1024, 768),
    info_bar: str | None = None,
) -> Image.Image:
    """One SEM-like RGB image (R == G == B) of `class_name`, `size` = (width, height).

    `info_bar` is None, "bright" or "dark"; a bar replaces the bottom rows of the image.
    """
    if class_name not in _RENDERERS:
        raise ValueError(f"unknown class {class_name!r}; expected one of {CLASSES}")
    if info_bar not in (None, *INFO_BAR_KINDS):
        raise ValueError(f"info_bar must be None, 'bright' or 'dark', not {info_bar!r}")
    width, height = int(size[0]), int(size[1])
    if width < 32 or height < 32:
        raise ValueError(f"image size {size} is too small (at least 32 x 32)")
    specimen = _RENDERERS[class_name](rng, max(16, width // 2), max(16, height // 2))
    gray = _microscope(rng, specimen.astype(np.float32), (width, height))
    if info_bar is not None:
        bar = _info_bar(rng, width, height, info_bar)
        gray[height - bar.shape[0] :] = bar
    return Image.fromarray(gray, "L").convert("RGB")


def info_bar_kind(seed: int, image_index: int, info_bar_share: float) -> str | None:
    """Info bar of image `image_index`: None, "bright" (4 in 5) or "dark".

    Drawn from (seed, index) alone, so every class gets the same bars and a bar never tells
    the class.
    """
    has_bar, dark = np.random.default_rng([seed, _INFO_BAR_STREAM, image_index]).random(2)
    if has_bar >= info_bar_share:
        return None
    return "dark" if dark < 0.2 else "bright"


def image_name(seed: int, class_name: str, image_index: int) -> str:
    """NFFA-style file name, L<k>_<md5>.jpg, fixed by (seed, class, index)."""
    digest = hashlib.md5(f"{seed}/{class_name}/{image_index}".encode()).hexdigest()
    return f"L{int(digest[0], 16) % 8 + 1}_{digest}.jpg"


def _write_image(job: tuple) -> tuple[str, str, str | None]:
    directory, seed, class_index, image_index, size, bar = job
    class_name = CLASSES[class_index]
    rng = np.random.default_rng([seed, class_index, image_index])
    name = image_name(seed, class_name, image_index)
    render_image(class_name, rng, size, bar).save(
        pathlib.Path(directory) / class_name / name, "JPEG", quality=JPEG_QUALITY
    )
    return class_name, name, bar


def _read_marker(root: pathlib.Path) -> dict | None:
    try:
        marker = json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_complete(root: pathlib.Path, params: dict) -> bool:
    marker = _read_marker(root)
    if marker is None or marker.get("params") != params:
        return False
    files = marker.get("files", {})
    expected = params["images_per_class"]
    return all(
        len(files.get(c, [])) == expected
        and all((root / c / f["name"]).is_file() for f in files[c])
        for c in CLASSES
    )


def _listed_files(marker: dict) -> set[str]:
    """The relative paths a marker says the generator wrote, marker included."""
    files = marker.get("files")
    listed = {MARKER_NAME}
    if isinstance(files, dict):
        for class_name, entries in files.items():
            for entry in entries if isinstance(entries, list) else []:
                if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                    listed.add(f"{class_name}/{entry['name']}")
    return listed


def _foreign_entries(root: pathlib.Path) -> list[str]:
    """What under `root` the generator did not write; empty when the whole folder is its own.

    A folder is the generator's when its marker lists every file in it: a user who drops
    images into a generated set, or keeps NFFA-named folders of their own, gets them listed.
    """
    if not os.path.lexists(root):
        return []
    if not root.is_dir():  # a file, or a link to nowhere
        return [root.name]
    marker = _read_marker(root)
    if marker is None:
        return sorted(p.name for p in root.iterdir())
    listed = _listed_files(marker)
    foreign = []
    for top in sorted(root.iterdir()):
        if top.name == MARKER_NAME and top.is_file() and not top.is_symlink():
            continue
        # Class folders must be real folders: through a link, the files would be someone else's.
        if top.name not in CLASSES or top.is_symlink() or not top.is_dir():
            foreign.append(top.name)
            continue
        for path in sorted(top.iterdir()):
            relative = f"{top.name}/{path.name}"
            if relative not in listed or path.is_symlink() or not path.is_file():
                foreign.append(relative)
    return foreign


def _refuse_foreign(root: pathlib.Path) -> None:
    """Stop unless `root` is missing, empty, or a set this generator wrote and nobody added to."""
    foreign = _foreign_entries(root)
    if foreign:
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        why = "" if _read_marker(root) else f", and it has no marker file {MARKER_NAME}"
        raise UserError(
            f"{root} holds files the SEM-like set generator did not write ({shown}{why}); they "
            "are left as they are and nothing was written there. Choose another folder for the "
            "generated set."
        )


def _remove_generated(old: pathlib.Path, marker: dict) -> list[str]:
    """Delete the files `marker` lists under `old`, then the emptied folders; return the rest.

    Only listed files go, so a file someone added after the check survives.
    """
    for relative in sorted(_listed_files(marker) - {MARKER_NAME}):
        (old / relative).unlink(missing_ok=True)
    (old / MARKER_NAME).unlink(missing_ok=True)
    for class_name in CLASSES:
        try:
            (old / class_name).rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            continue
    try:
        old.rmdir()
    except OSError:
        return sorted(p.relative_to(old).as_posix() for p in old.rglob("*") if not p.is_dir())
    return []


def _swap_in(root: pathlib.Path, fresh: pathlib.Path) -> None:
    """Move the complete `fresh` set to `root`; an earlier generated set there is removed."""
    if not os.path.lexists(root):
        fresh.rename(root)
        return
    _refuse_foreign(root)  # again: files may have arrived while the new set was drawn
    marker = _read_marker(root) or {}
    # A fresh holder folder, so the old set's temporary name can never be taken already.
    holder = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
    old = holder / root.name
    root.rename(old)
    fresh.rename(root)
    left = _remove_generated(old, marker)
    if left:
        raise UserError(
            f"Files appeared in {root} while the generated set was replaced; they are kept in "
            f"{old}: {', '.join(left[:5])}."
        )
    holder.rmdir()


def generate_dataset(
    root,
    images_per_class: int,
    seed: int = 0,
    info_bar_share: float = 0.6,
    size: tuple[int, int] = (1024, 768),
    workers: int = 2,
) -> pathlib.Path:
    """Write `images_per_class` images per class under `root`/<Class>/ and return `root`.

    A marker file records the parameters and every file; when it matches and the files are
    there, nothing is written. The set is built in a sibling directory and moved in when
    complete, so an interrupted run never looks finished. An existing `root` is replaced only
    when it is empty or a set written here whose marker lists every file in it; anything
    else raises UserError and is left untouched.
    """
    root = pathlib.Path(root)
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be >= 1, not {images_per_class}")
    if not 0 <= info_bar_share <= 1:
        raise ValueError(f"info_bar_share must be within [0, 1], not {info_bar_share}")
    size = (int(size[0]), int(size[1]))
    params = {
        "generator_version": GENERATOR_VERSION,
        "images_per_class": int(images_per_class),
        "seed": int(seed),
        "info_bar_share": float(info_bar_share),
        "size": list(size),
    }
    if _is_complete(root, params):
        return root
    _refuse_foreign(root)

    root.parent.mkdir(parents=True, exist_ok=True)
    # mkdtemp makes a new folder, so the staging area is never one that was already there.
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    for class_name in CLASSES:
        (staging / class_name).mkdir(parents=True)
    bars = [info_bar_kind(seed, i, info_bar_share) for i in range(images_per_class)]
    jobs = [
        (str(staging), seed, c, i, size, bars[i])
        for c in range(len(CLASSES))
        for i in range(images_per_class)
    ]
    try:
        if workers <= 1:
            written = [_write_image(job) for job in jobs]
        else:
            # spawn: safe whatever threads the caller (e.g. torch) has started
            context = multiprocessing.get_context("spawn")
            with context.Pool(min(workers, len(jobs))) as pool:
                chunk = max(1, len(jobs) // (workers * 8))
                written = pool.map(_write_image, jobs, chunksize=chunk)
        files = {c: [] for c in CLASSES}
        for class_name, name, bar in written:
            files[class_name].append({"name": name, "info_bar": bar})
        (staging / MARKER_NAME).write_text(json.dumps({"params": params, "files": files}, indent=1))
        _swap_in(root, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/synthetic", help="output folder")
    parser.add_argument("--images-per-class", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--info-bar-share",
        type=float,
        default=0.6,
        help="share of images with an instrument info bar at the bottom",
    )
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        root = generate_dataset(
            args.root,
            args.images_per_class,
            seed=args.seed,
            info_bar_share=args.info_bar_share,
            size=(args.width, args.height),
            workers=args.workers,
        )
    except UserError as err:
        parser.exit(2, f"{err}\n")
    total = args.images_per_class * len(CLASSES)
    print(f"{total} images ({args.images_per_class} per class, {len(CLASSES)} classes) in {root}")


if __name__ == "__main__":
    main()
