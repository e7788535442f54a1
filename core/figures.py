"""Bench pictures: labelled image grids, text samples with their differences marked, the spread.

Every picture `decodekit bench` draws carries the same header, composed by
`figure_text`: the config, the strategies with their params, the speed-up with
its spread over pairs, the model calls and the quality figures. Below it,
`draw_spread` shows each pair's ratio as a dot, the median and an interval, and
the line at ×1, so a speed-up inside the noise looks like noise. Image outputs
are drawn as a grid (one column per prompt, a row per arm: `draw_image_figure`),
text outputs as samples side by side with differing words marked
(`draw_text_figure`). PIL only.
"""

from __future__ import annotations

import difflib
import math
import re
import statistics
from pathlib import Path
from typing import Any

from .outputs import atomic_save_image

MAX_COLUMNS = 8
"""At most this many images per row of a grid (the first prompts)."""
MAX_SAMPLES = 8
"""At most this many text samples (the first prompts)."""

WIDTH_TEXT = 900
GREY, BLUE, LIGHT_BLUE = (120, 120, 120), (40, 110, 200), (205, 222, 245)
MARK_BASE, MARK_STRATEGY = (255, 236, 160), (255, 190, 190)


# -- figures --------------------------------------------------------------------------


def speedup_spread(ratios: list[float], level: float = 0.95) -> dict[str, Any]:
    """The spread of per-pair speed-ups: median, range and a distribution-free interval of the median.

    The interval is the pair of order statistics ``(x_(k), x_(n+1-k))`` with the
    largest ``k`` whose coverage of the true median, ``1 - 2 P(Binomial(n, 1/2) < k)``,
    is at least ``level``; with too few pairs for that it is the whole range,
    whose coverage ``1 - 2 / 2**n`` is given (75 % at 3 pairs, 94 % at 5).
    ``within_noise`` says whether the interval contains ×1 (no change).
    """
    if not ratios:
        raise ValueError("no per-pair ratios to summarise")
    xs = sorted(ratios)
    n = len(xs)
    k = 1
    for j in range(1, n // 2 + 1):
        if _coverage(n, j) >= level:
            k = j
    low, high = xs[k - 1], xs[n - k]
    return {
        "n": n,
        "median": statistics.median(xs),
        "min": xs[0],
        "max": xs[-1],
        "low": low,
        "high": high,
        "coverage": _coverage(n, k),
        "within_noise": bool(low <= 1.0 <= high),
    }


def _coverage(n: int, k: int) -> float:
    """P(x_(k) <= median <= x_(n+1-k)) for n draws of a continuous distribution."""
    below = sum(math.comb(n, i) for i in range(k)) / 2**n
    return max(0.0, 1.0 - 2.0 * below)


def strategy_label(specs: list[dict[str, Any]]) -> str:
    """``faster-diffusion(key_steps=paper) + prior-noise(prior_noise=0.003)``; ``no strategy``."""
    parts = []
    for s in specs:
        params = ", ".join(f"{k}={_short(v)}" for k, v in (s.get("params") or {}).items())
        parts.append(f"{s['name']}({params})" if params else s["name"])
    return " + ".join(parts) or "no strategy"


def spread_text(spread: dict[str, Any]) -> str:
    """``x1.08 (75% interval x0.95-x1.21 over 3 pairs: within noise)`` (ASCII: any font draws it)."""
    verdict = "within noise" if spread["within_noise"] else "outside noise"
    return (
        f"x{_num(spread['median'])} ({spread['coverage']:.0%} interval "
        f"x{_num(spread['low'])}-x{_num(spread['high'])} over {spread['n']} "
        f"pair{'s' if spread['n'] != 1 else ''}: {verdict})"
    )


def quality_text(quality: dict[str, dict[str, Any]]) -> str:
    """``adapter: psnr=36.2, identical=0 · shapes-judge: adherence=0.9``; ``-`` when none."""
    parts = [
        f"{source}: " + ", ".join(f"{k}={_short(v)}" for k, v in figures.items())
        for source, figures in quality.items()
        if figures
    ]
    return " · ".join(parts) or "-"


def figure_text(result: dict[str, Any]) -> dict[str, Any]:
    """The words drawn on a bench picture: ``title``, ``lines`` below it, and the two ``rows``' labels.

    ``result`` is `decodekit.bench.bench`'s result (``label`` names the config).
    """
    machine = result.get("machine") or {}
    threads = machine.get("torch_threads")
    where = machine.get("device", "?") + (
        f", {threads} thread{'s' if threads != 1 else ''}" if threads else ""
    )
    spread = result.get("speedup_spread") or speedup_spread(result["pair_ratios"])
    speed = f"speed-up {spread_text(spread)}"
    if result.get("ideal_speedup"):
        speed += f" · FLOP-ideal x{_num(result['ideal_speedup'])}"
    b, s = result["baseline"], result["strategy"]
    speed += f" · model calls {b['nfe']} -> {s['nfe']} · {where}"
    names = strategy_label(result["strategies"])
    title = f"{result.get('label') or 'bench'}: baseline vs {names}"
    return {
        "title": title,
        "lines": [speed, f"quality against the baseline: {quality_text(result['quality'])}"],
        "rows": [
            f"baseline\n{_seconds(b)} · {b['nfe']} calls",
            f"{' + '.join(x['name'] for x in result['strategies']) or 'strategy'}\n"
            f"{_seconds(s)} · {s['nfe']} calls",
        ],
    }


def _seconds(arm: dict[str, Any]) -> str:
    return f"{arm['time_s']['median']:.3g} s"


def _num(v: float) -> str:
    return f"{v:.2f}" if math.isfinite(v) else str(v)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    text = str(v)
    return text if len(text) <= 24 else text[:21] + "..."


# -- word differences -------------------------------------------------------------------


def word_diff(a: str, b: str) -> tuple[list[tuple[str, bool]], list[tuple[str, bool]]]:
    """Pieces of ``a`` and ``b`` (words, punctuation, spaces), each with whether it differs.

    Joining either side's pieces gives back its text; ``difflib`` aligns them.
    """
    pa, pb = _pieces(a), _pieces(b)
    out_a: list[tuple[str, bool]] = []
    out_b: list[tuple[str, bool]] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, pa, pb, autojunk=False).get_opcodes():
        same = tag == "equal"
        out_a += [(p, not same and not p.isspace()) for p in pa[i1:i2]]
        out_b += [(p, not same and not p.isspace()) for p in pb[j1:j2]]
    return out_a, out_b


