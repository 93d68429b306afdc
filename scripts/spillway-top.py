#!/usr/bin/env python3
"""A live text view of a Spillway gateway, refreshed from Envoy's admin
endpoint: each backend's state and traffic, each client's requests, failovers
and tokens per second. Standard library only.

    python3 scripts/spillway-top.py                      # admin at 127.0.0.1:9901
    python3 scripts/spillway-top.py --admin http://127.0.0.1:9901 --interval 2
    python3 scripts/spillway-top.py --once               # one view, then exit
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request
from collections import defaultdict

PREFIX = "wasmcustom."


def read_stats(admin: str) -> dict[str, float]:
    """Spillway's metrics as `name -> value`, from `/stats`."""
    with urllib.request.urlopen(f"{admin}/stats?filter=^wasmcustom%5C.", timeout=5) as r:
        text = r.read().decode()
    stats = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name.startswith(PREFIX) and value.strip().lstrip("-").isdigit():
            stats[name[len(PREFIX):]] = float(value)
    return stats


def parse(name: str) -> tuple[str, dict[str, str]]:
    """`metric.key.value...` -> (metric, labels)."""
    metric, *rest = name.split(".")
    return metric, dict(zip(rest[0::2], rest[1::2]))


def series(stats: dict[str, float], metric: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for name, value in stats.items():
        m, labels = parse(name)
        if m == metric:
            out.append((labels, value))
    return out


def total(stats: dict[str, float], metric: str, **want: str) -> float:
    return sum(v for labels, v in series(stats, metric) if all(labels.get(k) == w for k, w in want.items()))


def view(before: dict[str, float], now: dict[str, float], seconds: float) -> str:
    def rate(metric: str, **want: str) -> float:
        return max(0.0, total(now, metric, **want) - total(before, metric, **want)) / seconds

    lines = []
    requests, failovers = rate("spillway_requests_total"), rate("spillway_failovers_total")
    lines.append(f"Spillway  {time.strftime('%H:%M:%S')}   requests/s {requests:7.1f}   failovers/s {failovers:6.1f}"
                 f"   tokens/s {rate('spillway_tokens_total'):9.1f}")
    memory = {labels.get("role", "?"): v for labels, v in series(now, "spillway_vm_memory_bytes")}
    keys = total(now, "spillway_shared_data_keys")
    lines.append("VM memory  " + "  ".join(f"{role} {v / 2**20:.1f} MiB" for role, v in sorted(memory.items()))
                 + f"   shared-data keys {keys:.0f}")
    lines.append("")
    backends = sorted({labels["backend"] for labels, _ in series(now, "spillway_backend_throttled") if "backend" in labels}
                      | {labels["backend"] for labels, _ in series(now, "spillway_upstream_requests_total")
                         if "backend" in labels})
    lines.append(f"{'BACKEND':<16}{'STATE':<12}{'ATTEMPTS/s':>11}{'2xx':>8}{'429':>8}{'5xx':>8}{'reset':>8}"
                 f"{'FAILOVERS':>11}{'TOKENS/s':>10}")
    for b in backends:
        if total(now, "spillway_backend_circuit_open", backend=b):
            state = "OPEN"
        elif total(now, "spillway_backend_throttled", backend=b):
            state = "THROTTLED"
        else:
            state = "ok"
        attempts = rate("spillway_upstream_requests_total", backend=b)
        ok = total(now, "spillway_upstream_requests_total", backend=b, **{"class": "2xx"})
        throttled = total(now, "spillway_throttle_events_total", backend=b)
        failed = total(now, "spillway_upstream_requests_total", backend=b, **{"class": "5xx"})
        reset = total(now, "spillway_upstream_requests_total", backend=b, **{"class": "reset"})
        lines.append(f"{b:<16}{state:<12}{attempts:>11.1f}{ok:>8.0f}{throttled:>8.0f}{failed:>8.0f}{reset:>8.0f}"
                     f"{total(now, 'spillway_failovers_total', backend=b):>11.0f}"
                     f"{rate('spillway_tokens_total', backend=b):>10.1f}")
    lines.append("")
    clients = sorted({labels.get("client", "") for labels, _ in series(now, "spillway_requests_total")})
    lines.append(f"{'CLIENT':<16}{'REQUESTS/s':>11}{'2xx':>8}{'4xx':>8}{'5xx':>8}{'LIMITED':>9}{'TOKENS/s':>10}")
    for c in clients:
        by_class = defaultdict(float)
        for labels, v in series(now, "spillway_requests_total"):
            if labels.get("client") == c:
                by_class[labels.get("class", "")] += v
        limited = sum(total(now, "spillway_local_replies_total", client=c, reason=r)
                      for r in ("client_requests", "client_tokens"))
        lines.append(f"{c or '(open)':<16}{rate('spillway_requests_total', client=c):>11.1f}{by_class['2xx']:>8.0f}"
                     f"{by_class['4xx']:>8.0f}{by_class['5xx']:>8.0f}{limited:>9.0f}"
                     f"{rate('spillway_tokens_total', client=c):>10.1f}")
    by_reason: dict[str, float] = defaultdict(float)
    for labels, v in series(now, "spillway_local_replies_total"):
        by_reason[labels.get("reason", "")] += v
    if by_reason:
        lines.append("")
        lines.append("gateway answers: " + "  ".join(f"{r} {v:.0f}" for r, v in sorted(by_reason.items())))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--admin", default="http://127.0.0.1:9901", help="Envoy's admin address")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    ap.add_argument("--once", action="store_true", help="print one view (rates over one interval) and exit")
    args = ap.parse_args()
    try:
        before = read_stats(args.admin)
        while True:
            time.sleep(args.interval)
            now = read_stats(args.admin)
            text = view(before, now, args.interval)
            if args.once:
                print(text)
                return 0
            sys.stdout.write("\x1b[H\x1b[2J" + text + "\n\n(Ctrl-C to quit)\n")
            sys.stdout.flush()
            before = now
    except KeyboardInterrupt:
        return 0
    except OSError as e:
        print(f"spillway-top: cannot read {args.admin}/stats: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
