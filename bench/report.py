"""bench/results.md from the raw results of bench/run.py: the machine, one table of every scenario
(direct, KiteMesh, LiteLLM and the ratios), the targets with pass/fail, errors seen, and how it was measured."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

NA = "n/a"
MISSING = "—"
RSS_TARGET_MB = 300
ADDED_LATENCY_TARGET_MS = 3.0
THROUGHPUT_TARGET_RATIO = 5.0


@dataclass(frozen=True)
class Row:
    """One line of the table: where its number lives in each target's results, and how to show it."""

    label: str
    path: tuple[str, ...]
    kind: str  # latency (ms, lower is better), rate (higher is better), count, mb, seconds, percent, cpu_ms, ratio
    unit: str = ""
    kitemesh: str = "kitemesh"  # the results that fill the KiteMesh column
    kitemesh_only: bool = False


def _nonstream_rows() -> list[Row]:
    rows = [
        Row("Non-stream c=1: p50 latency", ("nonstream_c1", "p50_ms"), "latency"),
        Row("Non-stream c=1: p99 latency", ("nonstream_c1", "p99_ms"), "latency"),
    ]
    for c in (16, 64):
        rows += [
            Row(f"Non-stream c={c}: throughput", (f"nonstream_c{c}", "requests_per_s"), "rate", "req/s"),
            Row(f"Non-stream c={c}: p99 latency", (f"nonstream_c{c}", "p99_ms"), "latency"),
        ]
    rows.append(Row("Non-stream c=16: worker CPU per request", ("nonstream_c16", "cpu_ms_per_request"), "cpu_ms"))
    return rows


def _rows(output: dict) -> list[Row]:
    s = output["settings"]
    sse = f"SSE {s['sse_tokens']} tokens at {s['sse_tokens_per_second']:g} tok/s, c={s['sse_concurrency']}"
    streams = f"{s['streams']:,} streams ({s['stream_tokens']} tok at {s['stream_tokens_per_second']:g} tok/s)"
    approvals = f"Approval pause + resume, c={s['approval_concurrency']}"
    rows = [
        *_nonstream_rows(),
        Row(f"{sse}: TTFB p50", ("sse", "ttfb_ms", "p50"), "latency"),
        Row(f"{sse}: TTFB p99", ("sse", "ttfb_ms", "p99"), "latency"),
        Row(f"{sse}: inter-chunk gap p50", ("sse", "gap_ms", "p50"), "latency"),
        Row(f"{sse}: inter-chunk gap p99", ("sse", "gap_ms", "p99"), "latency"),
        Row(f"{sse}: errors", ("sse", "errors", "total"), "count"),
        Row(f"{streams}: errors", ("streams", "errors", "total"), "count"),
        Row(f"{streams}: streaming at once (peak)", ("streams", "peak_streaming"), "count"),
        Row(f"{streams}: stream duration p99", ("streams", "duration_ms", "p99"), "latency"),
        Row(f"{streams}: worker peak RSS", ("streams", "worker", "peak_rss_mb"), "mb"),
        Row(f"{streams}: worker CPU time", ("streams", "worker", "cpu_s"), "seconds"),
        Row(f"{streams}: worker CPU (% of one core)", ("streams", "worker", "cpu_percent"), "percent"),
        Row(f"{approvals}: round trips", ("approvals", "per_second"), "rate", "round trips/s", kitemesh_only=True),
        Row(f"{approvals}: round trip p50", ("approvals", "round_trip_ms", "p50"), "latency", kitemesh_only=True),
        Row(f"{approvals}: errors", ("approvals", "errors", "total"), "count", kitemesh_only=True),
        Row(
            f"{approvals}: tool runs per round trip",
            ("approvals", "tool_runs_per_round_trip"),
            "ratio",
            kitemesh_only=True,
        ),
    ]
    if "kitemesh_sqlite" in output["results"]:
        # The same non-stream rows, KiteMesh column from the SQLite run; direct and LiteLLM repeat.
        rows += [
            replace(row, label=f"{row.label}, KiteMesh on SQLite", kitemesh="kitemesh_sqlite")
            for row in _nonstream_rows()
        ]
    return rows


# --- Values and formatting ------------------------------------------------------------------------


