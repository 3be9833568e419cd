"""The renderer of the Biological class (cells, tissue); (rng, w, h) -> float32 (h, w) on
roughly 0-1."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from sem_cls.data.synthetic.drawing import (
    blood_cell,
    canvas,
    cell_borders,
    field,
    overlay,
    sphere,
    stamp,
    stroke,
    voronoi,
    wander,
)


def biological(rng, w, h):
    u, zoom = h / 384, rng.uniform(0.7, 1.4)
    style = rng.integers(4)
    if style == 0:  # red blood cells, sometimes caught in fibrin strands
        img = rng.uniform(0.05, 0.25) + 0.05 * field(rng, w, h, 20 * u)
        for _ in range(int(rng.uniform(8, 30) / zoom**2)):
            x, y, r = rng.uniform(0, w), rng.uniform(0, h), 38 * u * zoom * rng.normal(1, 0.08)
            aspect, angle = rng.uniform(1, 1.8), rng.uniform(0, math.pi)
            alpha, _ = blood_cell(r, 0, aspect, angle)
            stamp(img, x + 0.15 * r, y + 0.15 * r, 0.6 * alpha, np.zeros_like(alpha))  # shadow
            stamp(img, x, y, *blood_cell(r, rng.uniform(0.45, 0.7), aspect, angle))
        if rng.random() < 0.5:
            layer, draw = canvas(w, h)
            for _ in range(int(rng.integers(15, 50))):
                draw.line(
                    wander(rng, w, h, 20 * u, 0.35, int(rng.integers(8, 30))),
                    fill=int(rng.integers(170, 235)),
                    width=max(1, round(u)),
                )
            img = overlay(img, layer)
        return img
    if style == 1:  # rod-shaped bacteria in colonies
        img = rng.uniform(0.15, 0.4) + 0.03 * field(rng, w, h, 5 * u)
        layer, draw = canvas(w, h)
        centres = rng.uniform((0, 0), (w, h), (int(rng.integers(2, 6)), 2))
        for _ in range(int(rng.uniform(40, 160) / zoom**2)):
            cx, cy = centres[rng.integers(len(centres))] + rng.normal(0, 0.18 * w, 2)
            width = 11 * u * zoom * rng.normal(1, 0.1)
            length = width * rng.uniform(1.5, 4.5)
            a = rng.uniform(0, 2 * math.pi)
            dx, dy = math.cos(a) * length / 2, math.sin(a) * length / 2
            stroke(
                draw,
                [(cx - dx, cy - dy), (cx + dx, cy + dy)],
                width,
                rng.uniform(0.7, 0.95),
                round_ends=True,
            )
        return overlay(img, layer)
    if style == 2:  # epithelium: a cobblestone of domed cells, lit from one side
        borders = cell_borders(voronoi(rng, w, h, rng.uniform(40, 90) * u * zoom, 4 * u * zoom), 1)
        dome = np.sqrt(ndi.distance_transform_edt(~borders)) + 0.4 * field(rng, w, h, 3 * u)
        gy, gx = np.gradient(ndi.gaussian_filter(dome, 1.5 * u))
        light = rng.uniform(0, 2 * math.pi)
        slope = gx * math.cos(light) + gy * math.sin(light)
        img = rng.uniform(0.3, 0.5) + 0.03 * dome + rng.uniform(0.3, 0.6) * slope
        return img.astype(np.float32)
    # adherent cells: domed bodies with thin filopodia reaching out
    img = rng.uniform(0.1, 0.3) + 0.03 * field(rng, w, h, 6 * u)
    layer, draw = canvas(w, h)
    cells = [
        (rng.uniform(0, w), rng.uniform(0, h), rng.lognormal(math.log(45 * u * zoom), 0.25))
        for _ in range(int(rng.integers(2, 8)))
    ]
    for x, y, r in cells:
        for _ in range(int(rng.integers(8, 30))):
            a = rng.uniform(0, 2 * math.pi)
            start = (x + 0.8 * r * math.cos(a), y + 0.8 * r * math.sin(a))
            draw.line(
                wander(rng, w, h, 12 * u * zoom, 0.3, int(rng.integers(3, 10)), start, a),
                fill=int(rng.integers(150, 220)),
                width=max(1, round(u)),
            )
    img = overlay(img, layer)
    for x, y, r in cells:
        alpha, shade = sphere(
            r, rng.uniform(0.5, 0.7), 0.3, rng.uniform(1, 1.6), rng.uniform(0, math.pi)
        )
        stamp(img, x, y, alpha, shade + 0.06 * rng.standard_normal(shade.shape).astype(np.float32))
    return img
