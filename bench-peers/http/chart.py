#!/usr/bin/env python3
"""Draws bench-peers/http/run.sh's numbers as an SVG bar chart (standard library only).

    python3 bench-peers/http/chart.py results.tsv chart.svg

results.tsv: a header line `metric<TAB>proxy1<TAB>proxy2…`, then one line per metric with a
number per proxy (empty when not measured). One panel per metric, one bar per proxy.
"""

import sys
from xml.sax.saxutils import escape

COLORS = ["#d9534f", "#5b8def", "#5cb85c", "#f0ad4e", "#8e6cc0"]


def main():
    src, dst = sys.argv[1], sys.argv[2]
    with open(src) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    proxies, metrics = rows[0][1:], rows[1:]
    panel_w, panel_h, bar_h, gap = 560, 40 + 22 * len(proxies), 16, 22
    width, height = panel_w + 20, 50 + len(metrics) * (panel_h + 10)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           '<text x="10" y="24" font-size="15" font-weight="bold">'
           'Caching reverse proxies side by side (bench-peers/http/run.sh, one run)</text>']
    y0 = 44
    for metric in metrics:
        name, values = metric[0], metric[1:]
        nums = [float(v) if v else 0.0 for v in values]
        top = max(nums) or 1.0
        out.append(f'<text x="10" y="{y0 + 14}" font-weight="bold">{escape(name)}</text>')
        for i, (proxy, v) in enumerate(zip(proxies, nums)):
            y = y0 + 24 + i * gap
            w = 280 * v / top
            out.append(f'<text x="10" y="{y + 12}">{escape(proxy)}</text>')
            out.append(f'<rect x="120" y="{y}" width="{w:.1f}" height="{bar_h}" '
                       f'fill="{COLORS[i % len(COLORS)]}"/>')
            label = values[i] if i < len(values) and values[i] else "–"
            out.append(f'<text x="{120 + w + 6:.1f}" y="{y + 12}">{escape(label)}</text>')
        y0 += panel_h + 10
    out.append("</svg>")
    with open(dst, "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