def value_at(results: dict, target: str, path: tuple[str, ...]) -> Any:
    """The number at `path`, "failed" when that scenario failed, None when it was not run."""
    node: Any = results.get(target)
    for i, key in enumerate(path):
        if not isinstance(node, dict):
            return None
        if i == 1 and "failed" in node:
            return "failed"
        node = node.get(key)
    return node


def fmt(value: Any, row: Row) -> str:
    if value is None:
        return MISSING
    if isinstance(value, str):
        return value
    if row.kind == "latency":
        return f"{value:,.0f} ms" if value >= 1000 else f"{value:.2f} ms"
    if row.kind == "rate":
        return f"{value:,.1f} {row.unit}" if value < 100 else f"{value:,.0f} {row.unit}"
    if row.kind == "ratio":
        return f"{value:.2f}"
    if row.kind == "cpu_ms":
        return f"{value:.2f} ms CPU"
    if row.kind == "mb":
        return f"{value:.1f} MB"
    if row.kind == "seconds":
        return f"{value:.1f} s"
    if row.kind == "percent":
        return f"{value:.0f} %"
    return f"{value:,}"


def _numbers(*values: Any) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def compare(kitemesh: Any, other: Any, row: Row) -> str:
    """KiteMesh against another column: added milliseconds and the ratio for latencies, the ratio
    otherwise."""
    if not _numbers(kitemesh, other):
        return MISSING
    if row.kind == "count":
        return "same" if kitemesh == other else f"{kitemesh - other:+,}"
    if row.kind == "latency":
        ratio = f" ({kitemesh / other:.1f}×)" if other > 0 else ""
        return f"{kitemesh - other:+.2f} ms{ratio}" if abs(kitemesh - other) < 1000 else f"{kitemesh - other:+,.0f} ms"
    if other == 0:
        return MISSING
    return f"{kitemesh / other:.2f}×"


def table_row(results: dict, row: Row) -> str:
    kitemesh = value_at(results, row.kitemesh, row.path)
    if row.kitemesh_only:
        cells = [row.label, NA, fmt(kitemesh, row), NA, NA, NA]
    else:
        direct = value_at(results, "direct", row.path)
        litellm = value_at(results, "litellm", row.path)
        cells = [row.label, fmt(direct, row), fmt(kitemesh, row), fmt(litellm, row)]
        cells += [compare(kitemesh, direct, row), compare(kitemesh, litellm, row)]
    return "| " + " | ".join(cells) + " |"


# --- Sections -------------------------------------------------------------------------------------


def machine_section(output: dict) -> list[str]:
    m = output["machine"]
    km, ll = m["kitemesh"], m.get("litellm") or {}

    def loops(uvloop: str | None, httptools: str | None) -> str:
        return f"uvloop {uvloop or 'not installed'}, httptools {httptools or 'not installed (h11)'}"

    pinning = (
        "gateway worker on CPU 0 (`taskset -c 0`); fake upstream, wrk and load.py on CPU 1 (`taskset -c 1`); "
        "PostgreSQL unpinned"
        if m["pinned"]
        else "none (taskset missing or fewer than 2 CPUs): every process unpinned"
    )
    vm = f" (virtual machine, {m['hypervisor']})" if m["hypervisor"] else ""
    return [
        "## Machine",
        "",
        f"- CPU: {m['cpu_model']}, {m['cpus']} CPUs{vm}",
        f"- RAM: {m['memory_gb']:.1f} GB; kernel {m['kernel']}; {m['os']}",
        f"- Python {m['python']}; {m['postgresql'] or 'PostgreSQL not reachable'}; {m['wrk'] or 'wrk not installed'}",
        f"- KiteMesh: Django {km['django']}, uvicorn {km['uvicorn']} with "
        f"`{' '.join(m['kitemesh_uvicorn_flags']) or 'default loop and parser'}` "
        f"({loops(km['uvloop'], km['httptools'])}), psycopg {km['psycopg']}",
        f"- LiteLLM: litellm {ll.get('litellm')}, uvicorn {ll.get('uvicorn')} "
        f"({loops(ll.get('uvloop'), ll.get('httptools'))})",
        f"- CPU pinning: {pinning}",
        "",
    ]


