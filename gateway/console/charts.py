"""Server-rendered SVG for the console: the availability gauge and the spend charts.

Pure functions from numbers to SVG text (every label escaped), so the page
reads at a glance without JavaScript and the charts are tested like any
other output. Amounts are integer micro-USD.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from budget.money import micros_to_usd

_GREEN = "#2e7d32"
_GREY = "#9e9e9e"
_ORANGE = "#ef6c00"
_BLUE = "#1565c0"


def usd_text(micros: int, places: int = 2) -> str:
    """Micro-USD as 'USD 1.23' for people (rounded for display only)."""
    return f"USD {micros_to_usd(micros):.{places}f}"


def gauge(
    *, budget: int, used: int, extra: int, held: int, available: int, labels: dict[str, str]
) -> str:
    """A horizontal bar: used budget, held in flight and available, out of budget + credit."""
    width, height = 640, 56
    capacity = max(budget + max(extra, 0), used + held + available, 1)
    used_budget = min(used, budget)
    parts = [
        (used_budget, _GREY, labels["used"]),
        (min(held, capacity), _ORANGE, labels["in_flight"]),
        (max(available, 0), _GREEN, labels["available_now"]),
    ]
    x = 0.0
    rects = []
    for amount, colour, label in parts:
        w = width * amount / capacity
        if w <= 0:
            continue
        rects.append(
            f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="28" fill="{colour}">'
            f"<title>{escape(label)}: {escape(usd_text(amount))}</title></rect>"
        )
        x += w
    legend = []
    lx = 0
    for amount, colour, label in parts:
        legend.append(
            f'<rect x="{lx}" y="38" width="12" height="12" fill="{colour}"/>'
            f'<text x="{lx + 16}" y="49" font-size="12">{escape(label)} '
            f"{escape(usd_text(amount))}</text>"
        )
        lx += 215
    return (
        f'<svg class="gauge" role="img" viewBox="0 0 {width} {height}" width="100%" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="{escape(labels["available_now"])}">'
        f'<rect x="0" y="0" width="{width}" height="28" fill="#eceff1"/>'
        + "".join(rects)
        + "".join(legend)
        + "</svg>"
    )


def bars(items: Sequence[tuple[str, int]], *, empty: str) -> str:
    """Horizontal bars, one per (label, micro-USD), longest first as given."""
    if not items:
        return f'<p class="empty">{escape(empty)}</p>'
    row, label_w, bar_w = 24, 120, 150
    top = max(amount for _, amount in items) or 1
    height = row * len(items)
    out = []
    for n, (label, amount) in enumerate(items):
        y = n * row
        w = max(bar_w * amount / top, 1.0)
        out.append(
            f'<text x="{label_w - 6}" y="{y + 16}" font-size="12" text-anchor="end">'
            f"{escape(label[:18])}</text>"
            f'<rect x="{label_w}" y="{y + 4}" width="{w:.1f}" height="16" fill="{_BLUE}">'
            f"<title>{escape(label)}: {escape(usd_text(amount, 6))}</title></rect>"
            f'<text x="{label_w + w + 6:.1f}" y="{y + 16}" font-size="12">'
            f"{escape(usd_text(amount, 4))}</text>"
        )
    return (
        f'<svg class="bars" role="img" viewBox="0 0 340 {height}" width="100%" '
        f'xmlns="http://www.w3.org/2000/svg">' + "".join(out) + "</svg>"
    )


def columns(items: Sequence[tuple[str, int]], *, empty: str) -> str:
    """Vertical columns per day (label YYYY-MM-DD, micro-USD), in the order given."""
    if not items:
        return f'<p class="empty">{escape(empty)}</p>'
    width, height, base = 640, 170, 140
    top = max(amount for _, amount in items) or 1
    step = width / len(items)
    col = max(min(step * 0.7, 40), 2)
    out = [f'<line x1="0" y1="{base}" x2="{width}" y2="{base}" stroke="#90a4ae"/>']
    every = max(1, len(items) // 10)
    for n, (day, amount) in enumerate(items):
        h = max((base - 10) * amount / top, 1.0)
        x = n * step + (step - col) / 2
        if amount > 0:
            out.append(
                f'<rect x="{x:.1f}" y="{base - h:.1f}" width="{col:.1f}" height="{h:.1f}" '
                f'fill="{_BLUE}"><title>{escape(day)}: {escape(usd_text(amount, 6))}</title></rect>'
            )
        if n % every == 0:
            out.append(
                f'<text x="{x + col / 2:.1f}" y="{base + 16}" font-size="11" '
                f'text-anchor="middle">{escape(day[5:])}</text>'
            )
    out.append(f'<text x="0" y="12" font-size="11">{escape(usd_text(top, 4))}</text>')
    return (
        f'<svg class="columns" role="img" viewBox="0 0 {width} {height}" width="100%" '
        f'xmlns="http://www.w3.org/2000/svg">' + "".join(out) + "</svg>"
    )
