"""What every figure shares: the colour-blind-safe palette, the matplotlib style, saving with
metadata that names the series, and the HTML page that loads plotly.js from beside it.

matplotlib and plotly come with the optional extra `report`; they are imported only by the
functions that draw, so importing this module costs nothing.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import html
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from tricks_nats.errors import UsageError

#: Okabe & Ito's palette (2008), ordered for lines on white: yellow, the faintest, comes last.
OKABE_ITO = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#CC79A7",  # reddish purple
    "#000000",  # black
    "#F0E442",  # yellow
)
#: With more series than colours, the line style, then the marker, tells them apart.
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")

#: One column of a two-column paper (inches), and both columns.
COLUMN_IN = (3.5, 2.6)
TWO_COLUMNS_IN = 7.16
FONT_PT = 9
PNG_DPI = 300

MATPLOTLIB_FORMATS = (".png", ".svg", ".pdf")
HTML_FORMATS = (".html", ".htm")
FORMATS = (*MATPLOTLIB_FORMATS, ".html")
PLOTLY_JS = "plotly.min.js"


def missing(package: str) -> UsageError:
    return UsageError(f"drawing needs {package}: pip install 'tricks-nats[report]'")


def check_format(output: Path) -> str:
    """The output's suffix, lower case; UsageError unless it is one we write."""
    suffix = output.suffix.lower()
    if suffix not in MATPLOTLIB_FORMATS + HTML_FORMATS:
        raise UsageError(f"-o {output}: use a .png, .svg, .pdf or .html file name")
    return suffix


def check_drawable(output: Path) -> str:
    """`check_format`, and a UsageError naming the extra when the library that draws this
    format is not installed: said before any work (a report printed, samples read)."""
    import importlib.util

    suffix = check_format(output)
    package = "plotly" if suffix in HTML_FORMATS else "matplotlib"
    if importlib.util.find_spec(package) is None:
        raise missing(package)
    return suffix


@dataclass(frozen=True)
class SeriesStyle:
    color: str
    linestyle: str
    marker: str | None


def series_style(i: int, n: int) -> SeriesStyle:
    """Style of series `i` of `n`: a colour each; past 8 series, the second eight are dashed
    with square markers, the third dotted with triangles, and so on."""
    color = OKABE_ITO[i % len(OKABE_ITO)]
    if n <= len(OKABE_ITO):
        return SeriesStyle(color, "-", None)
    group = i // len(OKABE_ITO)
    if group == 0:
        return SeriesStyle(color, "-", None)
    return SeriesStyle(
        color, LINESTYLES[group % len(LINESTYLES)], MARKERS[(group - 1) % len(MARKERS)]
    )


def rc() -> dict[str, Any]:
    """matplotlib settings for print: 9 pt fonts, the palette, text kept as text in SVG and
    as TrueType in PDF, reproducible files (no dates, fixed SVG ids)."""
    from cycler import cycler

    return {
        "font.family": "sans-serif",
        "font.sans-serif": ["DejaVu Sans"],
        "font.size": FONT_PT,
        "axes.titlesize": FONT_PT,
        "axes.labelsize": FONT_PT,
        "xtick.labelsize": FONT_PT,
        "ytick.labelsize": FONT_PT,
        "legend.fontsize": FONT_PT,
        "legend.title_fontsize": FONT_PT,
        "figure.titlesize": FONT_PT,
        "axes.prop_cycle": cycler(color=list(OKABE_ITO)),
        "axes.linewidth": 0.6,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.linewidth": 0.4,
        "grid.alpha": 0.35,
        "xtick.major.width": 0.6,
        "ytick.major.width": 0.6,
        "lines.linewidth": 1.1,
        "legend.frameon": False,
        "legend.handlelength": 1.6,
        "legend.columnspacing": 1.0,
        "legend.borderaxespad": 0.2,
        "svg.fonttype": "none",
        "svg.hashsalt": "tricks-nats",
        "pdf.fonttype": 42,
        "ps.fonttype": 42,
        "figure.dpi": 100,
        "savefig.dpi": PNG_DPI,
    }


