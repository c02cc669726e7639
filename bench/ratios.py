#!/usr/bin/env python3
"""netra's ratio to every peer, and netra's own scenarios, from one bench/run.

Reads the merged wsload JSON lines of the shared lineup and the JSON lines of netra's own
scenarios; prints both tables and appends them to RESULTS.md. Standard library only.
"""

import argparse
import json

# (label, scenario, path, better)
KEY = [
    ("exec → ready, median ms", "ready", ("exec_to_ready_ms", "median"), "low"),
    ("connect → first frame p99 ms", "connect", ("connect_to_first_frame", "p99"), "low"),
    ("RSS per idle connection, KiB", "connect", ("rss_kib_per_conn",), "low"),
    ("chat server CPU µs per message", "chat", ("server_cpu_us_per_msg",), "low"),
    ("chat p99 ms to final_report", "chat", ("to_final_report", "p99"), "low"),
    ("fanout server CPU µs per run", "fanout", ("server_cpu_us_per_run",), "low"),
    ("fanout p99 ms, each event at each tab", "fanout", ("delivery_each_event", "p99"), "low"),
]


def dig(d, path):
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def load(path):
    rows = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                r = json.loads(line)
                rows.setdefault(r.get("label", "?"), {})[r["scenario"]] = r
    return rows


def ratios(rows):
    ours = [n for n in rows if n.startswith("netra")]
    peers = [n for n in rows if not n.startswith("netra")]
    head = "| metric | " + " | ".join(f"{o} vs {p}" for o in ours for p in peers) + " |"
    lines = [head, "|---|" + "---|" * (len(ours) * len(peers))]
    for label, scen, path, better in KEY:
        cells = []
        for o in ours:
            for p in peers:
                a, b = dig(rows[o].get(scen), path), dig(rows[p].get(scen), path)
                if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not a or not b:
                    cells.append("—")
                    continue
                r = b / a if better == "low" else a / b
                cells.append(f"{r:.2f}×")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def num(v):
    return v if isinstance(v, (int, float)) else None


