"""One renderer per NFFA-Europe class: (rng, w, h) -> float32 (h, w) on roughly 0-1, before
the instrument's effects (sem_cls.data.synthetic.instrument)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from sem_cls.data.synthetic.drawing import (
    Frame,
    blood_cell,
    canvas,
    cell_borders,
    curve,
    field,
    grid,
    overlay,
    sphere,
    stamp,
    stroke,
    voronoi,
    wander,
)


def _nanowires(rng, w, h):
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


def _particles(rng, w, h):
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


def _patterned(rng, w, h):
    u = h / 384
    xx, yy = grid(w, h)
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
    img = img + 0.03 * field(rng, w, h, 4 * u)
    if rng.random() < 0.35:  # patterned field next to plain substrate
        edge_angle = rng.uniform(0, 2 * math.pi)
        side = (xx - w / 2) * math.cos(edge_angle) + (yy - h / 2) * math.sin(edge_angle)
        img = np.where(
            side < rng.uniform(-0.3, 0.3) * w, img, bottom + 0.03 * field(rng, w, h, 8 * u)
        )
    return img.astype(np.float32)


def _porous(rng, w, h):
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


def _fibres(rng, w, h):
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


def _films(rng, w, h):
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


def _powder(rng, w, h):
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


def _tips(rng, w, h):
    u = h / 384
    img = rng.uniform(0.1, 0.45) + 0.06 * field(rng, w, h, 60 * u) + 0.02 * field(rng, w, h, 3 * u)
    xx, yy = grid(w, h)
    style = rng.integers(3)
    if style == 1:  # AFM probe: cantilever with a pyramid at its free end
        layer, draw = canvas(w, h)
        frame = Frame(
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
        return overlay(img, layer)
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
        img = np.where(t > base - np.abs(across) * 0.3, img + 0.08 * field(rng, w, h, 4 * u), img)
    q = np.clip(np.abs(across) / half, 0, 1)
    level = rng.uniform(0.5, 0.8)
    body = level * (0.5 + 0.5 * np.sqrt(1 - q * q)) + 0.25 * q**6 - 0.1 * np.sign(across) * q
    return np.where(inside, body, img).astype(np.float32)


def _mems(rng, w, h):
    u = h / 384
    layer, draw = canvas(w, h)
    frame = Frame(
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
        rng.uniform(0.1, 0.35) + 0.03 * field(rng, w, h, 3 * u) + 0.04 * field(rng, w, h, 50 * u)
    )
    surface = np.asarray(layer, np.float32) / 255 + 0.03 * field(rng, w, h, 2 * u)
    img = np.where(walls, min(top / 255 + 0.15, 1.0), substrate)
    return np.where(top_mask, surface, img).astype(np.float32)


def _biological(rng, w, h):
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


RENDERERS = {
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

# The NFFA-Europe classes in the dataset's (alphabetical) order; a class's index seeds its
# images, so this order is part of the generated data.
CLASSES: tuple[str, ...] = tuple(RENDERERS)
