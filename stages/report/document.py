"""A document written twice from the same strings: one self-contained HTML page and its
Markdown twin (the report's), with one way of formatting numbers in both."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from typing import Any


def num(v: Any, digits: int = 1) -> str:
    """One number, the same way in HTML and Markdown: ints with separators, floats fixed; a
    figure that is not a finite number is marked, not hidden as a missing one."""
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return f"NOT FINITE ({v})"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.{digits}f}"


def ratio(a: Any, b: Any) -> str:
    ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and b
    if ok and not math.isfinite(a / b):
        return f"NOT FINITE ({a / b})"
    return f"{a / b:.3f} ×" if ok else "–"


@dataclass
class Doc:
    """Blocks rendered twice, to HTML and to Markdown, from the same strings."""

    blocks: list[tuple[str, Any]] = field(default_factory=list)
    figures: dict[str, str] = field(default_factory=dict)

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: list[str]) -> None:
        self.blocks.append(("ul", items))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", (header, rows)))

    def figure(self, name: str, svg: str, caption: str) -> None:
        self.figures[f"{name}.svg"] = svg
        self.blocks.append(("figure", (name, svg, caption)))

    def html(self, title: str) -> str:
        out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
               f"<title>{escape(title)}</title>",
               ("<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 "
                "1em;color:#222}"
                "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;"
                "padding:3px 7px;text-align:right}td:first-child,th:first-child{text-align:left}"
                "figure{margin:1em 0}figcaption{font-size:13px;color:#555}.gen td{text-align:left}</style>"),
               "</head><body>", f"<h1>{escape(title)}</h1>"]
        for kind, value in self.blocks:
            if kind == "h":
                out.append(f"<h{value[0] + 1}>{escape(value[1])}</h{value[0] + 1}>")
            elif kind == "p":
                out.append(f"<p>{escape(value)}</p>")
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{escape(item)}</li>" for item in value) + "</ul>")
            elif kind == "table":
                header, rows = value
                out.append("<table><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header)
                           + "</tr></thead>"
                           "<tbody>"
                           + "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>"
                                     for row in rows) + "</tbody></table>")
            elif kind == "figure":
                _, svg, caption = value
                out.append(f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"

    def markdown(self, title: str) -> str:
        def cell(text: str) -> str:
            return md_text(text).replace("|", "\\|").replace("\n", " ")

        out = [f"# {md_text(title)}", ""]
        for kind, value in self.blocks:
            if kind == "h":
                out += ["#" * (value[0] + 1) + " " + md_text(value[1]), ""]
            elif kind == "p":
                out += [md_text(value), ""]
            elif kind == "ul":
                out += [f"- {md_text(item)}" for item in value] + [""]
            elif kind == "table":
                header, rows = value
                out += ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
                out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows] + [""]
            elif kind == "figure":
                name, _, caption = value
                out += [f"![{md_text(caption)}]({name}.svg)", ""]
        return "\n".join(out)


def md_text(text: str) -> str:
    """Text for Markdown: angle brackets and ampersands as entities, so that no corpus or
    generated text becomes markup in a Markdown viewer either."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