def targets(rows, own_path):
    """Each target of #18 with what this run measured, met or missed."""
    repeats = {}
    idle = None
    pg_cpu = None
    with open(own_path) as f:
        for line in f:
            if line.strip().startswith("{"):
                r = json.loads(line)
                if r.get("scenario") == "connect":
                    idle = r
                if r.get("scenario") == "postgres_cpu":
                    pg_cpu = r
                if r.get("label", "").startswith("netra-run"):
                    repeats.setdefault(r.get("scenario"), []).append(r)
    lines = ["| target | netra | netra-pg | met |", "|---|---|---|---|"]

    def get(label, scen, path):
        return num(dig(rows.get(label, {}).get(scen), path))

    def verdict(a, b):
        if a is None and b is None:
            return "—"
        if a and b:
            return "yes"
        return "netra only" if a else ("netra-pg only" if b else "no")

    def show(v):
        return "—" if v is None else str(v)

    def median_of_netra(scen, path):
        runs = [get("netra", scen, path)] + [num(dig(r, path)) for r in repeats.get(scen, [])]
        runs = [v for v in runs if v is not None]
        if not runs:
            return None, "—"
        median = sorted(runs)[len(runs) // 2]
        if len(runs) == 1:
            return median, str(median)
        return median, f"{median} (median of {', '.join(str(v) for v in runs)})"

    cpu = ("server_cpu_us_per_msg",)
    fastapi_cpu, node_cpu = get("fastapi", "chat", cpu), get("node-ws", "chat", cpu)
    a, b = get("netra", "chat", cpu), get("netra-pg", "chat", cpu)
    if fastapi_cpu and node_cpu:
        limit = min(fastapi_cpu / 2, node_cpu)
        pg_note = ""
        if pg_cpu is not None:
            pg_note = (f"; a second netra-pg chat: netra {pg_cpu.get('server_cpu_us_per_msg')}, "
                       f"PostgreSQL {pg_cpu.get('postgres_cpu_us_per_msg')}")
        lines.append(
            f"| chat server CPU per message: netra ≤ FastAPI's / 2 ({fastapi_cpu / 2:.1f}) and ≤ node-ws's "
            f"({node_cpu}) µs; netra-pg ≤ FastAPI's ({fastapi_cpu}) µs, netra's process | {show(a)} | "
            f"{show(b)}{pg_note} | {verdict(a is not None and a <= limit, b is not None and b <= fastapi_cpu)} |")
    for name, scen, path in (
        ("chat p99 ms to final_report ≤ FastAPI's", "chat", ("to_final_report", "p99")),
        ("fan-out p99 ms, each event at each tab, ≤ FastAPI's", "fanout", ("delivery_each_event", "p99")),
    ):
        peer = get("fastapi", scen, path)
        median, shown = median_of_netra(scen, path)
        pg = get("netra-pg", scen, path)
        if peer is not None:
            lines.append(f"| {name} ({peer}) | {shown} | {show(pg)} | "
                         f"{verdict(median is not None and median <= peer, pg is not None and pg <= peer)} |")
    a, b = get("netra", "connect", ("rss_kib_per_conn",)), get("netra-pg", "connect", ("rss_kib_per_conn",))
    lines.append(f"| RSS per idle connection ≤ 4 KiB (10k storm) | {show(a)} | {show(b)} | "
                 f"{verdict(a is not None and a <= 4, b is not None and b <= 4)} |")
    if idle is not None:
        kib = num(idle.get("rss_kib_per_conn"))
        lines.append(f"| RSS per idle connection ≤ 4 KiB, {idle.get('opened')} held by one process | "
                     f"{show(kib)} | — | {'yes' if kib is not None and kib <= 4 else 'no'} |")
    path = ("exec_to_ready_ms", "median")
    a, b = get("netra", "ready", path), get("netra-pg", "ready", path)
    lines.append(f"| exec → ready median ≤ 30 ms | {show(a)} | {show(b)} | "
                 f"{verdict(a is not None and a <= 30, b is not None and b <= 30)} |")
    faults = 0
    for label in ("netra", "netra-pg"):
        chat = rows.get(label, {}).get("chat", {})
        fan = rows.get(label, {}).get("fanout", {})
        for k in ("errors", "failed_runs", "timeouts", "missing_events", "out_of_order_runs", "duplicate_events"):
            faults += chat.get(k, 0) or 0
        for k in ("lost_events", "duplicate_events", "out_of_order_runs", "error_frames"):
            faults += fan.get(k, 0) or 0
    for r in repeats.get("chat", []) + repeats.get("fanout", []) + ([pg_cpu] if pg_cpu else []):
        for k in ("errors", "failed_runs", "timeouts", "missing_events", "out_of_order_runs", "duplicate_events",
                  "lost_events", "error_frames"):
            faults += r.get(k, 0) or 0
    lines.append(f"| zero errors, lost, duplicated, out-of-order events | {faults} in all | | {'yes' if faults == 0 else 'no'} |")
    return "\n".join(lines)


def own(path):
    persist = ["| backend | producers | in flight each | events/s | commit p50 µs | commit p99 µs |",
               "|---|---|---|---|---|---|"]
    other = ["| scenario | figure |", "|---|---|"]
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            scen, label = r.get("scenario"), r.get("label", "")
            if scen == "persist":
                persist.append(f"| {r['backend']} | {r['producers']} | {r.get('window', 1)} | {r['events_per_s']:.0f} | "
                               f"{r['commit_p50_us']} | {r['commit_p99_us']} |")
            elif scen == "ready":
                ms = dig(r, ("exec_to_ready_ms", "median"))
                other.append(f"| exec → ready median ms ({label}) | {ms} |")
            elif scen == "connect":
                other.append(f"| idle connections held ({label}) | {r.get('opened')} |")
                other.append(f"| RSS per idle connection KiB ({label}) | {r.get('rss_kib_per_conn')} |")
                kib = r.get("rss_kib_per_conn")
                if isinstance(kib, (int, float)):
                    other.append(f"| extrapolated RSS for 100k / 1M idle connections | "
                                 f"{kib * 100_000 / 1048576:.1f} GiB / {kib * 1_000_000 / 1048576:.1f} GiB |")
                other.append(f"| connect → first frame p99 ms ({label}) | {dig(r, ('connect_to_first_frame', 'p99'))} |")
            elif scen in ("chat", "fanout"):
                p99 = dig(r, ("to_final_report", "p99")) if scen == "chat" else dig(r, ("delivery_each_event", "p99"))
                cpu = r.get("server_cpu_us_per_msg") if scen == "chat" else r.get("server_cpu_us_per_run")
                other.append(f"| {scen} again ({label}): p99 ms / server CPU µs | {p99} / {cpu} |")
            elif scen == "postgres_cpu":
                other.append(f"| netra-pg chat again: netra's CPU / PostgreSQL's CPU µs per message | "
                             f"{r.get('server_cpu_us_per_msg')} / {r.get('postgres_cpu_us_per_msg')} |")
            elif scen == "first_token":
                other.append(f"| provider first token → client partial_result, p50 / p99 µs | {r.get('p50_us')} / {r.get('p99_us')} |")
    return "\n".join(persist) + "\n\n" + "\n".join(other)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--own", required=True)
    ap.add_argument("--append")
    a = ap.parse_args()
    rows = load(a.results)
    r = ratios(rows)
    t = targets(rows, a.own)
    o = own(a.own)
    print("\nnetra's ratio to each peer (>1 = netra better):\n")
    print(r)
    print("\nnetra's own scenarios:\n")
    print(o)
    print("\nTargets of #18:\n")
    print(t)
    if a.append:
        with open(a.append, "a") as f:
            f.write("\n## netra's ratio to each peer\n\nSame run as the table above; >1 means netra is better.\n\n")
            f.write(r + "\n")
            f.write("\n## Targets (#18)\n\nFrom this run. Where one is missed, `bench/PROFILE.md` has the "
                    "profile, the reason and what it would take.\n\n" + t + "\n")
            f.write("\n## netra's own scenarios\n\nPersisted events through the real delivery path "
                    "(`cargo run --release --example persist`): N producers, each appending to its own thread; "
                    "with 1 in flight each awaits every commit, with 8 it keeps up to 8 events in flight and "
                    "waits for the oldest, as a streaming run does (a run never waits for an event's commit "
                    "before emitting the next). Group commit batches whatever is pending into one "
                    "transaction.\n\n")
            f.write(o + "\n")
            with open(a.own) as src:
                f.write("\n<details><summary>Raw results of netra's own scenarios</summary>\n\n```\n" + src.read().strip() + "\n```\n</details>\n")


if __name__ == "__main__":
    main()
