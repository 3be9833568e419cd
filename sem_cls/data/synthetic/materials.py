"""Renderers of materials as the NFFA-Europe classes show them: nanowires, particles, porous
sponges, fibres, coated films and powders; (rng, w, h) -> float32 (h, w) on roughly 0-1."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from sem_cls.data.synthetic.drawing import (
    canvas,
    cell_borders,
    curve,
    field,
    overlay,
    sphere,
    stamp,
    stroke,
    voronoi,
)


def nanowires(rng, w, h):
    u, zoom = h / 384, rng.uniform(0.6, 1.6)
    img = rng.uniform(0.12, 0.35) + 0.05 * field(rng, w, h, 4 * u) + 0.06 * field(rng, w, h, 30 * u)
    layer, draw = canvas(w, h)
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
    return overlay(img, layer)


def particles(rng, w, h):
    u, zoom = h / 384, rng.uniform(0.6, 1.6)
    style = rng.integers(3)
    if style == 0:  # scattered spheres on a grainy film
        img = (
            rng.uniform(0.22, 0.4)
            + 0.08 * field(rng, w, h, 2.5 * u * zoom)
            + 0.05 * field(rng, w, h, 12 * u * zoom)
        )
        n = int(rng.uniform(40, 160) / zoom**2)
        radii = rng.lognormal(math.log(7 * u * zoom), 0.35, n)
        aspects = rng.uniform(1, 1.3, n)
    elif style == 1:  # dense deposit of rounded grains, fine ones in between
        img = rng.uniform(0.1, 0.25) + 0.04 * field(rng, w, h, 3 * u)
        layer, draw = canvas(w, h)
        for _ in range(int(rng.uniform(300, 900) / zoom**2)):
            x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.8, 2.2) * u * zoom
            draw.ellipse((x - r, y - r, x + r, y + r), fill=int(rng.integers(70, 130)))
        img = overlay(img, layer)
        n = int(rng.uniform(150, 320) / zoom**2)
        radii = rng.lognormal(math.log(10 * u * zoom), 0.4, n)
        aspects = rng.uniform(1, 1.7, n)
    else:  # nearly monodisperse spheres, partly clumped
        img = rng.uniform(0.15, 0.35) + 0.05 * field(rng, w, h, 6 * u)
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
        stamp(
            img,
            xs[i],
            ys[i],
            *sphere(max(radii[i], 1.0), levels[i], rims[i], aspects[i], angles[i]),
        )
    return img


def porous(rng, w, h):
    u, zoom = h / 384, rng.uniform(0.6, 1.6)
    matrix = (
        rng.uniform(0.5, 0.75)
        + 0.04 * field(rng, w, h, 3 * u * zoom)
        + 0.05 * field(rng, w, h, 20 * u * zoom)
    )
    style = rng.integers(3)
    if style == 0:  # irregular pores
        f = field(rng, w, h, 25 * u * zoom) + 0.45 * field(rng, w, h, 8 * u * zoom)
        holes = f > np.quantile(f[::4, ::4], 1 - rng.uniform(0.25, 0.5))
    elif style == 1:  # open-cell foam: overlapping round cavities
        layer, draw = canvas(w, h)
        mean_r = 16 * u * zoom
        for _ in range(int(rng.uniform(0.4, 0.8) * w * h / (math.pi * mean_r**2))):
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            rx = rng.lognormal(math.log(mean_r), 0.45)
            ry = rx * rng.uniform(0.7, 1.0)
            draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=255)
        cavities = ndi.gaussian_filter(np.asarray(layer, np.float32) / 255, 2 * u * zoom)
        holes = cavities + 0.15 * field(rng, w, h, 8 * u * zoom) > 0.5  # ragged rims
    else:  # worm-like channels of a nanoporous network
        f = field(rng, w, h, 9 * u * zoom)
        holes = np.abs(f) < rng.uniform(0.3, 0.55)
    # Through a pore one sees a deeper, dimmer layer of the same sponge
    deeper = field(rng, w, h, 10 * u * zoom) > rng.uniform(-0.2, 0.6)
    depth = ndi.gaussian_filter(holes.astype(np.float32), 4 * u * zoom)
    inside = rng.uniform(0.05, 0.15) * (1.4 - 0.6 * depth) + np.where(deeper, 0.12, 0)
    near_edge = ndi.gaussian_filter(holes.astype(np.float32), 1.5 * u)
    matrix = matrix + 0.5 * near_edge  # pore lips charge up and glow
    return np.where(holes, inside, matrix).astype(np.float32)


def fibres(rng, w, h):
    u, zoom = h / 384, rng.uniform(0.6, 1.5)
    img = rng.uniform(0.04, 0.18) + 0.04 * field(rng, w, h, 30 * u)
    layer, draw = canvas(w, h)
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
        pts = curve(rng, w, h, heading, bend=rng.uniform(0.02, 0.12))
        stroke(
            draw,
            pts,
            width * rng.lognormal(0, 0.25) * (0.6 + 0.4 * depth),
            level=rng.uniform(0.55, 0.95) * (0.45 + 0.55 * depth),
        )
    return overlay(img, layer)


def films(rng, w, h):
    u, zoom = h / 384, rng.uniform(0.6, 1.6)
    level = rng.uniform(0.35, 0.7)
    style = rng.integers(3)
    if style == 0:  # cracked coating
        labels = voronoi(rng, w, h, rng.uniform(50, 130) * u * zoom, 6 * u * zoom)
        cracks = cell_borders(labels, max(1, round(rng.uniform(1, 3) * u * zoom)))
        img = level + 0.04 * field(rng, w, h, 3 * u * zoom) + 0.04 * field(rng, w, h, 40 * u)
        img = np.where(cracks, rng.uniform(0.03, 0.15), img)
    elif style == 1:  # polycrystalline grains
        labels = voronoi(rng, w, h, rng.uniform(5, 18) * u * zoom, 1.5 * u * zoom)
        grain = rng.normal(0, rng.uniform(0.05, 0.12), labels.max() + 1).astype(np.float32)
        img = level + grain[labels] + 0.02 * field(rng, w, h, 2 * u)
        img = np.where(cell_borders(labels, 1), img - rng.uniform(0.08, 0.2), img)
    else:  # smooth film with fine texture, pinholes and specks
        img = level + 0.03 * field(rng, w, h, 2 * u * zoom) + 0.05 * field(rng, w, h, 60 * u)
        for _ in range(int(rng.integers(3, 40))):
            r = rng.lognormal(math.log(2.5 * u * zoom), 0.5)
            dark = rng.random() < 0.5
            stamp(
                img,
                rng.uniform(0, w),
                rng.uniform(0, h),
                *sphere(max(r, 1.0), 0.1 if dark else level + 0.15, 0.2),
            )
    return img.astype(np.float32)


def powder(rng, w, h):
    u, zoom = h / 384, rng.uniform(0.6, 1.4)
    img = rng.uniform(0.05, 0.2) + 0.04 * field(rng, w, h, 4 * u)
    layer, draw = canvas(w, h)
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
    return overlay(img, layer)
