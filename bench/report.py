"""Turn one result file of bench/run.py into docs/benchmarks.md's tables and plot.

    python bench/report.py [bench/results/latest.json]

Rewrites only what lies between ``<!-- results:start -->`` and
``<!-- results:end -->`` in docs/benchmarks.md, and docs/bench-gaps.png.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "bench-gaps.png"
START, END = "<!-- results:start -->", "<!-- results:end -->"
SERVERS = ("webchat", "flask_min", "fastapi_sse", "node_http")
LABELS = {"webchat": "webchat (full path)", "flask_min": "Flask minimal (gevent)",
          "fastapi_sse": "FastAPI + sse-starlette", "node_http": "Node http"}
FLOOR = "flask_min"

# Where a profile sample's time goes: the first rule matching from the leaf frame up.
CATEGORIES = (
    ("markdown render (markdown-it, nh3, pygments)",
     ("webchat/render.py", "markdown_it/", "mdit_py_plugins/", "nh3", "pygments/",
      "latex2mathml/")),
    ("SQLite store", ("webchat/store.py", "sqlite3/")),
    ("Jinja macros", ("jinja2/", ".html)")),
    ("SSE encoding", ("webchat/sse.py",)),
    ("socket writes", ("gevent/_socketcommon.py", "gevent/_socket3.py", "socket.py")),
    ("demo backend", ("webchat/backends/",)),
    ("runs and tails (runs.py)", ("webchat/runs.py",)),
    ("gevent hub, timers, events", ("gevent/",)),
    ("HTTP: gunicorn, werkzeug, flask", ("gunicorn/", "werkzeug/", "flask/")),
    ("webchat views", ("webchat/views.py",)),
)


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def q(result: dict[str, Any], key: str, stat: str) -> Any:
    return (result.get(key) or {}).get(stat)


def find(grid: list[dict[str, Any]], server: str, n: int, rate: float) -> dict[str, Any] | None:
    for r in grid:
        if r["server"] == server and r["config"]["streams"] == n and r["config"]["rate"] == rate:
            return r
    return None


def ratio(a: Any, b: Any) -> str:
    if a is None or b in (None, 0):
        return "–"
    return f"{a / b:.2f}x"


def others(r: dict[str, Any]) -> float | None:
    """Return the most CPU % other processes took on the server's or the client's core."""
    busy = r.get("core_busy_pct") or {}
    if "cpu0" not in busy or r.get("server_cpu_pct") is None:
        return None
    server_core = float(busy["cpu0"]) - float(r["server_cpu_pct"])
    client_core = float(busy.get("cpu1", 0.0)) - float(r.get("client_cpu_pct") or 0.0)
    return max(0.0, server_core, client_core)


def contended(r: dict[str, Any], limit: float = 20.0) -> bool:
    """Tell whether other processes took more than ``limit`` % of the server's core."""
    other = others(r)
    return other is not None and other > limit


def cpu_capacity(r: dict[str, Any], share: float = 0.8) -> int | None:
    """Return the streams ``share`` of a core would carry at this run's CPU per token."""
    cpu = r.get("server_cpu_s_per_1k_tokens")
    if not cpu:
        return None
    return int(share * 1000 / (cpu * r["config"]["rate"]))


# Profile ----------------------------------------------------------------------------

def read_profile(path: Path) -> tuple[int, Counter[str], Counter[str], Counter[str]]:
    """Return total samples, time per category, self and inclusive time per function."""
    total = 0
    categories: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")
                  if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
        for frame in reversed(frames):
            name = next((c for c, marks in CATEGORIES if any(m in frame for m in marks)), None)
            if name:
                categories[name] += n
                break
        else:
            categories["other"] += n
    return total, categories, own, inclusive


