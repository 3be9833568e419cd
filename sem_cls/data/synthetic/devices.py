"""Renderers of made structures as the NFFA-Europe classes show them: patterned surfaces,
probe tips, MEMS devices and electrodes; (rng, w, h) -> float32 (h, w) on roughly 0-1."""

from __future__ import annotations

import math

import numpy as np

from sem_cls.data.synthetic.drawing import (
    Frame,
    canvas,
    field,
    grid,
    overlay,
)


def patterned(rng, w, h):
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


def tips(rng, w, h):
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


def mems(rng, w, h):
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
