"""bench/results.md from the raw results of bench/run.py: the machine, one table of every scenario
(direct, KiteMesh, its variants and baseline when measured, LiteLLM and the ratios), the targets with
pass/fail, the A/B comparisons, errors seen, and how it was measured."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

NA = "n/a"
MISSING = "—"
RSS_TARGET_MB = 300
# Ratios of numbers measured in the same run hold on a VM whose speed drifts; absolute numbers do not.
LITELLM_LATENCY_FACTOR = 3  # KiteMesh adds at most 1/3 of what LiteLLM adds to the c=1 p50 over direct
LITELLM_THROUGHPUT_FACTOR = 3  # at least 3× LiteLLM's requests/s at c=16
LITELLM_CPU_FACTOR = 5  # at most 1/5 of LiteLLM's worker CPU per request at c=16
APPROVAL_CPU_FACTOR = 4  # a pause and its resume cost the worker at most 4× a plain completion's CPU
# Against the baseline commit: what a change may cost before it needs a reason.
BASELINE_ADDED_MS = 0.3
BASELINE_THROUGHPUT = 0.9
BASELINE_CPU = 1.1
# A production piece stays only if the variant without it is this much worse.
PIECE_WORTH_MS = 0.3
PIECE_WORTH_THROUGHPUT = 0.10


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
        Row(
            f"{approvals}: worker CPU per round trip",
            ("approvals", "cpu_ms_per_round_trip"),
            "cpu_ms",
            kitemesh_only=True,
        ),
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


def extra_columns(output: dict) -> list[tuple[str, str]]:
    """The A/B columns after KiteMesh's, (target, heading): each variant, then the baseline by its commit."""
    columns = [(f"kitemesh_{name}", f"variant {name}") for name in output.get("variants") or []]
    if output.get("baseline"):
        columns.append(("kitemesh_baseline", f"KiteMesh {output['baseline']['short']}"))
    return columns


def table_row(results: dict, row: Row, extra: list[str]) -> str:
    kitemesh = value_at(results, row.kitemesh, row.path)
    others = [fmt(value_at(results, key, row.path), row) for key in extra]
    if row.kitemesh_only:
        cells = [row.label, NA, fmt(kitemesh, row), *others, NA, NA, NA]
    else:
        direct = value_at(results, "direct", row.path)
        litellm = value_at(results, "litellm", row.path)
        cells = [row.label, fmt(direct, row), fmt(kitemesh, row), *others, fmt(litellm, row)]
        cells += [compare(kitemesh, direct, row), compare(kitemesh, litellm, row)]
    return "| " + " | ".join(cells) + " |"


def results_table(output: dict) -> list[str]:
    extra = extra_columns(output)
    headings = ["Scenario", "Direct", "KiteMesh", *(heading for _, heading in extra), "LiteLLM"]
    headings += ["KiteMesh vs direct", "KiteMesh vs LiteLLM"]
    return [
        "| " + " | ".join(headings) + " |",
        "|" + "---|" * len(headings),
        *(table_row(output["results"], row, [key for key, _ in extra]) for row in _rows(output)),
    ]


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


@dataclass(frozen=True)
class Check:
    """One line of a targets table: the measured value (a number, "failed", or None when not measured), how
    it is judged (`passes`; None for a comparison without a target) and how it is shown."""

    label: str
    value: Any
    passes: Callable[[float], bool] | None
    show: Callable[[float], str]

    def line(self) -> str:
        if _numbers(self.value):
            result = "no target" if self.passes is None else "PASS" if self.passes(self.value) else "FAIL"
        else:
            result = "FAIL" if self.value == "failed" else "not measured"
        return f"| {self.label} | {shown(self.value, self.show)} | {result} |"


def shown(value: Any, show: Callable[[float], str]) -> str:
    if _numbers(value):
        return show(value)
    return "failed" if value == "failed" else "not measured"


def derive(compute: Callable[..., float], *values: Any) -> Any:
    """compute(*values) when each value is a number; "failed" when one of them failed; None otherwise."""
    if _numbers(*values):
        try:
            return compute(*values)
        except ZeroDivisionError:
            return None
    return "failed" if "failed" in values else None