def _pieces(text: str) -> list[str]:
    return re.findall(r"\s+|\w+|[^\w\s]", text)


def text_samples(
    baseline: list[dict[str, Any]], outputs: list[dict[str, Any]], limit: int = MAX_SAMPLES
) -> list[dict[str, Any]]:
    """Per prompt (the first ``limit``): its ``prompt`` and both texts as `word_diff` pieces.

    Where the strategy returned k rows per prompt and the baseline one, the
    first (best-ranked) row of each prompt is compared, as the quality figures do;
    where both returned ranked rows (``rank``), their best rows (rank 0).
    """
    pairs = _best_pairs(baseline, outputs)
    samples = []
    for b, o in pairs[:limit]:
        base, strat = word_diff(_one_line(b.get("text", "")), _one_line(o.get("text", "")))
        samples.append(
            {"prompt": _one_line(str(b.get("prompt", ""))), "baseline": base, "strategy": strat}
        )
    return samples


def _best_pairs(baseline: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> list[tuple]:
    """(baseline row, strategy row) per prompt, aligned as `text_samples` says."""
    if baseline and len(outputs) != len(baseline) and len(outputs) % len(baseline) == 0:
        outputs = outputs[:: len(outputs) // len(baseline)]
    return [(b, o) for b, o in zip(baseline, outputs) if not b.get("rank")]


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " / ")


# -- drawing --------------------------------------------------------------------------


def _font(size: int = 11):
    """DejaVu Sans where the system has it (even spacing), else Pillow's own font."""
    from PIL import ImageFont

    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size)