@contextlib.contextmanager
def pyplot() -> Iterator[Any]:
    """matplotlib.pyplot on the Agg backend, inside the print style; every figure opened in
    the block is closed after it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise missing("matplotlib") from exc
    before = set(plt.get_fignums())
    try:
        with matplotlib.rc_context(cast(Any, rc())):
            yield plt
    finally:
        for num in set(plt.get_fignums()) - before:
            plt.close(num)


def legend_columns(labels: Sequence[str], width_in: float) -> int:
    """As many legend columns as fit across `width_in` inches at FONT_PT (an estimate; see
    `fit_legend` for the measured one)."""
    if not labels:
        return 1
    char_in = FONT_PT * 0.55 / 72  # DejaVu Sans: about 0.55 em per character
    entry_in = 0.45 + char_in * max(len(label) for label in labels)
    return max(1, min(len(labels), int(width_in // entry_in)))


def fit_legend(fig: Any, ax: Any, handles: Sequence[Any], **kwargs: Any) -> Any:
    """`ax.legend(handles, **kwargs)` with as many columns as fit in the figure's width
    (measured: the widest layout that fits wins), so a legend above the axes is one row when
    it can be and never wider than the figure."""
    renderer = fig.canvas.get_renderer()
    limit = fig.bbox.width * 0.97
    for ncols in range(len(handles), 0, -1):
        legend = ax.legend(handles=list(handles), ncols=ncols, **kwargs)
        if ncols == 1 or legend.get_window_extent(renderer).width <= limit:
            balanced = math.ceil(len(handles) / math.ceil(len(handles) / ncols))
            if balanced == ncols:
                return legend
            legend.remove()  # as many rows with fewer, fuller columns: 3 + 2, not 4 + 1
            return ax.legend(handles=list(handles), ncols=balanced, **kwargs)
        legend.remove()
    return None


def save(
    fig: Any, output: Path, *, title: str, series: Sequence[str], dpi: float | None = None
) -> None:
    """Write a matplotlib figure by the output's suffix with metadata naming the series: PNG
    tEXt chunks (Title, Description, Keywords), the PDF Info dictionary (Title, Subject,
    Keywords: not compressed), SVG Dublin Core (title, description, keywords)."""
    suffix = output.suffix.lower()
    listed = ", ".join(series)
    description = f"series: {listed}" if series else "no series"
    metadata: dict[str, Any]
    if suffix == ".png":
        metadata = {
            "Title": title,
            "Description": description,
            "Keywords": listed,
            "Software": "tricks-nats",
        }
    elif suffix == ".pdf":
        metadata = {
            "Title": title,
            "Subject": description,
            "Keywords": listed,
            "Creator": "tricks-nats",
            "CreationDate": None,
        }
    elif suffix == ".svg":
        metadata = {
            "Title": title,
            "Description": description,
            "Keywords": list(series),
            "Creator": "tricks-nats",
            "Date": None,
        }
    else:
        raise UsageError(f"-o {output}: use a .png, .svg, .pdf or .html file name")
    try:
        fig.savefig(output, format=suffix[1:], metadata=metadata, dpi=dpi or PNG_DPI)
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from exc


# -- HTML ------------------------------------------------------------------------------------


@functools.cache
def _plotly_js() -> tuple[str, str, str]:
    """(plotly.js source, its version, its subresource-integrity hash)."""
    try:
        from plotly.offline import get_plotlyjs, get_plotlyjs_version
    except ImportError as exc:
        raise missing("plotly") from exc
    source = str(get_plotlyjs())
    digest = hashlib.sha384(source.encode("utf-8")).digest()
    return source, str(get_plotlyjs_version()), "sha384-" + base64.b64encode(digest).decode()


def ensure_plotly_js(directory: Path) -> Path:
    """`plotly.min.js` in `directory`, written there unless a copy of the same version is
    there already (written atomically: two reports writing at once leave one whole copy)."""
    source, version, _ = _plotly_js()
    path = directory / PLOTLY_JS
    with contextlib.suppress(OSError), path.open("rb") as f:
        if f"plotly.js v{version}".encode() in f.read(300):
            return path
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".plotly-", suffix=".js")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(source)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a web server must read it
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def write_html(fig: Any, output: Path, *, title: str, series: Sequence[str]) -> None:
    """A plotly figure as one small HTML page that loads `plotly.min.js` from beside it
    (written there once, see `ensure_plotly_js`), or from the plotly CDN when that copy is
    missing (a page moved elsewhere still works online)."""
    try:
        import plotly.io as pio
    except ImportError as exc:
        raise missing("plotly") from exc
    _, version, integrity = _plotly_js()
    cdn = f"https://cdn.plot.ly/plotly-{version}.min.js"
    ensure_plotly_js(output.parent)
    body = pio.to_html(
        fig,
        include_plotlyjs=False,
        full_html=False,
        config={"displaylogo": False, "responsive": True},
        default_width="100%",
        default_height="100%",
    )
    fallback = (
        f'<script src="{cdn}" integrity="{integrity}" crossorigin="anonymous" '
        'charset="utf-8"><\\/script>'
    )
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="tricks-nats">
<meta name="description" content="{html.escape("series: " + ", ".join(series))}">
<title>{html.escape(title)}</title>
<style>
html, body {{ height: 100%; margin: 0; }}
body {{ padding: 8px; box-sizing: border-box; }}
</style>
<script>window.PlotlyConfig = {{MathJaxConfig: 'local'}};</script>
<script src="{PLOTLY_JS}" charset="utf-8"></script>
<script>window.Plotly || document.write('{fallback}');</script>
</head>
<body>
{body}
</body>
</html>
"""
    try:
        output.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from exc


def plotly_layout(title: str, **extra: Any) -> dict[str, Any]:
    """The layout every HTML figure starts from: white, the palette, readable fonts, the title
    at the top left and the legend in one row under it, above the plot."""
    layout: dict[str, Any] = {
        "template": "plotly_white",
        "colorway": list(OKABE_ITO),
        "font": {"family": "DejaVu Sans, Arial, sans-serif", "size": 13},
        "title": {"text": title, "x": 0.01, "xanchor": "left", "y": 0.99, "yanchor": "top"},
        "legend": {"orientation": "h", "yanchor": "bottom", "y": 1.01, "xanchor": "left", "x": 0},
        "margin": {"l": 70, "r": 20, "t": 90, "b": 60},
        "hovermode": "closest",
    }
    layout.update(extra)
    return layout


def plotly_dash(linestyle: str) -> str:
    return {"-": "solid", "--": "dash", ":": "dot", "-.": "dashdot"}.get(linestyle, "solid")