def ratio_check(label: str, new: Any, old: Any, passes: Callable[[float], bool] | None, unit: str) -> Check:
    """new ÷ old, shown with both numbers (`unit` formats each)."""
    return Check(
        label,
        derive(operator.truediv, new, old),
        passes,
        lambda v: f"{v:.2f}× ({unit.format(new)} against {unit.format(old)})",
    )


def added_p50(results: dict, target: str) -> Any:
    """What `target` adds to the c=1 p50 latency of the upstream called directly."""
    p50 = [value_at(results, key, ("nonstream_c1", "p50_ms")) for key in (target, "direct")]
    return derive(operator.sub, *p50)


def ratio_checks(results: dict) -> list[Check]:
    """KiteMesh against LiteLLM, and its approval round trip against its plain completion, all in this run."""

    def get(target: str, *path: str) -> Any:
        return value_at(results, target, path)

    cpu = ("nonstream_c16", "cpu_ms_per_request")
    return [
        ratio_check(
            f"Added p50 latency at c=1 (KiteMesh − direct) ≤ 1/{LITELLM_LATENCY_FACTOR} of LiteLLM's "
            "(LiteLLM − direct)",
            added_p50(results, "kitemesh"),
            added_p50(results, "litellm"),
            lambda v: v <= 1 / LITELLM_LATENCY_FACTOR,
            "{:+.2f} ms",
        ),
        ratio_check(
            f"Throughput at c=16 ≥ {LITELLM_THROUGHPUT_FACTOR}× LiteLLM's",
            get("kitemesh", "nonstream_c16", "requests_per_s"),
            get("litellm", "nonstream_c16", "requests_per_s"),
            lambda v: v >= LITELLM_THROUGHPUT_FACTOR,
            "{:,.1f} req/s",
        ),
        ratio_check(
            f"Worker CPU per request at c=16 ≤ 1/{LITELLM_CPU_FACTOR} of LiteLLM's",
            get("kitemesh", *cpu),
            get("litellm", *cpu),
            lambda v: v <= 1 / LITELLM_CPU_FACTOR,
            "{:.2f} ms",
        ),
        ratio_check(
            f"Approval round trip's worker CPU ≤ {APPROVAL_CPU_FACTOR}× a plain completion's "
            "(KiteMesh's CPU per request at c=16)",
            get("kitemesh", "approvals", "cpu_ms_per_round_trip"),
            get("kitemesh", *cpu),
            lambda v: v <= APPROVAL_CPU_FACTOR,
            "{:.2f} ms",
        ),
    ]


def targets_section(output: dict) -> list[str]:
    results, streams = output["results"], f"{output['settings']['streams']:,} concurrent streams"

    def get(target: str, *path: str) -> Any:
        return value_at(results, target, path)

    checks = ratio_checks(results)
    errors, completed = get("kitemesh", "streams", "errors", "total"), get("kitemesh", "streams", "completed")
    checks.append(Check(f"{streams} on one worker: no errors", errors, lambda v: v == 0, lambda v: f"{v} errors"))
    rss = get("kitemesh", "streams", "worker", "peak_rss_mb")
    checks.append(
        Check(f"{streams}: worker RSS ≤ {RSS_TARGET_MB} MB", rss, lambda v: v <= RSS_TARGET_MB, lambda v: f"{v:.1f} MB")
    )
    lines = ["## Targets", "", "| Target | Measured | Result |", "|---|---|---|", *(c.line() for c in checks)]
    if _numbers(completed):
        lines += ["", f"Streams completed by KiteMesh: {completed:,}."]
    return [*lines, ""]


