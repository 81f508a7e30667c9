"""Self-contained HTML reports: headings, paragraphs, tables and PNG figures inlined as data URIs."""

from __future__ import annotations

import base64
import datetime
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clipheads.files import write_bytes_atomic

_STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#666;font-size:.9em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .7em;text-align:left;vertical-align:top}
th{background:#f3f3f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
.note{background:#fff8e5;border-left:4px solid #f0b400;padding:.5em .8em}
code{background:#f3f3f5;padding:0 .25em;border-radius:3px}
"""


def _cell(value) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.2f}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape(str(value))}</td>"


@dataclass
class Report:
    """Build a report piece by piece, then :meth:`save` one HTML file with everything inline."""

    title: str
    subtitle: str = ""
    parts: list[str] = field(default_factory=list)

    def heading(self, text: str, anchor: str | None = None) -> Report:
        anchor_attr = f' id="{html.escape(anchor)}"' if anchor else ""
        self.parts.append(f"<h2{anchor_attr}>{html.escape(text)}</h2>")
        return self

    def paragraph(self, text: str, note: bool = False) -> Report:
        cls = ' class="note"' if note else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")
        return self

    def link(self, text: str, href: str, before: str = "", after: str = "") -> Report:
        """A paragraph ``before`` + a link with ``text`` to ``href`` (a file beside the report: a relative path)
        + ``after``."""
        self.parts.append(f'<p>{html.escape(before)}<a href="{html.escape(href)}">{html.escape(text)}</a>'
                          f"{html.escape(after)}</p>")
        return self

    def table(self, rows: Sequence[Sequence], columns: Sequence[str], caption: str = "") -> Report:
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.parts.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        return self

    def figure(self, source, caption: str = "", alt: str | None = None, png: str | Path | None = None) -> Report:
        """Inline a matplotlib figure or a PNG file, with alt text (default: the caption) and a caption.

        Args:
            png: also write the figure as a PNG file there (atomically), e.g. beside the report.
        """
        if isinstance(source, str | Path):
            data = Path(source).read_bytes()
        else:
            buffer = io.BytesIO()
            source.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
            data = buffer.getvalue()
        if png is not None:
            write_bytes_atomic(png, data)
        encoded = base64.b64encode(data).decode("ascii")
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(f'<figure><img alt="{html.escape(alt if alt is not None else caption)}" '
                          f'src="data:image/png;base64,{encoded}">{cap}</figure>')
        return self

    def render(self) -> str:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        sub = f'<p class="meta">{html.escape(self.subtitle)} &middot; generated {stamp}</p>'
        return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}"
                f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>{sub}"
                + "\n".join(self.parts) + "</body></html>\n")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        write_bytes_atomic(path, self.render().encode("utf-8"))
        return path
