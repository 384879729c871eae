#!/usr/bin/env python3
"""The end of scripts/soak.sh: the table, the least-squares slopes over the second half of the
run, and an SVG plot of RSS and open fds (standard library only: no matplotlib needed).

With --write 1 it writes docs/images/soak.svg, docs/images/soak.csv and the table between the
`<!-- soak:begin -->` and `<!-- soak:end -->` markers of docs/reliability.md. Exits 1 when a
subscriber lost a message silently, got one twice or out of order, gave up, or when a slope
is over its limit.
"""

import argparse
import glob
import json
import os
import re
import sys


def slope(points):
    """Least-squares slope of (x, y) points; 0 with fewer than two."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return sxy / sxx if sxx else 0.0


def svg(rows, half_min, end_min, rss_fit, fd_fit, title):
    """Two stacked panels (RSS in MB, open fds) against minutes, with the second-half fits."""
    w, h, left, right, top, gap, ph = 760, 430, 62, 20, 34, 46, 150
    t = [r[0] for r in rows]
    tmax = max(t[-1], 1e-9)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>']
    panels = [("RSS (MB)", [r[1] / 1024 for r in rows], "#1f77b4",
               (rss_fit[0] / 1024, rss_fit[1] / 1024)),
              ("open fds", [float(r[2]) for r in rows], "#d62728", fd_fit)]
    for i, (label, ys, color, (a, b)) in enumerate(panels):
        y0 = top + i * (ph + gap)
        lo, hi = 0.0, max(ys) * 1.15 or 1.0
        px = lambda x: left + (w - left - right) * x / tmax  # noqa: E731
        py = lambda y: y0 + ph - ph * (y - lo) / (hi - lo)  # noqa: E731
        out.append(f'<rect x="{left}" y="{y0}" width="{w - left - right}" height="{ph}" '
                   f'fill="none" stroke="#888"/>')
        for k in range(5):
            v = lo + (hi - lo) * k / 4
            out.append(f'<line x1="{left}" x2="{w - right}" y1="{py(v):.1f}" y2="{py(v):.1f}" '
                       f'stroke="#eee"/><text x="{left - 6}" y="{py(v) + 4:.1f}" '
                       f'text-anchor="end">{v:.0f}</text>')
        out.append(f'<text x="14" y="{y0 + ph / 2}" transform="rotate(-90 14 {y0 + ph / 2})" '
                   f'text-anchor="middle">{label}</text>')
        out.append(f'<line x1="{px(half_min):.1f}" x2="{px(half_min):.1f}" y1="{y0}" '
                   f'y2="{y0 + ph}" stroke="#999" stroke-dasharray="4 3"/>')
        out.append(f'<line x1="{px(end_min):.1f}" x2="{px(end_min):.1f}" y1="{y0}" '
                   f'y2="{y0 + ph}" stroke="#999" stroke-dasharray="1 3"/>')
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(t, ys))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        # The fit over the second half: y = a + b * t.
        out.append(f'<line x1="{px(half_min):.1f}" y1="{py(a + b * half_min):.1f}" '
                   f'x2="{px(end_min):.1f}" y2="{py(a + b * end_min):.1f}" stroke="black" '
                   f'stroke-width="1" stroke-dasharray="6 3"/>')
    yb = top + 2 * ph + gap
    for k in range(0, int(tmax) + 1, max(1, int(tmax) // 10 or 1)):
        x = left + (w - left - right) * k / tmax
        out.append(f'<text x="{x:.1f}" y="{yb + 16}" text-anchor="middle">{k}</text>')
    out.append(f'<text x="{w / 2}" y="{yb + 34}" text-anchor="middle">minutes (dashed: the second half of '
               f'the load and the least-squares fit over it; dotted: the load stops)</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def fit(points):
    b = slope(points)
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    return my - b * mx, b


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--minutes", type=int, required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--rounds-failed", type=int, required=True)
    p.add_argument("--connections-total", type=float, default=0)
    p.add_argument("--rss-limit", type=float, required=True)
    p.add_argument("--fd-limit", type=float, required=True)
    p.add_argument("--write", type=int, default=0)
    p.add_argument("--load-from", type=float, required=True, help="unix time the load started")
    p.add_argument("--load-until", type=float, required=True, help="unix time the load stopped")
    a = p.parse_args()
    w = a.dir

    raw = []
    for line in open(os.path.join(w, "samples.csv")).read().splitlines()[1:]:
        f = line.split(",")
        if len(f) >= 3 and f[1].isdigit() and f[2].isdigit():
            raw.append((int(f[0]), int(f[1]), int(f[2]), f[3] if len(f) > 3 else ""))
    if len(raw) < 4:
        print("soak: too few samples", file=sys.stderr)
        return 1
    t0 = raw[0][0]
    rows = [((u - t0) / 60, rss, fds, c) for u, rss, fds, c in raw]
    load_from, load_until = (a.load_from - t0) / 60, (a.load_until - t0) / 60
    half = (load_from + load_until) / 2
    second = [r for r in rows if half <= r[0] <= load_until]
    if len(second) < 2:
        print("soak: too few samples in the second half of the load", file=sys.stderr)
        return 1
    rss_fit = fit([(r[0], r[1]) for r in second])
    fd_fit = fit([(r[0], r[2]) for r in second])
    rss_slope, fd_slope = rss_fit[1], fd_fit[1]

    # Subscribers: the steady run, every churn round, the token/subscription churn.
    runs = []
    for path in [os.path.join(w, "steady.json")] + sorted(glob.glob(os.path.join(w, "round-*.json"))):
        try:
            runs.append(json.load(open(path)))
        except (OSError, ValueError):
            pass
    missing_runs = 1 + a.rounds - len(runs)
    keys = ("received", "lost_silently", "silent_epoch_changes", "missing_at_end",
            "duplicates", "reordered", "gap_notices", "reconnects", "fatal", "subscribers")
    v = {k: sum(r["total"][k] for r in runs) for k in keys}
    acked = sum(r["published_acked"] for r in runs)
    reused = sum(r["offset_reused"] for r in runs)
    try:
        churn = json.loads(open(os.path.join(w, "churn.json")).read() or "{}")
    except (OSError, ValueError):
        churn = {}
    c = lambda k: churn.get(k, 0)  # noqa: E731
    lost = (v["lost_silently"] + v["silent_epoch_changes"] + v["missing_at_end"] + reused
            + c("lost_silently") + c("silent_epoch_changes") + c("missing_at_end"))
    dups = v["duplicates"] + c("duplicates")
    reord = v["reordered"] + c("reordered")
    deliveries = v["received"] + c("received")
    sessions = v["subscribers"] + v["reconnects"] + c("ws_connections") + c("sse_connections")

    rss = [r[1] for r in rows]
    fds = [r[2] for r in rows]
    leak_rss = rss_slope > a.rss_limit
    leak_fd = fd_slope > a.fd_limit
    verdict = lambda bad: "**over the limit: leak**" if bad else "flat (under the limit)"  # noqa: E731
    lines = [
        f"Run of {a.minutes} minutes ({len(rows)} samples); the load stops at minute "
        f"{load_until:.1f}, and the slopes are fitted over minutes {half:.1f}–{load_until:.1f}.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| TCP connections accepted by the server (`tidings_http_connections_total`) | {a.connections_total:,.0f} |",
        f"| subscriber sessions opened (bench subscribers and their reconnects, churn /ws and SSE connections) | {sessions:,} |",
        f"| churn rounds (100 subscribers each, every transport) | {a.rounds} ({a.rounds_failed} failed) |",
        f"| /ws subscribes / unsubscribes | {c('subscribes'):,} / {c('unsubscribes'):,} |",
        f"| tokens minted / streams ended by `token_expired` | {c('tokens_minted'):,} / {c('token_expired'):,} |",
        f"| publishes acknowledged | {acked + c('published'):,} |",
        f"| deliveries checked | {deliveries:,} |",
        f"| **lost silently** | **{lost}** |",
        f"| duplicates / reordered | {dups} / {reord} |",
        f"| gap notices | {v['gap_notices'] + c('gap_notices')} |",
        f"| subscribers that gave up / client errors | {v['fatal']} / {c('errors')} |",
        f"| RSS start / end / peak (MB) | {rss[0] / 1024:.1f} / {rss[-1] / 1024:.1f} / {max(rss) / 1024:.1f} |",
        f"| open fds start / end / peak | {fds[0]} / {fds[-1]} / {max(fds)} |",
        f"| RSS slope, second half | {rss_slope:+.1f} KB/min (limit {a.rss_limit:.0f}): {verdict(leak_rss)} |",
        f"| fd slope, second half | {fd_slope:+.2f} fds/min (limit {a.fd_limit:g}): {verdict(leak_fd)} |",
    ]
    if churn.get("anomalies"):
        lines.append("")
        lines.append("Churn client anomalies (first few): `" + json.dumps(churn["anomalies"])[:800] + "`")
    if churn.get("first_errors"):
        lines.append("")
        lines.append("Churn client errors (first few): `" + json.dumps(churn["first_errors"])[:600] + "`")
    table = "\n".join(lines)
    print(table)

    if a.write:
        os.makedirs("docs/images", exist_ok=True)
        title = (f"tidings serve, {a.minutes}-minute soak: RSS {rss_slope:+.0f} KB/min, "
                 f"fds {fd_slope:+.2f}/min over the second half")
        with open("docs/images/soak.svg", "w") as f:
            f.write(svg(rows, half, load_until, rss_fit, fd_fit, title))
        with open("docs/images/soak.csv", "w") as f:
            f.write("minute,rss_kb,fds,open_connections\n")
            for r in rows:
                f.write(f"{r[0]:.2f},{r[1]},{r[2]},{r[3]}\n")
        doc_path = "docs/reliability.md"
        doc = open(doc_path).read()
        if "<!-- soak:begin -->" in doc:
            doc = re.sub(r"(<!-- soak:begin -->\n).*?(<!-- soak:end -->)",
                         lambda m: m.group(1) + table + "\n" + m.group(2), doc, flags=re.S)
            open(doc_path, "w").write(doc)
            print(f"(written to {doc_path}, docs/images/soak.svg, docs/images/soak.csv)")
        else:
            print("(docs/reliability.md has no soak markers: table not written; "
                  "docs/images/soak.svg and soak.csv written)")

    bad = lost + dups + reord + v["fatal"] + a.rounds_failed + missing_runs
    if bad:
        print(f"soak: {lost} lost silently, {dups} duplicates, {reord} reordered, "
              f"{v['fatal']} gave up, {a.rounds_failed + missing_runs} runs failed or without a result",
              file=sys.stderr)
    if leak_rss or leak_fd:
        print(f"soak: LEAK by the slope: RSS {rss_slope:+.1f} KB/min, fds {fd_slope:+.2f}/min",
              file=sys.stderr)
    return 1 if bad or leak_rss or leak_fd else 0


if __name__ == "__main__":
    sys.exit(main())
