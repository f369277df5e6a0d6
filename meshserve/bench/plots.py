"""Line plots for the benchmarks: PNG through matplotlib when it is installed, else a dependency-free SVG."""

from __future__ import annotations

import math
import os

_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def write_line_plots(path: str, panels: list[tuple[str, dict[str, tuple[list[float], list[float]]]]],
                     xlabel: str, log_x: bool = False, log_y: bool = True) -> str:
    """Side-by-side panels, each (y label, {series name: (xs, ys)}). Returns the path written (.svg when
    matplotlib is missing)."""
    if not path.endswith(".svg"):
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
            for ax, (ylabel, series) in zip(axes[0], panels):
                for name, (xs, ys) in series.items():
                    ax.plot(xs, ys, marker="o", label=name)
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel)
                if log_x:
                    ax.set_xscale("log", base=2)
                if log_y:
                    ax.set_yscale("log")
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(path)
            plt.close(fig)
            return path
        except ImportError:
            path = os.path.splitext(path)[0] + ".svg"
    w = 640
    svgs = [_svg_panel(series, xlabel, ylabel, log_x, log_y) for ylabel, series in panels]
    body = "\n".join(f'<g transform="translate({i * w},0)">{s}</g>' for i, s in enumerate(svgs))
    with open(path, "w") as f:
        f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * len(panels)}" height="400" '
                f'font-family="sans-serif" font-size="12">\n{body}\n</svg>\n')
    return path


def _svg_panel(series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, log_x: bool,
               log_y: bool) -> str:
    w, h, m = 640, 400, 60

    def tx(v: float, log: bool) -> float:
        return math.log10(v) if log else v

    xs_all = [tx(x, log_x) for xs, _ in series.values() for x in xs if x > 0 or not log_x]
    ys_all = [tx(y, log_y) for _, ys in series.values() for y in ys if math.isfinite(y) and (y > 0 or not log_y)]
    x0, x1 = (min(xs_all), max(xs_all)) if xs_all else (0.0, 1.0)
    y0, y1 = (min(ys_all), max(ys_all)) if ys_all else (0.0, 1.0)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def px(x: float) -> float:
        return m + (tx(x, log_x) - x0) / (x1 - x0) * (w - 2 * m)

    def py(y: float) -> float:
        return h - m - (tx(y, log_y) - y0) / (y1 - y0) * (h - 2 * m)

    parts = [f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>',
             f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>',
             f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">{xlabel}</text>',
             (f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle">'
              f'{ylabel}{" (log)" if log_y else ""}</text>')]
    ticks = sorted({x for xs, _ in series.values() for x in xs})
    parts += [f'<text x="{px(x):.1f}" y="{h - m + 15}" text-anchor="middle">{x:g}</text>' for x in ticks]
    for e in range(math.floor(y0), math.ceil(y1) + 1) if log_y else ():
        if y0 <= e <= y1:
            parts.append(f'<text x="{m - 5}" y="{py(10 ** e):.1f}" text-anchor="end">{10 ** e:g}</text>')
    for i, (name, (xs, ys)) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        pts = [(px(x), py(y)) for x, y in zip(xs, ys) if math.isfinite(y) and (y > 0 or not log_y)]
        if pts:
            line = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            parts.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{m + 10}" y="{m + 15 * i}" fill="{color}">{name}</text>')
    return "\n".join(parts)


def plot_decode_curves(path: str, curves: dict[str, dict[int, float]]) -> str:
    """Decode tok/s and step time (ms) against batch size, one series per model/engine."""
    tok = {name: (sorted(c), [c[b] for b in sorted(c)]) for name, c in curves.items()}
    step = {name: (sorted(c), [1e3 * b / c[b] for b in sorted(c)]) for name, c in curves.items()}
    return write_line_plots(path, [("decode tok/s", tok), ("decode step time (ms)", step)], "batch size",
                            log_x=True)
