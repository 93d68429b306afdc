"""Open-loop load generator for the goodput runs (asyncio + httpx).

Request i is sent at t0 + i / rate whether or not earlier requests have
answered (open loop: a slow proxy does not slow the offered load down), the
run is bounded by `count = rate * duration` requests and by a per-request
timeout, and every request is recorded with its own timing and the headers
the goodput analysis needs. Request i sends `bodies[i % len(bodies)]` (by
default the one BODY), or `overrides[i]` when given (one odd request in a
run, e.g. an oversized one).

Usable as a library (`run(...)`) or from the command line:
    python loadgen.py URL --rate 15 --duration 20 --header 'api-key: x' --out reqs.csv \
        [--bodies bodies.json]   # a JSON list of request bodies, sent in turn
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import time
from dataclasses import asdict, dataclass, fields

import httpx

BODY = {"messages": [{"role": "user", "content": "Say hello in one short sentence."}], "max_tokens": 16}


@dataclass
class Result:
    index: int
    scheduled_s: float  # offset from t0 the request was due
    sent_s: float  # offset from t0 it was actually sent
    done_s: float  # offset from t0 the response (or error) arrived
    done_epoch_ms: float  # wall clock when the response arrived (compared with the mocks' clocks)
    latency_ms: float  # done - scheduled (includes any lateness of the sender itself)
    status: int  # HTTP status, 0 = transport error / timeout
    retry_after: str
    retry_after_ms: str
    backend: str  # x-spillway-backend / x-mock-backend / llm_provider-x-mock-backend
    attempts: str  # x-spillway-attempts / x-litellm-attempted-retries
    error: str


async def _one(client: httpx.AsyncClient, url: str, headers: dict, body: dict, i: int, due: float,
               t0: float, timeout: float) -> Result:
    now = time.monotonic()
    if due > now:
        await asyncio.sleep(due - now)
    sent = time.monotonic()
    status, h, err = 0, httpx.Headers(), ""
    try:
        r = await client.post(url, json=body, headers=headers, timeout=timeout)
        await r.aread()
        status, h = r.status_code, r.headers
    except Exception as e:  # noqa: BLE001 - every failure is a data point
        err = type(e).__name__
    done = time.monotonic()
    return Result(
        index=i,
        scheduled_s=round(due - t0, 6),
        sent_s=round(sent - t0, 6),
        done_s=round(done - t0, 6),
        done_epoch_ms=round(time.time() * 1000, 3),
        latency_ms=round((done - due) * 1000, 3),
        status=status,
        retry_after=h.get("retry-after", ""),
        retry_after_ms=h.get("retry-after-ms", ""),
        backend=h.get("x-spillway-backend") or h.get("x-mock-backend") or h.get("llm_provider-x-mock-backend", ""),
        attempts=h.get("x-spillway-attempts") or h.get("x-litellm-attempted-retries", ""),
        error=err,
    )


async def _run(url: str, rate: float, count: int, headers: dict, timeout: float, bodies: list[dict],
               overrides: dict[int, dict]) -> list[Result]:
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        t0 = time.monotonic() + 0.2
        tasks = [
            asyncio.create_task(_one(client, url, headers, body_of(i, bodies, overrides), i, t0 + i / rate, t0,
                                     timeout))
            for i in range(count)
        ]
        return list(await asyncio.gather(*tasks))


def body_of(i: int, bodies: list[dict] | None, overrides: dict[int, dict] | None = None) -> dict:
    """The body request i sends."""
    if overrides and i in overrides:
        return overrides[i]
    return bodies[i % len(bodies)] if bodies else BODY


def count_of(rate: float, duration_s: float) -> int:
    """How many requests `run` sends (to pick an index for `overrides`)."""
    return max(1, int(round(rate * duration_s)))


def run(url: str, rate: float, duration_s: float, headers: dict | None = None, timeout: float = 30.0,
        bodies: list[dict] | None = None, overrides: dict[int, dict] | None = None) -> list[Result]:
    """Sends rate * duration_s requests at a fixed rate; returns one Result each."""
    return asyncio.run(_run(url, rate, count_of(rate, duration_s), headers or {}, timeout, bodies or [BODY],
                            overrides or {}))


def write_csv(results: list[Result], path, extra: dict | None = None) -> None:
    extra = extra or {}
    names = list(extra) + [f.name for f in fields(Result)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        for r in results:
            w.writerow({**extra, **asdict(r)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--header", action="append", default=[])
    ap.add_argument("--out")
    ap.add_argument("--bodies", help="JSON file: a list of request bodies, request i sends body i mod len")
    a = ap.parse_args()
    headers = dict(h.split(":", 1) for h in a.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    bodies = json.loads(open(a.bodies).read()) if a.bodies else None
    res = run(a.url, a.rate, a.duration, headers, a.timeout, bodies=bodies)
    if a.out:
        write_csv(res, a.out)
    by_status: dict[int, int] = {}
    for r in res:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    print(json.dumps({"requests": len(res), "by_status": by_status}))


if __name__ == "__main__":
    main()
