"""A small raster plotter that writes PNG with numpy + zlib: lines, markers, bars and text.

Why not matplotlib: it is a heavy dependency (and not in the core install), while a CI step summary
needs the plot on every runner, GPU images and edge boxes included. Two simple charts need little:
a canvas, Bresenham lines, discs, a 5x8 bitmap font (the classic 5-column LCD font, scaled), linear
or log axes with ticks, and a legend. Everything here is drawing; no figure is computed.
"""
from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np

# ASCII 32..126, five column bytes each, bit 0 = top row, bit 7 = descender row.
_FONT_HEX = (
    "0000000000 00005f0000 0007000700 147f147f14 242a7f2a12 2313086462 3649552250 0000050300 001c224100 0041221c00"
    " 2a1c7f1c2a 08083e0808 0080603000 0808080808 0000606000 2010080402 3e5149453e 00427f4000 4261514946 2141454b31"
    " 1814127f10 2745454539 3c4a494930 0171090503 3649494936 064949291e 0000363600 0080563600 0008142241 1414141414"
    " 0041221408 0201510906 3e415d594e 7c1211127c 7f49494936 3e41414122 7f4141413e 7f49494941 7f09090901 3e41495173"
    " 7f0808087f 00417f4100 2040413f01 7f08142241 7f40404040 7f021c027f 7f0408107f 3e4141413e 7f09090906 3e4151215e"
    " 7f09192946 2649494932 03017f0103 3f4040403f 1f2040201f 3f4038403f 6314081463 0304780403 6159494d43 007f414141"
    " 0204081020 004141417f 0402010204 4040404040 0003070800 2054547840 7f28444438 3844444428 384444287f 3854545418"
    " 00087e0902 18a4a49c78 7f08040478 00447d4000 2040403d00 7f10284400 00417f4000 7c04780478 7c08040478 3844444438"
    " fc18242418 18242418fc 7c08040408 4854545424 04043f4424 3c4040207c 1c2040201c 3c4030403c 4428102844 4c9090907c"
    " 4464544c44 0008364100 0000770000 0041360800 0201020402")
_GLYPHS = {chr(32 + i): bytes.fromhex(g) for i, g in enumerate(_FONT_HEX.split())}

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
BLACK, GREY, LIGHT = (0, 0, 0), (110, 110, 110), (225, 225, 225)


def _glyph(ch: str) -> np.ndarray:
    cols = _GLYPHS.get(ch, _GLYPHS["?"])
    return np.array([[(c >> row) & 1 for c in cols] for row in range(8)], dtype=bool)


