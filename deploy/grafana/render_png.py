"""Draws the dashboard's main panels as one PNG from a Prometheus server's
answers to the dashboard's own queries, for a look at the dashboard without
a Grafana (the README's picture is drawn this way).

    python deploy/grafana/render_png.py --prometheus http://127.0.0.1:9090 \\
        --minutes 5 --out dashboard.png
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import httpx

DASHBOARD = Path(__file__).with_name("spillway-dashboard.json")

# The panels drawn, in order (titles in the dashboard JSON).
MAIN_PANELS = [
    "Requests by client and status class",
    "Traffic share per backend",
    "Backends throttled or open",
    "Failovers",
    "Gateway answers by reason",
    "Tokens per minute by client",
    "Request latency (Envoy)",
    "Backend latency p95 (Envoy)",
]


def concrete(expr: str, rate_interval: str = "1m") -> str:
    """A dashboard expression with Grafana's variables filled in."""
    return expr.replace("$__rate_interval", rate_interval).replace("$client", ".*")


def panels(dashboard: dict | None = None) -> list[dict]:
    return (dashboard or json.loads(DASHBOARD.read_text()))["panels"]


def legend(template: str, metric: dict) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), template) or str(metric)


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    r = httpx.get(f"{prometheus}/api/v1/query_range",
                  params={"query": expr, "start": start, "end": end, "step": step}, timeout=10)
    r.raise_for_status()
    return r.json()["data"]["result"]


def render(prometheus: str, start: float, end: float, out: Path, rate_interval: str = "1m") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [p for title in MAIN_PANELS for p in panels() if p["title"] == title]
    fig, axes = plt.subplots(len(chosen) // 2, 2, figsize=(14, 2.6 * len(chosen) // 2), constrained_layout=True)
    step = max(1.0, (end - start) / 200)
    for ax, panel in zip(axes.flat, chosen):
        for target in panel["targets"]:
            for series in query_range(prometheus, concrete(target["expr"], rate_interval), start, end, step):
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(xs, ys, label=legend(target.get("legendFormat", ""), series["metric"]), linewidth=1.2)
        ax.set_title(panel["title"], fontsize=10, loc="left")
        ax.tick_params(labelsize=7)
        ax.set_xlabel("seconds", fontsize=7)
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left", ncols=2)
    fig.suptitle("Spillway — dashboard panels from a scripted run (429s, failovers, streams, two clients)", fontsize=11)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090")
    ap.add_argument("--minutes", type=float, default=15)
    ap.add_argument("--rate-interval", default="1m")
    ap.add_argument("--out", type=Path, default=Path("spillway-dashboard.png"))
    args = ap.parse_args()
    end = time.time()
    render(args.prometheus, end - args.minutes * 60, end, args.out, args.rate_interval)
    print(args.out)


if __name__ == "__main__":
    main()