def _wrap(text: str, font, width: int) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels (long words cut)."""
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            trial = f"{line} {word}" if line else word
            if font.getlength(trial) <= width:
                line = trial
                continue
            if line:
                lines.append(line)
            while font.getlength(word) > width and len(word) > 1:
                cut = max(1, int(len(word) * width / font.getlength(word)))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _header(draw, text: dict[str, Any], width: int, x: int = 8, y: int = 6) -> int:
    """Draw title and lines; returns the y below them."""
    bold, font = _font(13), _font(11)
    for line in _wrap(text["title"], bold, width - 2 * x):
        draw.text((x, y), line, fill="black", font=bold)
        y += 16
    for part in text["lines"]:
        for line in _wrap(part, font, width - 2 * x):
            draw.text((x, y), line, fill=(40, 40, 40), font=font)
            y += 14
    return y + 4


def _header_height(text: dict[str, Any], width: int) -> int:
    from PIL import Image, ImageDraw

    return _header(ImageDraw.Draw(Image.new("RGB", (width, 400))), text, width)


SPREAD_H = 56


def draw_spread(draw, box: tuple[int, int, int, int], ratios: list[float], spread: dict) -> None:
    """Per-pair ratios as dots on an axis, the interval as a band, the median as a bar, x1 dashed."""
    x0, y0, x1, y1 = box
    font = _font(10)
    finite = [r for r in ratios if math.isfinite(r)] or [1.0]
    lo = min(finite + [1.0, spread["low"] if math.isfinite(spread["low"]) else 1.0])
    hi = max(finite + [1.0, spread["high"] if math.isfinite(spread["high"]) else 1.0])
    pad = (hi - lo) * 0.08 or 0.1
    lo, hi = max(0.0, lo - pad), hi + pad
    ax0, ax1 = x0 + 150, x1 - 10

    def px(v: float) -> int:
        v = min(max(v, lo), hi)
        return int(ax0 + (ax1 - ax0) * (v - lo) / (hi - lo))

    mid = y0 + 22
    draw.text((x0, mid - 16), "per-pair speed-up", fill="black", font=font)
    draw.text((x0, mid - 2), spread_text(spread).split(" (")[0] + " median", fill=BLUE, font=font)
    draw.rectangle([px(spread["low"]), mid - 8, px(spread["high"]), mid + 8], fill=LIGHT_BLUE)
    draw.line([ax0, mid, ax1, mid], fill=GREY)
    for y in range(mid - 14, mid + 14, 4):
        draw.line([px(1.0), y, px(1.0), y + 2], fill="black")
    draw.text((px(1.0) + 3, mid - 22), "x1", fill="black", font=font)
    for r in ratios:
        x = px(r)
        draw.ellipse([x - 3, mid - 3, x + 3, mid + 3], fill=BLUE)
    m = px(spread["median"])
    draw.rectangle([m - 1, mid - 11, m + 1, mid + 11], fill="black")
    draw.text((ax0, mid + 14), f"x{lo:.2f}", fill=GREY, font=font)
    right = f"x{hi:.2f}"
    draw.text((ax1 - font.getlength(right), mid + 14), right, fill=GREY, font=font)
    caption = f"{spread['coverage']:.0%} interval of the median" + (
        ": within noise" if spread["within_noise"] else ""
    )
    draw.text((ax0 + (ax1 - ax0) // 3, mid + 14), caption, fill=BLUE, font=font)


def _canvas(result: dict[str, Any], width: int, body_h: int):
    """A white image with the header drawn on top and the spread strip at the bottom; returns
    ``(image, draw, y)`` where the body starts at ``y``."""
    from PIL import Image, ImageDraw

    text = figure_text(result)
    top = _header_height(text, width)
    img = Image.new("RGB", (width, top + body_h + SPREAD_H + 6), "white")
    draw = ImageDraw.Draw(img)
    _header(draw, text, width)
    spread = result.get("speedup_spread") or speedup_spread(result["pair_ratios"])
    draw_spread(
        draw,
        (8, top + body_h + 4, width - 8, top + body_h + SPREAD_H),
        result["pair_ratios"],
        spread,
    )
    return img, draw, top


def column_labels(prompts: list[str], per: int, count: int) -> list[str]:
    """The label of each of ``count`` images: its prompt (and ``#i`` with several images per prompt)."""
    labels = []
    for i in range(count):
        p = prompts[i // per] if prompts and i // per < len(prompts) else f"image {i}"
        labels.append(f"{p} #{i % per}" if per > 1 else p)
    return labels


def draw_image_figure(
    result: dict[str, Any],
    baseline: list,
    outputs: list,
    prompts: list[str],
    path: str | Path,
    per_prompt: int = 1,
) -> None:
    """The labelled grid: header, a column per image with its prompt, a row per arm, the spread."""
    from PIL import Image

    n = min(len(baseline), len(outputs), MAX_COLUMNS)
    w, h = baseline[0].size
    scale = max(1, 96 // max(w, h))
    cw, ch = max(w * scale, 96), h * scale
    label_w, font = 150, _font(10)
    labels = column_labels(prompts, per_prompt, n)
    wrapped = [_wrap(label, font, cw - 6)[:4] for label in labels]
    head_h = 12 * max(len(x) for x in wrapped) + 6
    width = max(label_w + n * (cw + 4) + 8, 560)
    text = figure_text(result)
    img, draw, top = _canvas(result, width, head_h + 2 * (ch + 4) + 16)
    for c, lines in enumerate(wrapped):
        x = label_w + c * (cw + 4)
        for k, line in enumerate(lines):
            draw.text((x + 2, top + 12 * k), line, fill="black", font=font)
    y = top + head_h
    for r, (row, label) in enumerate(zip((baseline, outputs), text["rows"])):
        for k, line in enumerate(_wrap(label, font, label_w - 12)[:5]):
            draw.text((8, y + 4 + 12 * k), line, fill=GREY if r == 0 else BLUE, font=font)
        for c, im in enumerate(row[:n]):
            tile = im.convert("RGB").resize((w * scale, h * scale), Image.NEAREST)
            img.paste(tile, (label_w + c * (cw + 4), y))
        y += ch + 4
    if len(baseline) > n:
        draw.text((label_w, y + 2), f"first {n} of {len(baseline)} images", fill=GREY, font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_save_image(img, path)


def _draw_pieces(draw, x0: int, y: int, width: int, pieces, mark, font, max_lines: int = 3) -> int:
    """Draw ``pieces`` from ``(x0, y)``, wrapping at ``width``, differing ones on ``mark``; returns
    the y below. With ``draw`` None only measures."""
    x, lines = x0, 1
    for piece, differs in pieces:
        w = font.getlength(piece)
        if x + w > x0 + width and not piece.isspace():
            if lines == max_lines:
                if draw is not None:
                    draw.text((x, y), "...", fill=GREY, font=font)
                break
            x, y, lines = x0, y + 14, lines + 1
        if piece.isspace() and x == x0:
            continue
        if draw is not None:
            if differs:
                draw.rectangle([x - 1, y - 1, x + w, y + 12], fill=mark)
            draw.text((x, y), piece, fill="black", font=font)
        x += w
    return y + 16


def draw_text_figure(
    result: dict[str, Any], baseline: list[dict[str, Any]], outputs: list[dict[str, Any]], path
) -> None:
    """Header; a row per prompt: the prompt, the baseline text and the strategy text side by side,
    the words where they differ marked on each side; the spread."""
    from PIL import ImageDraw

    samples = text_samples(baseline, outputs)
    font, small = _font(11), _font(10)
    cols = [(8, 160), (176, 350), (536, WIDTH_TEXT - 544)]  # (x, width): prompt, baseline, strategy

    def cells(s: dict[str, Any]):
        prompt = [(p, False) for p in _pieces(s["prompt"])]
        return zip(cols, (prompt, s["baseline"], s["strategy"]), (None, MARK_BASE, MARK_STRATEGY))

    heights = [
        max(_draw_pieces(None, x, 0, w, pieces, mark, font) for (x, w), pieces, mark in cells(s))
        for s in samples
    ]
    prompts = len(_best_pairs(baseline, outputs))
    more = prompts > len(samples)
    ranked = prompts < min(len(baseline), len(outputs))
    img, draw, top = _canvas(
        result, WIDTH_TEXT, 22 + sum(heights) + 4 * len(samples) + 16 * (more or ranked)
    )
    draw = ImageDraw.Draw(img)
    names = " + ".join(x["name"] for x in result["strategies"]) or "strategy"
    for (x, _w), label, mark in zip(
        cols, ("prompt", "baseline", names), (None, MARK_BASE, MARK_STRATEGY)
    ):
        if mark is not None:
            draw.rectangle([x, top + 1, x + 10, top + 11], fill=mark)
            x += 14
        draw.text((x, top), label, fill=GREY, font=small)
    y = top + 20
    for s, h in zip(samples, heights):
        draw.line([8, y - 3, WIDTH_TEXT - 8, y - 3], fill=(225, 225, 225))
        for (x, w), pieces, mark in cells(s):
            _draw_pieces(draw, x, y, w, pieces, mark, font)
        y += h + 4
    if more or ranked:
        note = f"first {len(samples)} of {prompts} prompts" if more else ""
        if ranked:
            note += ("; " if note else "") + "the best-ranked row of each prompt"
        draw.text((8, y), note, fill=GREY, font=small)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_save_image(img, path)


def is_image_list(outputs: Any) -> bool:
    """Whether ``outputs`` is a non-empty list of PIL-like images."""
    return (
        isinstance(outputs, (list, tuple))
        and bool(outputs)
        and all(hasattr(o, "convert") and hasattr(o, "size") for o in outputs)
    )


def is_text_rows(outputs: Any) -> bool:
    """Whether ``outputs`` is a non-empty list of text rows (dicts with ``text``)."""
    return (
        isinstance(outputs, (list, tuple))
        and bool(outputs)
        and all(isinstance(o, dict) and "text" in o for o in outputs)
    )


__all__ = [
    "speedup_spread",
    "strategy_label",
    "spread_text",
    "quality_text",
    "figure_text",
    "word_diff",
    "text_samples",
    "column_labels",
    "draw_spread",
    "draw_image_figure",
    "draw_text_figure",
    "is_image_list",
    "is_text_rows",
]