class Canvas:
    def __init__(self, width: int, height: int):
        self.px = np.full((height, width, 3), 255, np.uint8)

    @property
    def size(self) -> tuple[int, int]:
        return self.px.shape[1], self.px.shape[0]

    def rect(self, x0: float, y0: float, x1: float, y1: float, color) -> None:
        h, w = self.px.shape[:2]
        xa, xb = sorted((int(round(x0)), int(round(x1))))
        ya, yb = sorted((int(round(y0)), int(round(y1))))
        self.px[max(ya, 0):min(yb + 1, h), max(xa, 0):min(xb + 1, w)] = color

    def line(self, x0: float, y0: float, x1: float, y1: float, color, width: int = 1) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        xs, ys = np.linspace(x0, x1, n), np.linspace(y0, y1, n)
        r = width // 2
        for x, y in zip(xs, ys):
            self.rect(x - r, y - r, x - r + width - 1, y - r + width - 1, color)

    def dashed(self, x0: float, y0: float, x1: float, y1: float, color, dash: int = 6) -> None:
        n = max(abs(x1 - x0), abs(y1 - y0))
        steps = max(int(n // dash), 1)
        for i in range(0, steps, 2):
            a, b = i / steps, min((i + 1) / steps, 1)
            self.line(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a, x0 + (x1 - x0) * b, y0 + (y1 - y0) * b, color)

    def disc(self, cx: float, cy: float, r: float, color) -> None:
        h, w = self.px.shape[:2]
        ys, xs = np.ogrid[:h, :w]
        self.px[(xs - cx) ** 2 + (ys - cy) ** 2 <= r * r] = color

    def text(self, x: float, y: float, s: str, color=BLACK, scale: int = 2, anchor: str = "left",
             vertical: bool = False) -> None:
        """Draw ``s`` with its top-left (or centre / right per ``anchor``) at (x, y); vertical reads upwards."""
        if not s:
            return
        bmp = np.concatenate([np.pad(_glyph(c), ((0, 0), (0, 1))) for c in s], axis=1)
        bmp = np.kron(bmp, np.ones((scale, scale), dtype=bool)).astype(bool)
        if vertical:
            bmp = np.rot90(bmp)
        bh, bw = bmp.shape
        along = bh if vertical else bw
        shift = {"left": 0, "center": along // 2, "right": along}[anchor]
        x0, y0 = (int(x), int(y) - shift) if vertical else (int(x) - shift, int(y))
        if vertical:
            y0 = int(y) - (along - shift)
        h, w = self.px.shape[:2]
        ys, xs = np.nonzero(bmp)
        ys, xs = ys + y0, xs + x0
        keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        self.px[ys[keep], xs[keep]] = color

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(encode_png(self.px))


def text_width(s: str, scale: int = 2) -> int:
    return len(s) * 6 * scale


def encode_png(rgb: np.ndarray) -> bytes:
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000 or a < 0.01:
        return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{v:.3g}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    return [round(start + i * step, 12) for i in range(int((hi - start) / step + 1e-9) + 1)]


class Axes:
    """A plot area inside the canvas with linear or log10 axes."""

    def __init__(self, canvas: Canvas, box: tuple[int, int, int, int], xlim: tuple[float, float],
                 ylim: tuple[float, float], xlog: bool = False, ylog: bool = False):
        self.c, self.box = canvas, box
        self.xlog, self.ylog = xlog, ylog
        self.xlim = tuple(math.log10(v) for v in xlim) if xlog else xlim
        self.ylim = tuple(math.log10(v) for v in ylim) if ylog else ylim

    def xy(self, x: float, y: float) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        xv = math.log10(x) if self.xlog else x
        yv = math.log10(y) if self.ylog else y
        fx = (xv - self.xlim[0]) / ((self.xlim[1] - self.xlim[0]) or 1)
        fy = (yv - self.ylim[0]) / ((self.ylim[1] - self.ylim[0]) or 1)
        return x0 + fx * (x1 - x0), y1 - fy * (y1 - y0)

    def frame(self, title: str, xlabel: str, ylabel: str, xticks: list[float], yticks: list[float],
              xtick_labels: list[str] | None = None) -> None:
        x0, y0, x1, y1 = self.box
        for i, t in enumerate(xticks):
            px, _ = self.xy(t, 10 ** self.ylim[0] if self.ylog else self.ylim[0])
            self.c.line(px, y0, px, y1, LIGHT)
            self.c.line(px, y1, px, y1 + 5, BLACK)
            self.c.text(px, y1 + 9, xtick_labels[i] if xtick_labels else fmt(t), anchor="center")
        widest = max((text_width(fmt(t)) for t in yticks), default=0)
        for t in yticks:
            _, py = self.xy(10 ** self.xlim[0] if self.xlog else self.xlim[0], t)
            self.c.line(x0, py, x1, py, LIGHT)
            self.c.line(x0 - 5, py, x0, py, BLACK)
            self.c.text(x0 - 9, py - 7, fmt(t), anchor="right")
        self.c.line(x0, y0, x0, y1, BLACK)
        self.c.line(x0, y1, x1, y1, BLACK)
        self.c.line(x0, y0, x1, y0, GREY)
        self.c.line(x1, y0, x1, y1, GREY)
        self.c.text((x0 + x1) / 2, y0 - 26, title, anchor="center")
        self.c.text((x0 + x1) / 2, y1 + 34, xlabel, GREY, anchor="center")
        self.c.text(x0 - widest - 36, (y0 + y1) / 2, ylabel, GREY, anchor="center", vertical=True)


def log_ticks(lo: float, hi: float) -> list[float]:
    ticks = [10.0 ** k * m for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 5)]
    inside = [t for t in ticks if lo <= t <= hi]
    return inside if len(inside) >= 2 else [lo, hi]


def span(values: list[float], log: bool, pad: float = 0.08) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
    if hi - lo < 1e-12:
        lo, hi = lo - (abs(lo) * 0.1 or 0.5), hi + (abs(hi) * 0.1 or 0.5)
    d = (hi - lo) * pad
    lo, hi = lo - d, hi + d
    return (10 ** lo, 10 ** hi) if log else (lo, hi)
