"""The PNG of ``ddlab.fid_curve``: FID against NFE (log-x), one line per sampler, and a second panel
for class accuracy when the points have it. Drawn with Pillow (a ddlab dependency through
torchvision), so the plot needs no plotting library."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
PANEL_W, PANEL_H, MARGIN = 860, 400, (80, 40, 170, 60)  # left, top, right, bottom


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks within [lo, hi] (lo > 0), or 1-9 ones when those are fewer than three."""
    for mantissas in ((1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):  # every integer mantissa when 1-2-5 gives < 3
        ticks = [m * 10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                 for m in mantissas if lo <= m * 10.0**e <= hi]
        if len(ticks) >= 3:
            break
    return ticks or [lo, hi]


def linear_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round ticks covering [lo, hi]."""
    span = hi - lo if hi > lo else abs(hi) or 1.0
    raw = span / count
    step = min((m * 10.0 ** math.floor(math.log10(raw)) for m in (1, 2, 2.5, 5, 10)), key=lambda s: abs(s - raw))
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1 or v == 0 else f"{v:.3g}"


def _panel(draw: ImageDraw.ImageDraw, top: int, series: dict, ylabel: str, xr: tuple, font, small) -> None:
    """One panel at height ``top``: axes, ticks, grid and one polyline with markers per sampler."""
    left, right, bottom = MARGIN[0], PANEL_W - MARGIN[2], top + PANEL_H - MARGIN[3]
    ptop = top + MARGIN[1]
    ys = [y for pts in series.values() for _, y in pts]
    ylo, yhi = min(ys), max(ys)
    logy = ylo > 0 and yhi / ylo > 10  # FIDs spanning decades: log scale, so the good points stay readable
    if logy:
        yt = log_ticks(10 ** math.floor(math.log10(ylo)), 10 ** math.ceil(math.log10(yhi)))
        yt = [t for t in yt if ylo / 2 <= t <= yhi * 2]
        ylo, yhi = min(ylo, yt[0]) / 1.1, max(yhi, yt[-1]) * 1.1
        ylabel += " (log scale)"
    else:
        pad = 0.05 * (yhi - ylo) or 0.05 * (abs(yhi) or 1.0)
        yt = linear_ticks(ylo - pad, yhi + pad)
        ylo, yhi = yt[0], yt[-1]
    fy = math.log10 if logy else (lambda v: v)
    lx0, lx1 = math.log10(xr[0]) - 0.05, math.log10(xr[1]) + 0.05

    def px(x: float) -> float:
        return left + (math.log10(x) - lx0) / (lx1 - lx0) * (right - left)

    def py(y: float) -> float:
        return bottom - (fy(y) - fy(ylo)) / ((fy(yhi) - fy(ylo)) or 1.0) * (bottom - ptop)

    for t in log_ticks(xr[0], xr[1]):
        draw.line([(px(t), ptop), (px(t), bottom)], fill=(225, 225, 225))
        draw.text((px(t), bottom + 6), _fmt(t), fill="black", font=small, anchor="mt")
    for t in yt:
        draw.line([(left, py(t)), (right, py(t))], fill=(225, 225, 225))
        draw.text((left - 6, py(t)), _fmt(round(t, 6)), fill="black", font=small, anchor="rm")
    draw.rectangle([left, ptop, right, bottom], outline="black")
    draw.text(((left + right) / 2, bottom + 28), "NFE (network forwards per image, guidance counted; log scale)",
              fill="black", font=font, anchor="mt")
    draw.text((8, ptop - 24), ylabel, fill="black", font=font)
    for i, (name, pts) in enumerate(series.items()):
        color, xy = COLORS[i % len(COLORS)], [(px(x), py(y)) for x, y in sorted(pts)]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=3)
        for x, y in xy:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        ly = ptop + 10 + 20 * i
        draw.line([(right + 15, ly), (right + 45, ly)], fill=color, width=3)
        draw.text((right + 53, ly), name, fill="black", font=small, anchor="lm")


def plot_curve(points: list[dict], path: str | Path, title: str = "") -> Path:
    """Write the PNG of ``points`` (dicts with ``sampler``, ``nfe``, ``fid`` and maybe ``class_accuracy``)."""
    panels = [("fid", "FID (lower is better)")]
    if points and all("class_accuracy" in p for p in points):
        panels.append(("class_accuracy", "class accuracy (higher is better)"))
    nfes = [p["nfe"] for p in points] or [1]
    xr = (min(nfes), max(nfes) if max(nfes) > min(nfes) else min(nfes) * 2)
    img = Image.new("RGB", (PANEL_W, 30 + PANEL_H * len(panels)), "white")
    draw, font, small = ImageDraw.Draw(img), _font(15), _font(13)
    draw.text((PANEL_W / 2, 8), title, fill="black", font=font, anchor="mt")
    for j, (key, label) in enumerate(panels):
        series: dict[str, list] = {}
        for p in points:
            if math.isfinite(float(p[key])):
                series.setdefault(p["sampler"], []).append((float(p["nfe"]), float(p[key])))
        if series:
            _panel(draw, 30 + j * PANEL_H, series, label, xr, font, small)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
