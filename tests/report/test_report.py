"""The HTML report is one self-contained file: tables escaped, figures inlined."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from clipheads.report import Report  # noqa: E402


def test_report_is_self_contained(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    report = Report("clipheads demo", subtitle="tiny").heading("Results").paragraph("a < b & c")
    report.table([["L0.H1", 1.5, 3]], ["head", "delta", "rank"]).figure(fig, caption="a line")
    plt.close(fig)
    text = report.save(tmp_path / "r.html").read_text()
    assert "a &lt; b &amp; c" in text
    assert "<td>L0.H1</td>" in text and '<td class="num">1.50</td>' in text
    assert "data:image/png;base64," in text and "src=\"http" not in text