def baseline_section(output: dict) -> list[str]:
    """The working tree's KiteMesh against the baseline commit's, measured in the same rounds."""
    if not output.get("baseline"):
        return []
    results, short = output["results"], output["baseline"]["short"]

    def pair(*path: str) -> tuple[Any, Any]:
        return value_at(results, "kitemesh", path), value_at(results, "kitemesh_baseline", path)

    new_added, old_added = added_p50(results, "kitemesh"), added_p50(results, "kitemesh_baseline")
    checks = [
        Check(
            f"c=1 p50 added over direct, new − {short}: at most +{BASELINE_ADDED_MS:g} ms",
            derive(operator.sub, new_added, old_added),
            lambda v: v <= BASELINE_ADDED_MS,
            lambda v: f"{v:+.2f} ms ({new_added:+.2f} against {old_added:+.2f} ms)",
        ),
        ratio_check(
            f"c=16 throughput, new ÷ {short}: at least {BASELINE_THROUGHPUT:g}×",
            *pair("nonstream_c16", "requests_per_s"),
            lambda v: v >= BASELINE_THROUGHPUT,
            "{:,.1f} req/s",
        ),
        ratio_check(
            f"Worker CPU per request at c=16, new ÷ {short}: at most {BASELINE_CPU:g}×",
            *pair("nonstream_c16", "cpu_ms_per_request"),
            lambda v: v <= BASELINE_CPU,
            "{:.2f} ms",
        ),
        ratio_check(f"Approval round trips/s, new ÷ {short}", *pair("approvals", "per_second"), None, "{:,.1f}"),
        ratio_check(
            f"Approval worker CPU per round trip, new ÷ {short}",
            *pair("approvals", "cpu_ms_per_round_trip"),
            None,
            "{:.2f} ms",
        ),
    ]
    commit = output["baseline"]["commit"]
    return [
        f"## Against the baseline {short}",
        "",
        f"New: this working tree; {short}: KiteMesh as of `{output['baseline']['ref']}` ({commit}), served from a "
        "git worktree beside it, on its own database, in the same interleaved rounds.",
        "",
        "| A/B | Measured | Result |",
        "|---|---|---|",
        *(c.line() for c in checks),
        "",
    ]


def variant_verdict(p50_diff: Any, throughput_ratio: Any) -> str:
    """Whether the production piece the variant swaps out earns its place, by the rule."""
    if not _numbers(p50_diff, throughput_ratio):
        return "failed" if "failed" in (p50_diff, throughput_ratio) else "not measured"
    reasons = [f"c=1: {p50_diff:+.2f} ms without it"] if p50_diff >= PIECE_WORTH_MS else []
    if throughput_ratio <= 1 - PIECE_WORTH_THROUGHPUT:
        reasons.append(f"c=16: {100 * (throughput_ratio - 1):+.0f} % throughput without it")
    return f"earns its place ({'; '.join(reasons)})" if reasons else "not shown to be worth it"


def variant_row(results: dict, name: str) -> str:
    def against_kitemesh(compute: Callable[[float, float], float], *path: str) -> Any:
        return derive(compute, value_at(results, f"kitemesh_{name}", path), value_at(results, "kitemesh", path))

    p50 = against_kitemesh(operator.sub, "nonstream_c1", "p50_ms")
    rps = against_kitemesh(operator.truediv, "nonstream_c16", "requests_per_s")
    cpu = against_kitemesh(operator.truediv, "nonstream_c16", "cpu_ms_per_request")
    cells = [name, shown(p50, lambda v: f"{v:+.2f} ms"), shown(rps, lambda v: f"{v:.2f}×")]
    cells += [shown(cpu, lambda v: f"{v:.2f}×"), variant_verdict(p50, rps)]
    return "| " + " | ".join(cells) + " |"