def profile_section(doc: dict[str, Any]) -> list[str]:
    prof = doc.get("profile")
    if not prof:
        return []
    lines = ["### Where webchat's worker spends its time", ""]
    run = prof["run"]
    lines.append(f"py-spy (100 Hz, `--nonblocking`) on the worker during a {run['streams']:,}"
                 f"-stream run at R={run['config']['rate']:g}, {prof.get('seconds', 8)} s "
                 "sampled; the profiler's own cost makes this run slower, so its numbers are "
                 f"not used above. Flame graph: `{prof['svg']}` (git-ignored).")
    lines.append("")
    for title, key in (("CPU (samples while running)", "raw"),
                       ("Wall clock (`--idle`: also waiting)", "wall")):
        path = ROOT / prof[key]
        if not path.exists():
            continue
        total, categories, own, inclusive = read_profile(path)
        if not total:
            continue
        lines += [f"**{title}**, {total:,} samples:", "", "| where | share |", "|---|---:|"]
        for name, n in categories.most_common():
            lines.append(f"| {name} | {100 * n / total:.1f}% |")
        lines.append("")
        if key == "raw":
            lines += ["Top functions by own time and by inclusive time:", "",
                      "| own | function | | inclusive | function |", "|---:|---|---|---:|---|"]
            mine = [(f, n) for f, n in inclusive.most_common(200)
                    if "webchat/" in f or "markdown_it/main" in f or "_partials" in f][:15]
            for (f1, n1), (f2, n2) in zip(own.most_common(15), mine, strict=False):
                lines.append(f"| {100 * n1 / total:.1f}% | `{f1}` | | "
                             f"{100 * n2 / total:.1f}% | `{f2}` |")
            lines.append("")
    return lines


# Plot ----------------------------------------------------------------------------------

