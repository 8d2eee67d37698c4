#!/usr/bin/env python3
"""Paints examples/style-watercolor.png, the style reference of examples/lighthouse-story.yaml:
soft overlapping washes on textured paper with a dark horizon line. Standard library only, seeded,
so the picture (and every inversion cached from it) is the same on every machine."""
import math
import random
import struct
import zlib

W = H = 256
rng = random.Random(20261125)


def lattice(n):
    return [[rng.random() for _ in range(n + 1)] for _ in range(n + 1)]


def smooth_noise(grid, n, x, y):
    gx, gy = x * n, y * n
    x0, y0 = int(gx), int(gy)
    fx, fy = gx - x0, gy - y0
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    a = grid[y0][x0] * (1 - fx) + grid[y0][x0 + 1] * fx
    b = grid[y0 + 1][x0] * (1 - fx) + grid[y0 + 1][x0 + 1] * fx
    return a * (1 - fy) + b * fy


octaves = [(lattice(n), n, amp) for n, amp in ((3, 0.55), (7, 0.25), (17, 0.13), (41, 0.07))]


def noise(x, y):
    return sum(amp * smooth_noise(g, n, x, y) for g, n, amp in octaves)


# Washes: (centre x, centre y, radius, colour).
washes = [
    (0.30, 0.28, 0.34, (92, 140, 196)),
    (0.72, 0.22, 0.30, (232, 170, 96)),
    (0.55, 0.70, 0.38, (70, 130, 120)),
    (0.18, 0.78, 0.22, (196, 92, 84)),
]
paper = (246, 240, 226)
rows = []
for j in range(H):
    row = bytearray([0])
    for i in range(W):
        x, y = i / W, j / H
        n = noise(x, y)
        r, g, b = paper
        for cx, cy, rad, (wr, wg, wb) in washes:
            d = math.hypot(x - cx, y - cy) / rad + (n - 0.5) * 0.9
            if d < 1.0:
                # Pigment pools at the edge of a wash, as it does on wet paper.
                a = 0.45 * (1 - d) + 0.35 * math.exp(-((d - 0.92) ** 2) / 0.002)
                r, g, b = r + (wr - r) * a, g + (wg - g) * a, b + (wb - b) * a
        horizon = 0.52 + 0.03 * math.sin(x * 9.0) + (n - 0.5) * 0.04
        if abs(y - horizon) < 0.006:
            r, g, b = r * 0.35, g * 0.35, b * 0.4
        grain = (rng.random() - 0.5) * 10
        row += bytes(max(0, min(255, int(c + grain))) for c in (r, g, b))
    rows.append(bytes(row))


def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
png += chunk(b"IDAT", zlib.compress(b"".join(rows), 9)) + chunk(b"IEND", b"")
with open(__file__.replace("make-style-watercolor.py", "style-watercolor.png"), "wb") as f:
    f.write(png)
