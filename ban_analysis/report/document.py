"""The report's document model and number formatting: blocks rendered to Markdown and to HTML alike.

``Doc`` collects headings, paragraphs, lists, tables and figures; ``markdown()`` and ``html()``
render the same blocks, so index.md and the self-contained report.html say the same thing.
``to_jsonable`` turns the report's numbers into strict JSON (NaN and ±inf become null).
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd

FIGURE_DPI = 110


# ----------------------------------------------------------------------------- formatting


def num(x, digits: int = 2, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a" if x is None or math.isnan(x) else ("∞" if x > 0 else "-∞")
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def pval(x) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:.1e}" if x < 1e-3 else f"{x:.3f}"


def ci(lo, hi, signed=True, digits=2) -> str:
    return f"[{num(lo, digits, signed)}, {num(hi, digits, signed)}]"


def to_jsonable(obj):
    """Plain JSON types; NaN and ±inf become null (JSON has neither)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, pd.DataFrame):
        return to_jsonable(obj.to_dict("records"))
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


# ----------------------------------------------------------------------------- document model


class Doc:
    """Blocks rendered to Markdown and HTML alike, so both say the same thing."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def items(self, items: list[str]):
        if items:
            self.blocks.append(("list", list(items)))

    def table(self, frame: pd.DataFrame):
        if frame is not None and len(frame):
            self.blocks.append(("table", frame.astype(str)))

    def figure(self, name: str, png: bytes, caption: str):
        self.blocks.append(("fig", name, png, caption))

    def markdown(self) -> str:
        out = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                out.append("#" * block[1] + " " + block[2])
            elif kind == "p":
                out.append(block[1])
            elif kind == "list":
                out.append("\n".join(f"- {item}" for item in block[1]))
            elif kind == "table":
                frame = block[1]
                cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
                lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |",
                         "|" + "---|" * len(frame.columns)]
                lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
                out.append("\n".join(lines))
            elif kind == "fig":
                out.append(f"![{block[3]}](figures/{block[1]}.png)\n\n*{block[3]}*")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        esc = html.escape
        body = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                body.append(f"<h{block[1]}>{esc(block[2])}</h{block[1]}>")
            elif kind == "p":
                text = esc(block[1]).replace("**", "")
                body.append(f"<p>{text}</p>")
            elif kind == "list":
                body.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in block[1]) + "</ul>")
            elif kind == "table":
                frame = block[1]
                head = "".join(f"<th>{esc(str(c))}</th>" for c in frame.columns)
                rows = "".join("<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in r) + "</tr>"
                               for r in frame.itertuples(index=False))
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "fig":
                data = base64.b64encode(block[2]).decode("ascii")
                body.append(f'<figure><img alt="{esc(block[3])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{esc(block[3])}</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45;padding:0 1em}"
                 "table{border-collapse:collapse;font-size:0.85em;margin:1em 0}"
                 "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}"
                 "img{max-width:100%}figcaption{font-style:italic;color:#444}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIGURE_DPI)
    return buf.getvalue()


def add_figure(doc: Doc, out: Path, listing: list, name: str, make, caption: str) -> None:
    """Draw, save to out/figures/<name>.png and place in the document; a figure with nothing to draw
    (an objective or log absent) becomes a one-line note instead."""
    try:
        fig = make()
    except ValueError as err:
        doc.p(f"Figure '{name}' is not shown: {err}.")
        return
    data = png(fig)
    (out / "figures" / f"{name}.png").write_bytes(data)
    doc.figure(name, data, caption)
    listing.append(f"figures/{name}.png")
