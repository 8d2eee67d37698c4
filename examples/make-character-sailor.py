#!/usr/bin/env python3
"""Draws examples/character-sailor.png, the picture of the character "Captain" in
examples/sailor-and-corgi.yaml: an old sailor in a navy coat and white cap with a grey beard,
drawn flat with dark outlines on a pale sky. Standard library only, seeded, so the picture (and
the anchors cached from it) is the same on every machine."""
import math
import random
import struct
import zlib

W = H = 256
rng = random.Random(20261207)

SKY_TOP, SKY_BOTTOM = (196, 222, 240), (236, 240, 232)
SKIN, BEARD, COAT, CAP, BAND, BUTTON, INK = (
    (232, 188, 156), (214, 214, 210), (34, 52, 98), (246, 246, 244), (20, 24, 40),
    (222, 184, 72), (28, 26, 30))


def ellipse(x, y, cx, cy, rx, ry):
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2


def shade(x, y):
    """The colour at (x, y) in 0..1 coordinates: back to front, each shape with an outline."""
    t = y
    colour = tuple(a + (b - a) * t for a, b in zip(SKY_TOP, SKY_BOTTOM))
    # The sea behind him.
    if y > 0.78 + 0.01 * math.sin(x * 40):
        colour = (70, 120, 150)
    shapes = [
        # (inside test value, fill): values below 1 are inside, 1..1.12 is the outline.
        (ellipse(x, y, 0.50, 1.02, 0.36, 0.42), COAT),          # shoulders and coat
        (ellipse(x, y, 0.50, 0.46, 0.17, 0.21), SKIN),          # face
        (ellipse(x, y, 0.50, 0.60, 0.16, 0.12), BEARD),         # beard
        (ellipse(x, y, 0.50, 0.27, 0.20, 0.09), CAP),           # cap crown
        (max(abs(x - 0.50) / 0.21, abs(y - 0.335) / 0.025), BAND),  # cap band
    ]
    for value, fill in shapes:
        if value < 1.0:
            colour = fill
        elif value < 1.12:
            colour = INK
    # Eyes, nose, buttons.
    for cx in (0.44, 0.56):
        if ellipse(x, y, cx, 0.44, 0.018, 0.022) < 1:
            colour = INK
    if ellipse(x, y, 0.50, 0.50, 0.03, 0.025) < 1:
        colour = (214, 150, 124)
    for cy in (0.80, 0.88, 0.96):
        if ellipse(x, y, 0.50, cy, 0.02, 0.02) < 1:
            colour = BUTTON
    return colour


rows = []
for j in range(H):
    row = bytearray([0])
    for i in range(W):
        r, g, b = shade((i + 0.5) / W, (j + 0.5) / H)
        grain = (rng.random() - 0.5) * 6
        row += bytes(max(0, min(255, int(c + grain))) for c in (r, g, b))
    rows.append(bytes(row))


def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
png += chunk(b"IDAT", zlib.compress(b"".join(rows), 9)) + chunk(b"IEND", b"")
with open(__file__.replace("make-character-sailor.py", "character-sailor.png"), "wb") as f:
    f.write(png)
