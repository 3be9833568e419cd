"""Drawing primitives for the SEM-like classes: noise fields, sprites, strokes, tessellations.

Classes render at half the output size in float32 on a 0-1 scale; `u` is the pixel size of one
unit at a 384-row working canvas, so shapes keep their proportions at any output size, and
`zoom` plays the part of the microscope's magnification.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage as ndi


@lru_cache(maxsize=8)
def grid(w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xx.flags.writeable = yy.flags.writeable = False
    return xx, yy


def field(rng: np.random.Generator, w: int, h: int, cell: float) -> np.ndarray:
    """Smooth random field, mean 0 and std 1, with blobs about `cell` pixels across."""
    gw, gh = int(w / max(cell, 1.0)) + 3, int(h / max(cell, 1.0)) + 3
    coarse = Image.fromarray(rng.standard_normal((gh, gw), dtype=np.float32))
    smooth = np.asarray(coarse.resize((w, h), Image.BICUBIC, box=(1, 1, gw - 2, gh - 2)))
    return (smooth - smooth.mean()) / (smooth.std() + 1e-6)


def canvas(w: int, h: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    layer = Image.new("L", (w, h), 0)
    return layer, ImageDraw.Draw(layer)


def overlay(base: np.ndarray, layer: Image.Image) -> np.ndarray:
    """Put the drawn (non-zero) pixels of an 8-bit layer over a float background."""
    drawn = np.asarray(layer, dtype=np.float32) / 255
    return np.where(drawn > 0, drawn, base)


def stamp(target: np.ndarray, cx: float, cy: float, alpha: np.ndarray, shade: np.ndarray):
    """Paint a sprite centred at (cx, cy) over the target, clipped at the borders."""
    sh, sw = alpha.shape
    x0, y0 = int(round(cx)) - sw // 2, int(round(cy)) - sh // 2
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + sw, target.shape[1]), min(y0 + sh, target.shape[0])
    if cx0 >= cx1 or cy0 >= cy1:
        return
    a = alpha[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    s = shade[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    region = target[cy0:cy1, cx0:cx1]
    region += a * (s - region)


def ellipse_coords(radius: float, aspect: float, angle: float):
    """Sprite grid around an ellipse: normalised radius d (1 on the outline) and the offsets."""
    n = int(radius) + 2
    y, x = np.mgrid[-n : n + 1, -n : n + 1].astype(np.float32)
    c, s = math.cos(angle), math.sin(angle)
    along, across = x * c + y * s, (y * c - x * s) * aspect
    d = np.sqrt(along * along + across * across) / radius
    alpha = np.clip((1 - d) * radius + 0.5, 0, 1)
    return d, alpha, x / n, y / n


def sphere(radius: float, level: float, rim: float, aspect: float = 1.0, angle: float = 0.0):
    """A lit sphere or grain: brighter towards the outline, where SEM yield rises with slope."""
    d, alpha, x, y = ellipse_coords(radius, aspect, angle)
    dd = np.minimum(d, 1)
    shade = level * (0.75 + 0.25 * np.sqrt(1 - dd * dd)) + rim * dd**3 - 0.08 * (x + y)
    return alpha, shade


def blood_cell(radius: float, level: float, aspect: float, angle: float):
    """Biconcave disc: a thick bright torus around a dimpled centre."""
    d, alpha, x, y = ellipse_coords(radius, aspect, angle)
    torus = np.exp(-(((d - 0.68) / 0.26) ** 2))
    shade = level * (0.7 + 0.4 * torus) - 0.12 * (x + y) * torus
    return alpha, shade


_CYLINDER = ((1.0, 0.55), (0.75, 0.75), (0.5, 0.9), (0.25, 1.0))


def stroke(draw, points, width: float, level: float, round_ends: bool = False):
    """A cylinder along a polyline: nested strokes, brightest on the axis."""
    for width_share, brightness in _CYLINDER:
        fill, pen = int(255 * min(level * brightness, 1.0)), max(1, round(width * width_share))
        draw.line(points, fill=fill, width=pen, joint="curve")
        if round_ends:
            r = pen / 2
            for x, y in (points[0], points[-1]):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)


def curve(
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


def wander(
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


class Frame:
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


def voronoi(rng: np.random.Generator, w: int, h: int, cell: float, wobble: float):
    """Cell labels of a Voronoi tessellation with wavy borders (grains, crack networks)."""
    gw, gh = (w + 1) // 2, (h + 1) // 2
    n = max(2, int(gw * gh / max(cell / 2, 1.0) ** 2))
    empty = np.ones((gh, gw), bool)
    empty[rng.integers(0, gh, n), rng.integers(0, gw, n)] = False
    iy, ix = ndi.distance_transform_edt(empty, return_distances=False, return_indices=True)
    labels = iy * gw + ix
    xx, yy = grid(w, h)
    px = np.clip((xx + wobble * field(rng, w, h, cell)) / 2, 0, gw - 1).astype(np.int32)
    py = np.clip((yy + wobble * field(rng, w, h, cell)) / 2, 0, gh - 1).astype(np.int32)
    return labels[py, px]


def cell_borders(labels: np.ndarray, width: int) -> np.ndarray:
    edge = np.zeros(labels.shape, bool)
    for k in range(1, width + 1):
        edge[k:] |= labels[k:] != labels[:-k]
        edge[:, k:] |= labels[:, k:] != labels[:, :-k]
    return edge