def variants_section(output: dict) -> list[str]:
    """Each variant against KiteMesh, measured in the same rounds: does the production piece earn its place?"""
    variants, worth = output.get("variants") or [], f"{100 * PIECE_WORTH_THROUGHPUT:g} %"
    if not variants:
        return []
    return [
        "## Variants against KiteMesh",
        "",
        f"The rule: a piece stays only if it is worth at least {PIECE_WORTH_MS:g} ms at c=1 or {worth} of c=16 "
        f"throughput, that is, only if the variant without it (bench/variants.py) is slower by ≥ "
        f"{PIECE_WORTH_MS:g} ms (c=1 p50) or by ≥ {worth} (c=16 throughput ≤ {1 - PIECE_WORTH_THROUGHPUT:g}× "
        "KiteMesh's).",
        "",
        "| Variant | c=1 p50, variant − KiteMesh | c=16 throughput, variant ÷ KiteMesh "
        "| c=16 worker CPU per request, variant ÷ KiteMesh | The production piece |",
        "|---|---|---|---|---|",
        *(variant_row(output["results"], name) for name in variants),
        "",
    ]


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
        "- **Approvals** (KiteMesh and its baseline only; bench/load.py approvals): "
        f"{s['approval_concurrency']} clients in a loop for {s['duration']:g} s: "
        "POST a completion to a group whose only tool needs approval (expects 200 with `tool_calls` and "
        "`kitemesh.approval_id`), then POST /v1/chat/resume approving every call (expects 200, `finish_reason` "
        "stop); the tool is a loopback GET on the fake upstream, which counts its runs (1.00 per round trip "
        "means every approved call ran exactly once). After a warm-up. Worker CPU per round trip = the "
        "worker's utime+stime over the loop ÷ round trips.",
        *ab_notes(output),
        "- **Databases.** The rows marked 'KiteMesh on SQLite' rerun the non-stream scenarios with KiteMesh on "
        "SQLite (`var/bench.sqlite3`); their Direct and LiteLLM columns repeat the same measurements as above. "
        "PostgreSQL 15 runs on this machine, unpinned, so its CPU competes with the other processes; KiteMesh "
        "reaches it over its Unix socket (`/var/run/postgresql`), as a same-host deployment would.",
        "- **Noise.** Two cores, one run: numbers move by several percent between runs, more if anything else "
        f"is busy. 1-minute load average before the run {load['before']:.2f}, after it {load['after']:.2f} "
        "(near 0 before means the machine was otherwise idle).",
        "",
    ]


def ab_notes(output: dict) -> list[str]:
    """How the A/B columns were served, when the run had any."""
    notes = []
    if output.get("variants"):
        notes.append(
            "- **Variants** (`--variants`): each is `uvicorn --factory variants:<name>` (bench/variants.py: "
            "KiteMesh with one piece swapped for the plain alternative), one worker pinned as KiteMesh's, on "
            "KiteMesh's database with its token; measured in the non-stream rounds only."
        )
    if output.get("baseline"):
        b = output["baseline"]
        notes.append(
            f"- **Baseline** (`--baseline {b['ref']}`): KiteMesh as of {b['commit']}, from a git worktree at "
            "bench/.run/baseline, served by the same python with the worktree as cwd and `--app-dir` (so its "
            "packages, not the venv's editable install of this checkout, are imported; checked before it starts), "
            "one worker pinned as KiteMesh's, on a database of its own migrated, configured and given a token by "
            "the worktree's manage.py; measured in the non-stream rounds and the approval scenario."
        )
    return notes


def command_line(output: dict) -> str:
    options = ["--quick"] if output["settings"]["quick"] else []
    if output.get("baseline"):
        options.append(f"--baseline {output['baseline']['ref']}")
    if output.get("variants"):
        options.append(f"--variants {','.join(output['variants'])}")
    return f"`make bench` (`bench/run.py {' '.join(options)}`)" if options else "`make bench`"


def render_markdown(output: dict) -> str:
    quick = " (quick smoke run)" if output["settings"]["quick"] else ""
    lines = [
        f"# KiteMesh benchmark{quick}",
        "",
        f"Command: {command_line(output)}. Run {output['started']} → {output['finished']} (UTC).",
        "",
        *machine_section(output),
        "## Results",
        "",
        *results_table(output),
        "",
        "Latency comparisons: added milliseconds (ratio); throughput and memory: KiteMesh ÷ the other column.",
        "",
        *targets_section(output),
        *baseline_section(output),
        *variants_section(output),
        *errors_section(output),
        *notes_section(output),
    ]
    return "\n".join(lines)
