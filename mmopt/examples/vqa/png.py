"""Minimal PNG reader (stdlib zlib + numpy), so the VQA example needs no Pillow.

Supports what small datasets ship: 8-bit, non-interlaced, colour types grey, grey+alpha, RGB,
RGBA and palette, with all five scanline filters. Anything else is refused with a ValueError
that names the file, rather than being decoded wrongly.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# colour type -> (name, channels per pixel in the file)
COLOUR_TYPES = {0: ("grey", 1), 2: ("RGB", 3), 3: ("palette", 1), 4: ("grey+alpha", 2), 6: ("RGBA", 4)}


def _chunks(data: bytes, name: str):
    """Yield ``(type, payload)`` for each chunk, checking lengths and CRCs."""
    pos = len(SIGNATURE)
    while pos < len(data):
        if pos + 8 > len(data):
            raise ValueError(f"{name}: truncated PNG (chunk header cut off at byte {pos}).")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 8 + length
        if end + 4 > len(data):
            raise ValueError(f"{name}: truncated PNG ({kind!r} chunk runs past the end of the file).")
        payload = data[pos + 8:end]
        (crc,) = struct.unpack(">I", data[end:end + 4])
        if zlib.crc32(kind + payload) != crc:
            raise ValueError(f"{name}: corrupt PNG (CRC mismatch in {kind!r} chunk).")
        yield kind, payload
        if kind == b"IEND":
            return
        pos = end + 4
    raise ValueError(f"{name}: truncated PNG (no IEND chunk).")


def _paeth_row(line: list[int], prev: list[int], bpp: int) -> list[int]:
    out = line[:]
    for i in range(len(out)):
        a = out[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
        out[i] = (out[i] + pred) & 0xFF
    return out


def _average_row(line: list[int], prev: list[int], bpp: int) -> list[int]:
    out = line[:]
    for i in range(len(out)):
        a = out[i - bpp] if i >= bpp else 0
        out[i] = (out[i] + ((a + prev[i]) >> 1)) & 0xFF
    return out


def _unfilter(raw: np.ndarray, height: int, stride: int, bpp: int, name: str) -> np.ndarray:
    """Undo the per-scanline filters. Runs of Up rows are one cumulative sum; Sub is a
    cumulative sum along the row; Average and Paeth fall back to a per-byte loop."""
    rows = raw.reshape(height, stride + 1)
    kinds, lines = rows[:, 0], rows[:, 1:]
    bad = np.flatnonzero(kinds > 4)
    if bad.size:
        raise ValueError(f"{name}: corrupt PNG (unknown filter type {int(kinds[bad[0]])} on row {bad[0]}).")
    out = np.empty((height, stride), np.uint8)
    zero = np.zeros(stride, np.uint8)
    y = 0
    while y < height:
        kind = kinds[y]
        prev = out[y - 1] if y else zero
        if kind == 0:
            out[y] = lines[y]
        elif kind == 1:
            out[y] = np.cumsum(lines[y].reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:
            end = y + 1
            while end < height and kinds[end] == 2:
                end += 1
            out[y:end] = np.cumsum(lines[y:end], axis=0, dtype=np.uint8) + prev
            y = end
            continue
        elif kind == 3:
            out[y] = _average_row(lines[y].tolist(), prev.tolist(), bpp)
        else:
            out[y] = _paeth_row(lines[y].tolist(), prev.tolist(), bpp)
        y += 1
    return out


def read_png(path: str | Path) -> np.ndarray:
    """Decode a PNG into ``uint8 [H, W, C]``: C is 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA).
    Palette images are expanded to RGB, or RGBA when they carry a tRNS chunk."""
    name = str(path)
    data = Path(path).read_bytes()
    if not data.startswith(SIGNATURE):
        raise ValueError(f"{name}: not a PNG file (bad signature).")
    header, palette, trns, idat = None, None, None, []
    for kind, payload in _chunks(data, name):
        if kind == b"IHDR":
            if len(payload) != 13:
                raise ValueError(f"{name}: corrupt PNG (IHDR has {len(payload)} bytes, expected 13).")
            header = struct.unpack(">IIBBBBB", payload)
        elif kind == b"PLTE":
            palette = np.frombuffer(payload, np.uint8).reshape(-1, 3)
        elif kind == b"tRNS":
            trns = np.frombuffer(payload, np.uint8)
        elif kind == b"IDAT":
            idat.append(payload)
    if header is None:
        raise ValueError(f"{name}: corrupt PNG (no IHDR chunk).")
    width, height, depth, colour, compression, filtering, interlace = header
    if depth != 8:
        raise ValueError(f"{name}: unsupported PNG bit depth {depth} (only 8-bit images are supported).")
    if colour not in COLOUR_TYPES:
        raise ValueError(f"{name}: unsupported PNG colour type {colour}.")
    if interlace != 0:
        raise ValueError(f"{name}: unsupported interlaced PNG (only non-interlaced images are supported).")
    if compression != 0 or filtering != 0:
        raise ValueError(f"{name}: unsupported PNG compression/filter method {compression}/{filtering}.")
    if width == 0 or height == 0:
        raise ValueError(f"{name}: corrupt PNG (empty {width}x{height} image).")
    if not idat:
        raise ValueError(f"{name}: corrupt PNG (no IDAT chunk).")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise ValueError(f"{name}: corrupt PNG (image data does not decompress: {e}).") from None
    channels = COLOUR_TYPES[colour][1]
    stride = width * channels
    if len(raw) != height * (stride + 1):
        raise ValueError(f"{name}: corrupt PNG (image data has {len(raw)} bytes, "
                         f"expected {height * (stride + 1)} for {width}x{height}).")
    pixels = _unfilter(np.frombuffer(raw, np.uint8), height, stride, channels, name)
    pixels = pixels.reshape(height, width, channels)
    if colour == 3:
        if palette is None:
            raise ValueError(f"{name}: corrupt PNG (palette image without a PLTE chunk).")
        index = pixels[..., 0]
        if int(index.max()) >= len(palette):
            raise ValueError(f"{name}: corrupt PNG (palette index {int(index.max())} out of range).")
        if trns is not None:
            alpha = np.full(len(palette), 255, np.uint8)
            alpha[:min(len(trns), len(palette))] = trns[:len(palette)]
            return np.concatenate([palette, alpha[:, None]], axis=1)[index]
        return palette[index]
    return pixels


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode a PNG into ``uint8 [H, W, 3]``: grey is repeated, alpha is dropped."""
    pixels = read_png(path)
    if pixels.shape[2] in (1, 2):
        return np.repeat(pixels[..., :1], 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3])