def plot(doc: dict[str, Any]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [r for r in doc["grid"] if "error" not in r]
    rates = sorted({r["config"]["rate"] for r in grid})
    fig, axes = plt.subplots(2, len(rates), figsize=(5.5 * len(rates), 8), squeeze=False)
    for col, rate in enumerate(rates):
        for server in SERVERS:
            runs = sorted((r for r in grid if r["server"] == server
                           and r["config"]["rate"] == rate), key=lambda r: r["streams"])
            runs = [r for r in runs if q(r, "gap_ms", "p99") is not None]
            if not runs:
                continue
            xs = [r["streams"] for r in runs]
            axes[0][col].plot(xs, [q(r, "gap_ms", "p99") for r in runs], marker="o",
                              label=LABELS[server])
            cpu = [(r["streams"], r["server_cpu_s_per_1k_tokens"]) for r in runs
                   if r.get("server_cpu_s_per_1k_tokens")]
            if cpu:
                axes[1][col].plot(*zip(*cpu, strict=True), marker="o", label=LABELS[server])
        axes[0][col].axhline(1000 / rate, color="grey", linestyle=":", linewidth=1,
                             label=f"nominal gap ({1000 / rate:g} ms)")
        axes[0][col].set(xscale="log", yscale="log", xlabel="concurrent streams",
                         ylabel="inter-event gap p99 (ms)", title=f"R = {rate:g} tokens/s")
        axes[1][col].set(xscale="log", yscale="log", xlabel="concurrent streams",
                         ylabel="server CPU s per 1,000 tokens delivered")
        for ax in (axes[0][col], axes[1][col]):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    env = doc["environment"]
    fig.suptitle(f"One worker/process each, pinned to one core; {env['cpu_model']}, "
                 f"{env['date']}", fontsize=9)
    fig.tight_layout()
    PLOT.parent.mkdir(exist_ok=True)
    fig.savefig(PLOT, dpi=110)


# Tables ---------------------------------------------------------------------------------

def grid_tables(doc: dict[str, Any]) -> list[str]:
    grid = doc["grid"]
    lines = []
    for rate in sorted({r["config"]["rate"] for r in grid}):
        lines += [f"#### R = {rate:g} tokens/s per stream", "",
                  "| server | N | completed | first event p50 / p99 ms | gap p50 / p99 / max ms "
                  "| lag p50 / p99 ms | lag from request p99 ms | CPU s / 1k tokens (x floor) "
                  "| server CPU | RSS / open stream | client CPU | others' load |",
                  "|---|---:|---:|---|---|---|---:|---|---:|---:|---:|---:|"]
        for n in sorted({r["config"]["streams"] for r in grid if r["config"]["rate"] == rate}):
            floor = find(grid, FLOOR, n, rate)
            for server in SERVERS:
                r = find(grid, server, n, rate)
                if r is None:
                    continue
                if "error" in r:
                    lines.append(f"| {server} | {n:,} | error: {r['error']} |||||||||")
                    continue
                cpu = r.get("server_cpu_s_per_1k_tokens")
                floor_cpu = floor.get("server_cpu_s_per_1k_tokens") if floor else None
                lines.append(
                    f"| {server} | {n:,} | {r['completed']:,} / {r['streams']:,} "
                    f"| {fmt(q(r, 'first_event_ms', 'p50'))} / "
                    f"{fmt(q(r, 'first_event_ms', 'p99'))} "
                    f"| {fmt(q(r, 'gap_ms', 'p50'))} / {fmt(q(r, 'gap_ms', 'p99'))} / "
                    f"{fmt(q(r, 'gap_ms', 'max'))} "
                    f"| {fmt(q(r, 'lag_ms', 'p50'))} / {fmt(q(r, 'lag_ms', 'p99'))} "
                    f"| {fmt(q(r, 'lag_from_request_ms', 'p99'))} "
                    f"| {fmt(cpu, 3)} ({ratio(cpu, floor_cpu)}) "
                    f"| {fmt(r.get('server_cpu_pct'))}% "
                    f"| {fmt(r.get('rss_per_open_stream_kb'))} KB "
                    f"| {fmt(r.get('client_cpu_pct'))}% | {fmt(others(r))}%"
                    f"{' †' if contended(r) else ''} |")
        lines.append("")
    return lines


def detail_table(doc: dict[str, Any]) -> list[str]:
    lines = ["| server | N | R | streams established / failed | events | MB | bytes / event "
             "| tokens / reply | time to headers p99 ms | statuses | errors | wall s |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in doc["grid"]:
        if "error" in r:
            continue
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "–"
        statuses = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())
        lines.append(f"| {r['server']} | {r['streams']:,} | {r['config']['rate']:g} "
                     f"| {r['established']:,} / {r['failed']:,} | {r['events']:,} "
                     f"| {r['body_bytes'] / 2**20:.1f} | {fmt(r['bytes_per_event'])} "
                     f"| {r['tokens_per_reply']} | {fmt(q(r, 'time_to_headers_ms', 'p99'))} "
                     f"| {statuses} | {errors} | {fmt(r['wall_s'])} |")
    return lines + [""]


def capacity_of(doc: dict[str, Any], server: str) -> dict[str, Any] | None:
    return next((c for c in doc.get("capacity", []) if c["server"] == server), None)


def capacity_table(doc: dict[str, Any]) -> list[str]:
    caps = doc.get("capacity") or []
    if not caps:
        return []
    crit = doc["criteria"]
    lines = [f"Sustainable streams at R = 20: the largest N tried where every stream completed, "
             f"lag p99 <= {crit['lag_p99_ms']:g} ms and first event p99 <= "
             f"{crit['first_event_p99_ms']:g} ms (grid points plus a bisection between the "
             "last pass and the first fail).", "",
             "The last column is a CPU-only estimate that other load on the machine does not "
             "move: the streams 80% of a core would carry at the CPU per token measured at "
             "N = 1,000 (it ignores time the worker spends blocked, e.g. on SQLite).", "",
             "| server | sustainable streams | first failing N | Ns tried (pass/fail) "
             "| CPU-only estimate |",
             "|---|---:|---:|---|---:|"]
    for c in caps:
        tried = ", ".join(f"{int(n):,} {'pass' if ok else 'fail'}" for n, ok in
                          sorted(c["tried"].items(), key=lambda item: int(item[0])))
        cap = f"{c['sustainable_streams']:,}" + (" (all tried passed)" if c["capped_by_grid"]
                                                  else "")
        first = f"{c['first_failing']:,}" if c["first_failing"] else "–"
        at = find(doc["grid"], c["server"], 1000, 20.0)
        estimate = cpu_capacity(at) if at and "error" not in at else None
        lines.append(f"| {c['server']} | {cap} | {first} | {tried} | {fmt(estimate)} |")
    lines.append("")
    for c in caps:
        for r in c["runs"]:
            if "error" in r:
                lines.append(f"- search run {r['server']} N={r['streams']:,}: {r['error']}")
                continue
            lines.append(f"- search run {r['server']} N={r['streams']:,}: completed "
                         f"{r.get('completed')}/{r['streams']}, first event p99 "
                         f"{fmt(q(r, 'first_event_ms', 'p99'))} ms, lag p99 "
                         f"{fmt(q(r, 'lag_ms', 'p99'))} ms, server CPU "
                         f"{fmt(r.get('server_cpu_pct'))}%, others' load "
                         f"{fmt(others(r))}%{' †' if contended(r) else ''}")
    return lines + [""]


def goals(doc: dict[str, Any]) -> list[str]:
    grid = doc["grid"]
    rows = []

    def verdict(ok: bool | None) -> str:
        return "–" if ok is None else ("met" if ok else "**not met**")

    web, floor, fast_api = (capacity_of(doc, s) for s in ("webchat", FLOOR, "fastapi_sse"))
    if web:
        n = web["sustainable_streams"]
        rows.append(("Capacity: >= 2,000 replies x 20 tokens/s, 100% complete, lag p99 <= 50 ms, "
                     "first event p99 <= 300 ms", f"{n:,} streams", verdict(n >= 2000)))
        if floor:
            fn = floor["sustainable_streams"]
            note = " (floor capped by the grid)" if floor["capped_by_grid"] else ""
            rows.append((">= 0.8x the minimal gevent route's sustainable streams",
                         f"{n:,} vs {fn:,}{note} = {ratio(n, fn)}",
                         verdict(fn > 0 and n >= 0.8 * fn)))
        if fast_api:
            an = fast_api["sustainable_streams"]
            rows.append((">= 1.5x sse-starlette's sustainable streams",
                         f"{n:,} vs {an:,} = {ratio(n, an)}", verdict(an > 0 and n >= 1.5 * an)))
    w, f = find(grid, "webchat", 1000, 20.0), find(grid, FLOOR, 1000, 20.0)
    if w and f and "error" not in w and "error" not in f:
        wc, fc = w.get("server_cpu_s_per_1k_tokens"), f.get("server_cpu_s_per_1k_tokens")
        rows.append(("Efficiency: CPU per delivered token <= 1.5x the minimal route at 1,000 x 20",
                     f"{fmt(wc, 3)} vs {fmt(fc, 3)} s / 1k tokens = {ratio(wc, fc)}"
                     + (" (webchat is far past capacity here, sending several tokens per "
                        "event; at 100 x 20 the ratio is "
                        + ratio((find(grid, "webchat", 100, 20.0) or {}).get(
                            "server_cpu_s_per_1k_tokens"),
                            (find(grid, FLOOR, 100, 20.0) or {}).get(
                            "server_cpu_s_per_1k_tokens")) + ")"
                        if w["completed"] < w["streams"] or (q(w, "lag_ms", "p50") or 0) > 1000
                        else coalesced_note(w)),
                     verdict(wc is not None and fc is not None and wc <= 1.5 * fc)))
    fast = next((r for r in doc.get("fast", []) if r["server"] == "webchat"), None)
    if fast and "error" not in fast:
        pct, lag = fast.get("server_cpu_pct"), q(fast, "lag_ms", "p99")
        floor_fast = next((r for r in doc.get("fast", []) if r["server"] == FLOOR
                           and "error" not in r), None)
        note = (f" (the minimal route, same load, 40 ms coalescing: "
                f"{fmt(floor_fast.get('server_cpu_pct'))}% of a core, lag p99 "
                f"{fmt(q(floor_fast, 'lag_ms', 'p99'))} ms)") if floor_fast else ""
        render = doc.get("fast_render_floor")
        if render:
            note += (f"; rendering these replies' Markdown alone takes "
                     f"{fmt(render['core_pct_at_load'])}% of a core "
                     f"({fmt(render['cpu_us_per_token'])} µs a token, measured apart), so "
                     "with server-side rendering the goal cannot be met at this pace")
        rows.append(("Fast models: 100 replies x 1,000 tokens/s at <= 15% of a core, lag p99 "
                     "<= 60 ms", f"{fmt(pct)}% of a core, lag p99 {fmt(lag)} ms{note}",
                     verdict(pct is not None and lag is not None and pct <= 15 and lag <= 60)))
    mem = [r for r in grid if r["server"] == "webchat" and "error" not in r
           and r.get("rss_per_open_stream_kb") is not None
           and r.get("open_at_rss_sample", 0) >= 100]
    if mem:
        best = max(mem, key=lambda r: r["open_at_rss_sample"])
        kb = best["rss_per_open_stream_kb"]
        rows.append(("Memory: <= 40 KB per streaming reply",
                     f"{fmt(kb)} KB (N={best['streams']:,}, R={best['config']['rate']:g}, "
                     f"{best['open_at_rss_sample']:,} open at the sample)", verdict(kb <= 40)))
    over = ([doc["overload"]] if doc.get("overload") and "error" not in doc["overload"]
            else [r for r in grid if r["server"] == "webchat" and "error" not in r])
    if over:
        worst = max(over, key=lambda r: (r["streams"], r["config"]["rate"]))
        refused = worst["statuses"].get("503", 0)
        rows.append(("Overload: a stream past capacity is turned away quickly (503 + Retry-After)",
                     f"N={worst['streams']:,} R={worst['config']['rate']:g}: statuses "
                     f"{worst['statuses']}, {worst['refused_with_retry_after']} with Retry-After;"
                     f" headers p99 {fmt(q(worst, 'time_to_headers_ms', 'p99'))} ms, first event "
                     f"p99 {fmt(q(worst, 'first_event_ms', 'p99'))} ms, "
                     f"{worst['completed']:,}/{worst['streams']:,} completed",
                     verdict(refused > 0)))
    lines = ["| goal | measured | verdict |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return lines + [""]


def added_latency(doc: dict[str, Any]) -> list[str]:
    lines = ["| R | N | webchat lag p50 / p99 ms | minimal route lag p50 / p99 ms "
             "| added by webchat p50 / p99 ms |", "|---:|---:|---|---|---|"]
    for rate in sorted({r["config"]["rate"] for r in doc["grid"]}):
        for n in sorted({r["config"]["streams"] for r in doc["grid"]}):
            w, f = find(doc["grid"], "webchat", n, rate), find(doc["grid"], FLOOR, n, rate)
            if not w or not f or "error" in w or "error" in f:
                continue
            w50, w99, f50, f99 = (q(w, "lag_ms", "p50"), q(w, "lag_ms", "p99"),
                                  q(f, "lag_ms", "p50"), q(f, "lag_ms", "p99"))
            if None in (w50, w99, f50, f99):
                continue
            lines.append(f"| {rate:g} | {n:,} | {fmt(w50)} / {fmt(w99)} | {fmt(f50)} / {fmt(f99)} "
                         f"| {fmt(w50 - f50)} / {fmt(w99 - f99)} |")
    return lines + [""]


def fast_table(doc: dict[str, Any]) -> list[str]:
    runs = [r for r in doc.get("fast", []) if "error" not in r]
    if not runs:
        return []
    lines = ["| server | replies (users x each) | events / reply | first event p99 ms "
             "| lag p50 / p99 ms | server CPU (% of a core) | CPU s / 1k tokens |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for r in runs:
        c = r["config"]
        lines.append(f"| {r['server']}{' (coalesce 40 ms)' if c['coalesce_ms'] else ''} "
                     f"| {r['streams']:,} ({c['streams']} x {c['repeat']}) "
                     f"| {r['events'] / max(1, r['established']):.1f} "
                     f"| {fmt(q(r, 'first_event_ms', 'p99'))} "
                     f"| {fmt(q(r, 'lag_ms', 'p50'))} / {fmt(q(r, 'lag_ms', 'p99'))} "
                     f"| {fmt(r.get('server_cpu_pct'))}% "
                     f"| {fmt(r.get('server_cpu_s_per_1k_tokens'), 3)} |")
    return lines + [""]


def setup_table(doc: dict[str, Any]) -> list[str]:
    runs = [r for r in doc["grid"] if r["server"] == "webchat" and r.get("setup")]
    if not runs:
        return []
    lines = ["| N | R | GET / p50 / p99 ms | POST /chat p50 / p99 ms | server CPU per tab "
             "(page + POST) ms | failures |", "|---:|---:|---|---|---:|---|"]
    for r in runs:
        s = r["setup"]
        lines.append(f"| {r['config']['streams']:,} | {r['config']['rate']:g} "
                     f"| {fmt(q(s, 'page_ms', 'p50'))} / {fmt(q(s, 'page_ms', 'p99'))} "
                     f"| {fmt(q(s, 'post_ms', 'p50'))} / {fmt(q(s, 'post_ms', 'p99'))} "
                     f"| {fmt(s['server_cpu_ms_per_reply'])} | {s['failures'] or '–'} |")
    return lines + [""]


def idle_section(doc: dict[str, Any]) -> list[str]:
    idle = doc.get("idle")
    if not idle:
        return []
    if "error" in idle:
        return [f"Not measured: {idle['error']}", ""]
    b1, b2 = idle["batches"]
    return [f"Two batches of {idle['tabs']:,} tabs each loaded `/` (no reply streaming) and "
            f"kept their keep-alive connections open; `sse-connect` in the "
            f"{2 * idle['tabs']:,} pages: {idle['sse_connect_in_pages']}. Established "
            "connections on the server's port (`ss -tn`) right after each batch: "
            f"{b1['server_connections_after_load']:,} and {b2['server_connections_after_load']:,}"
            f" (the keep-alive connections); {idle['waited_s']:g} s later (past gunicorn's 5 s "
            f"keep-alive): {b1['server_connections_after_keepalive']:,} and "
            f"{b2['server_connections_after_keepalive']:,}. So an idle tab holds no connection.",
            "",
            f"Worker RSS: {b1['rss_before_mb']} MB -> {b1['rss_after_mb']} MB after the first "
            f"batch ({fmt(b1['rss_per_tab_kb'])} KB per tab: mostly the heap's first growth), "
            f"-> {b2['rss_after_mb']} MB after the second ({fmt(b2['rss_per_tab_kb'])} KB per "
            "tab: what an idle tab costs the worker once the heap is warm).", ""]


def render(doc: dict[str, Any], source: Path) -> str:
    env = doc["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    what = "Latest part run" if doc.get("resumed_from") else "Run"
    lines = [START, "",
             f"{what} {env['date']} ({doc.get('total_seconds', 0) / 60:.0f} minutes in all), "
             f"`{source.relative_to(ROOT) if source.is_relative_to(ROOT) else source}`: "
             f"{env['nproc']} cores, {env['cpu_model']}, {env['memory_gb']} GB, Linux "
             f"{env['kernel']}, Python {env['python']}; webchat at commit "
             f"`{(env.get('webchat_commit') or '?')[:12]}` (plus whatever was uncommitted). "
             f"Servers pinned to core 0, load generator to core 1: {doc['pinned']}. "
             f"Versions: {versions}.", ""]
    if doc.get("resumed_from"):
        chain, link = [doc], doc.get("resumed_from")
        while link:
            chain.append(link)
            link = link.get("resumed_from")
        parts = []
        for run in reversed(chain):
            env_ = run["environment"]
            stages = ", ".join(run.get("stages") or []) or "?"
            parts.append(f"{env_['date']} at commit `{(env_.get('webchat_commit') or '?')[:12]}`:"
                         f" {stages}")
        lines += ["This page combines runs of the same harness on the same machine, each "
                  "stage redone with `--resume` where other load had spoiled it (webchat's "
                  "code moved between them; the minutes above add them up): "
                  + "; ".join(parts) + ".", ""]
    lines += [
             "*Others' load* is the most CPU other processes (other people's tests on this "
             "shared machine) took of the server's core or the client's core during a run. "
             "† marks runs where it passed 20%: their latencies and capacity are pessimistic; "
             "CPU per token and memory are much less affected. A run so disturbed (over 25%) "
             "was measured a second time and the less disturbed try kept.", "",
             "### Goals", ""]
    lines += goals(doc)
    lines += ["### Sustainable streams", ""]
    lines += capacity_table(doc)
    lines += ["![p99 inter-event gap and CPU per 1,000 tokens against concurrent streams]"
              "(bench-gaps.png)", "", "### The grid", ""]
    lines += grid_tables(doc)
    lines += ["<details><summary>Streams, events, bytes, statuses and errors of every grid run"
              "</summary>", ""]
    lines += detail_table(doc)
    lines += ["</details>", "", "### Time added by webchat (estimate)", "",
              "Webchat's lag minus the minimal Flask route's lag at the same N and R, both "
              "measured in this run (the minimal route has the same server, worker and "
              "pacing, so the difference is what webchat's store, rendering and tails add "
              "between the backend yielding a token and the client receiving it).", ""]
    lines += added_latency(doc)
    lines += ["### Fast models", ""]
    render = doc.get("fast_render_floor")
    if render:
        lines += [f"100 replies at once at 1,000 tokens/s, each {render['tokens_per_reply']:,} "
                  "tokens long (webchat: the demo's reply to `/long N`, its Markdown reply N "
                  "times over; the minimal route: as many tokens), so that streaming is "
                  "measured rather than starting replies. Rendering alone, measured apart "
                  + ("(after the run, on the same machine) " if render.get(
                      "measured_after_the_run") else "")
                  + f"on the server's core ({render['tokens_per_update']} tokens per update, "
                  f"as a 40 ms window brings them, then the last block): "
                  f"{fmt(render['cpu_ms_per_reply'])} ms of CPU per reply, "
                  f"{fmt(render['cpu_us_per_token'])} µs a token, "
                  f"**{fmt(render['core_pct_at_load'])}% of a core at this load**; rendering "
                  f"each whole reply once, the least any renderer could do, "
                  f"{fmt(render.get('once_ms_per_reply'))} ms a reply, "
                  f"{fmt(render.get('once_core_pct_at_load'))}% of a core.", ""]
    lines += fast_table(doc)
    lines += ["### webchat's setup cost (before the streaming clock)", ""]
    lines += setup_table(doc)
    lines += ["### Idle tabs", ""]
    lines += idle_section(doc)
    lines += profile_section(doc)
    lines += [END]
    return "\n".join(lines) + "\n"


def coalesced_note(run: dict[str, Any]) -> str:
    """Say so when a run sent far fewer events than tokens: behind, it coalesced them.

    A server that falls behind sends several tokens per event and so spends less per
    token: its CPU per token then looks better than it is at a pace it can keep.
    """
    events, tokens = run.get("events") or 0, run.get("tokens_delivered") or 0
    if not tokens or events >= 0.9 * tokens:
        return ""
    return (f" (webchat sent {events:,} events for {tokens:,} tokens: behind, it "
            "coalesced them, which flatters its cost per token)")


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench/results/latest.json"
    if source.name == "latest.json" and (ROOT / "bench/results").exists():
        # Name the stamped file, which later runs do not overwrite.
        same = [p for p in sorted((ROOT / "bench/results").glob("2*.json"))
                if p.read_bytes() == source.read_bytes()]
        source = same[-1] if same else source
    doc = json.loads(source.read_text(encoding="utf-8"))
    plot(doc)
    section = render(doc, source.resolve())
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    tail = tail.lstrip("\n")
    DOC.write_text(head + section + ("\n" + tail if tail else ""), encoding="utf-8")
    print(f"wrote {DOC.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
