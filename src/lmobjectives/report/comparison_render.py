"""The report document of ``lmobj compare`` rendered as Markdown, and as one self-contained
HTML page (plots embedded as base64, no external assets)."""

from __future__ import annotations

import base64
import html
import re

from lmobjectives.report.comparison_doc import Doc

_INLINE = [(re.compile(r"\*\*(.+?)\*\*"), r"<b>\1</b>"), (re.compile(r"`(.+?)`"), r"<code>\1</code>")]


def _inline_html(text: str) -> str:
    out = html.escape(text, quote=False)
    for pat, rep in _INLINE:
        out = pat.sub(rep, out)
    return out


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(doc: Doc) -> str:
    lines: list[str] = []
    for block in doc.blocks:
        kind = block[0]
        if kind == "h1":
            lines += [f"# {block[1]}", ""]
        elif kind == "h2":
            lines += [f"## {block[1]}", ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "code":
            lines += ["```bash", block[1], "```", ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in block[1]] + [""]
        elif kind == "ol":
            lines += [f"{i}. {item}" for i, item in enumerate(block[1], 1)] + [""]
        elif kind == "table":
            head, body = block[1], block[2]
            lines.append("| " + " | ".join(map(_md_cell, head)) + " |")
            lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|")
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in body]
            lines.append("")
        elif kind == "img":
            lines += [f"![{block[2]}]({block[1]})", ""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;line-height:1.45;color:#222}table{border-collapse:collapse;margin:1em 0;
font-size:.92em}th,td{border:1px solid #ccc;padding:.3em .6em}td{text-align:right}td:first-child,
th:first-child{text-align:left}th{background:#f3f3f3}code,pre{background:#f6f6f6;border-radius:3px}
pre{padding:.6em;overflow-x:auto}img{max-width:100%}sup{color:#a33}"""


def _html_cell(text: str) -> str:
    m = re.fullmatch(r"n/a \[(\d+)\]", text)
    if m:
        return f'n/a<sup><a href="#note-{m.group(1)}">{m.group(1)}</a></sup>'
    return _inline_html(text)


def render_html(doc: Doc, images: dict[str, bytes]) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>Pre-training objectives under an equal budget</title>",
             f"<style>{_CSS}</style></head><body>"]
    for block in doc.blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{_inline_html(block[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{_inline_html(block[1])}</p>")
        elif kind == "code":
            parts.append(f"<pre><code>{html.escape(block[1])}</code></pre>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "ol":
            parts.append("<ol>" + "".join(f'<li id="note-{n}">{_inline_html(i)}</li>'
                                          for n, i in enumerate(block[1], 1)) + "</ol>")
        elif kind == "table":
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in block[1])
            body = "".join("<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in r) + "</tr>"
                           for r in block[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = images.get(block[1])
            if data is not None:
                b64 = base64.b64encode(data).decode()
                parts.append(f'<p><img alt="{html.escape(block[2])}" src="data:image/png;base64,{b64}"></p>')
    parts.append("</body></html>")
    return "\n".join(parts)
