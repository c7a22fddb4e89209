"""Pictures and a static HTML page for evaluation results: captioned image grids, tables, line plots.

    grid = image_grid(["a.png", "b.png"], ["a red circle", "a blue square"], columns=4); grid.save("grid.png")
    write_html("report.html", "PartiPrompts", [("CLIP score per category", table_html(rows)), ...])

Used by `evaluation.benchmark` (PartiPrompts and COCO reports) and by the end-to-end demo. The page only
links files that sit beside it, so the whole folder can be copied or served as it is.
"""
from __future__ import annotations

import html
import textwrap
from pathlib import Path

from common.files import write_atomic


def image_grid(images: list, captions: list[str] | None = None, columns: int = 4, cell: int = 128):
    """PIL images or paths -> one PIL image, `columns` wide, each cell `cell` pixels with its caption below."""
    from PIL import Image, ImageDraw

    images = [Image.open(im) if isinstance(im, (str, Path)) else im for im in images]
    if not images:
        raise ValueError("image_grid needs at least one image")
    rows = (len(images) + columns - 1) // columns
    text_h = 40 if captions else 0
    grid = Image.new("RGB", (columns * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for n, im in enumerate(images):
        x, y = (n % columns) * cell, (n // columns) * (cell + text_h)
        grid.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST if im.width < cell else Image.BICUBIC), (x, y))
        if captions:
            lines = textwrap.wrap(captions[n], width=max(cell // 6, 8))[:3]
            draw.multiline_text((x + 2, y + cell + 1), "\n".join(lines), fill="black", spacing=1)
    return grid


def line_plot(path: str | Path, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str = "",
              logy: bool = False) -> Path:
    """series: name -> (x values, y values); saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name)
    ax.set_xlabel(xlabel), ax.set_ylabel(ylabel), ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def table_html(rows: list[dict], columns: list[str] | None = None, digits: int = 2) -> str:
    if columns is None:
        columns = list(rows[0]) if rows else []
    fmt = lambda v: f"{v:.{digits}f}" if isinstance(v, float) else html.escape(str(v))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def image_html(src: str, caption: str = "", width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    text = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{html.escape(src)}"{size}>{text}</figure>'


def write_html(path: str | Path, title: str, sections: list[tuple[str, str]], intro: str = "") -> Path:
    """A page of (heading, HTML body) sections."""
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "th{background:#eee}figure{display:inline-block;margin:4px}img{image-rendering:pixelated}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"]
    if intro:
        parts.append(f"<p>{intro}</p>")
    parts += [f"<h2>{html.escape(heading)}</h2>\n{body}" for heading, body in sections]
    parts.append("</body></html>\n")
    write_atomic(path, "\n".join(parts))  # (a reader never sees half a page; an earlier page stays if this fails)
    return Path(path)