def targets_section(output: dict) -> list[str]:
    results, streams = output["results"], f"{output['settings']['streams']:,} concurrent streams"

    def get(target: str, *path: str) -> Any:
        return value_at(results, target, path)

    checks: list[tuple[str, Any, Callable[[float], bool], Callable[[float], str]]] = []
    km_p50, direct_p50 = get("kitemesh", "nonstream_c1", "p50_ms"), get("direct", "nonstream_c1", "p50_ms")
    added = km_p50 - direct_p50 if _numbers(km_p50, direct_p50) else None
    checks.append(
        (
            f"Non-stream p50 latency added at c=1 ≤ {ADDED_LATENCY_TARGET_MS:g} ms",
            added,
            lambda v: v <= ADDED_LATENCY_TARGET_MS,
            lambda v: f"+{v:.2f} ms",
        )
    )
    for c in (16, 64):
        km, ll = (
            get("kitemesh", f"nonstream_c{c}", "requests_per_s"),
            get("litellm", f"nonstream_c{c}", "requests_per_s"),
        )
        ratio = km / ll if _numbers(km, ll) and ll else None
        checks.append(
            (
                f"Throughput ≥ {THROUGHPUT_TARGET_RATIO:g}× LiteLLM's (non-stream, c={c})",
                ratio,
                lambda v: v >= THROUGHPUT_TARGET_RATIO,
                lambda v: f"{v:.2f}×",
            )
        )
    errors, completed = get("kitemesh", "streams", "errors", "total"), get("kitemesh", "streams", "completed")
    checks.append((f"{streams} on one worker: no errors", errors, lambda v: v == 0, lambda v: f"{v} errors"))
    rss = get("kitemesh", "streams", "worker", "peak_rss_mb")
    checks.append(
        (
            f"{streams}: worker RSS ≤ {RSS_TARGET_MB} MB",
            rss,
            lambda v: v <= RSS_TARGET_MB,
            lambda v: f"{v:.1f} MB",
        )
    )
    lines = ["## Targets", "", "| Target | Measured | Result |", "|---|---|---|"]
    for label, value, passes, show in checks:
        if _numbers(value):
            lines.append(f"| {label} | {show(value)} | {'PASS' if passes(value) else 'FAIL'} |")
        else:
            lines.append(f"| {label} | {value or 'not measured'} | FAIL |")
    if _numbers(completed):
        lines += ["", f"Streams completed by KiteMesh: {completed:,}."]
    return [*lines, ""]


def errors_section(output: dict) -> list[str]:
    lines = ["## Errors and failures seen", ""]
    for target, results in output["results"].items():
        for scenario, result in results.items():
            if not isinstance(result, dict):
                continue
            if "failed" in result:
                lines.append(f"- **{target} / {scenario}: failed** — `{result['failed'][:1500]}`")
            errors = result.get("errors") or {}
            if errors.get("total"):
                lines.append(f"- {target} / {scenario}: {errors['total']} errors {errors.get('by_kind')}")
                lines += [f"  - `{sample[:600]}`" for sample in errors.get("samples", [])]
        log = results.get("log") or {}
        if log.get("flagged_lines"):
            lines.append(f"- {target} log: {log['flagged_lines']} warning/error lines; first distinct ones:")
            lines += [f"  - `{sample}`" for sample in log["samples"]]
    lines += [f"- {failure[:1500]}" for failure in output.get("failures", []) if "start-up" in failure]
    if len(lines) == 2:
        lines.append("None: every request of every scenario succeeded and no server logged a warning.")
    return [*lines, ""]


def notes_section(output: dict) -> list[str]:
    s = output["settings"]
    driver = "wrk" if output["machine"]["wrk"] else "bench/load.py (wrk was missing)"
    load = output.get("load_average") or {"before": float("nan"), "after": float("nan")}
    return [
        "## How each number was measured",
        "",
        "- **Servers.** Every server under test is up for the whole run (an idle one costs no CPU), one uvicorn "
        "worker each, auth on: KiteMesh "
        "(`uvicorn kitemesh_site.asgi:application --workers 1`, `DJANGO_DEBUG=0`, log level WARNING, a `km_…` "
        f"token; main column on {'PostgreSQL' if s['kitemesh_db'] == 'postgres' else 'SQLite'}, fresh database "
        "each run) and LiteLLM proxy (`litellm --num_workers 1`, master key, prices set in `model_info`, no "
        "database, no callbacks, `LITELLM_LOG=ERROR`, `LITELLM_MODE=PRODUCTION`, httptools installed so its uvicorn "
        "parses HTTP as KiteMesh's does). Both call the same fake upstream (`bench/upstream.py`: raw asyncio HTTP/1.1, "
        f"TCP_NODELAY, {s['upstream_latency_ms']:g} ms model latency), so every difference is the gateway. "
        "Direct is the fake upstream alone.",
        f"- **Non-stream** ({driver}, `wrk --latency -t1 -cN` with bench/post.lua): a {s['sse_tokens']}-token "
        f"JSON completion, {s['duration']:g} s per target and concurrency, interleaved: {s.get('rounds', 1)} "
        "round(s) in which every target is measured in turn at each concurrency, so a change in the machine's "
        "speed during the run affects every column alike. Throughput = all rounds' requests ÷ their time; "
        "p50/p99 = the median of the rounds' own (wrk's latency distribution). A "
        f"{s['warmup']:g} s warm-up at c=16 comes first. Added latency = KiteMesh − direct. The other scenarios "
        "run afterwards, one server at a time.",
        f"- **SSE** (bench/load.py sse): {s['sse_streams']} streams, {s['sse_concurrency']} at a time, each "
        f"{s['sse_tokens']} tokens at {s['sse_tokens_per_second']:g} tokens/s with `include_usage`. TTFB = request "
        "sent → first SSE event carrying text; inter-chunk gap = time between consecutive text-carrying events "
        f"(ideal: {1000 / s['sse_tokens_per_second']:.0f} ms; what a gateway adds shows in the p99).",
        f"- **Concurrent streams** (bench/load.py streams): {s['streams']:,} streams opened at once, one "
        f"connection each, {s['stream_tokens']} tokens at {s['stream_tokens_per_second']:g} tokens/s (ideal "
        f"duration {1000 * (s['stream_tokens'] - 1) / s['stream_tokens_per_second']:,.0f} ms). An error is a "
        "non-200, a connection error, an error event, a stream without `[DONE]` or a timeout. 'Streaming at once' "
        "is the most streams between their first event and their end at one instant. RSS: peak of VmRSS in "
        "/proc/<worker>/status sampled every 0.1 s; CPU: utime+stime from /proc/<worker>/stat over the scenario. "
        "For direct these are the fake upstream's own process (which shares CPU 1 with the driver).",
        f"- **Approvals** (KiteMesh only; bench/load.py approvals): {s['approval_concurrency']} clients in a loop for "
        f"{s['duration']:g} s: POST a completion to a group whose only tool needs approval (expects 200 with "
        "`tool_calls` and `kitemesh.approval_id`), then POST /v1/chat/resume approving every call (expects 200, "
        "`finish_reason` stop); the tool is a loopback GET on the fake upstream, which counts its runs (1.00 per "
        "round trip means every approved call ran exactly once). After a warm-up.",
        "- **Databases.** The rows marked 'KiteMesh on SQLite' rerun the non-stream scenarios with KiteMesh on "
        "SQLite (`var/bench.sqlite3`); their Direct and LiteLLM columns repeat the same measurements as above. "
        "PostgreSQL 15 runs on this machine, unpinned, so its CPU competes with the other processes; KiteMesh "
        "reaches it over its Unix socket (`/var/run/postgresql`), as a same-host deployment would.",
        "- **Noise.** Two cores, one run: numbers move by several percent between runs, more if anything else "
        f"is busy. 1-minute load average before the run {load['before']:.2f}, after it {load['after']:.2f} "
        "(near 0 before means the machine was otherwise idle).",
        "",
    ]


def render_markdown(output: dict) -> str:
    results = output["results"]
    quick = " (quick smoke run)" if output["settings"]["quick"] else ""
    lines = [
        f"# KiteMesh benchmark{quick}",
        "",
        f"Command: `make bench`{' (`bench/run.py --quick`)' if quick else ''}. "
        f"Run {output['started']} → {output['finished']} (UTC).",
        "",
        *machine_section(output),
        "## Results",
        "",
        "| Scenario | Direct | KiteMesh | LiteLLM | KiteMesh vs direct | KiteMesh vs LiteLLM |",
        "|---|---|---|---|---|---|",
        *(table_row(results, row) for row in _rows(output)),
        "",
        "Latency comparisons: added milliseconds (ratio); throughput and memory: KiteMesh ÷ the other column.",
        "",
        *targets_section(output),
        *errors_section(output),
        *notes_section(output),
    ]
    return "\n".join(lines)
