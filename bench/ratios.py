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


def own(path):
    persist = ["| backend | producers | events/s | commit p50 µs | commit p99 µs |", "|---|---|---|---|---|"]
    other = ["| scenario | figure |", "|---|---|"]
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            scen, label = r.get("scenario"), r.get("label", "")
            if scen == "persist":
                persist.append(f"| {r['backend']} | {r['producers']} | {r['events_per_s']:.0f} | "
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
            elif scen == "first_token":
                other.append(f"| provider first token → client partial_result, p50 / p99 µs | {r.get('p50_us')} / {r.get('p99_us')} |")
    return "\n".join(persist) + "\n\n" + "\n".join(other)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--own", required=True)
    ap.add_argument("--append")
    a = ap.parse_args()
    r = ratios(load(a.results))
    o = own(a.own)
    print("\nnetra's ratio to each peer (>1 = netra better):\n")
    print(r)
    print("\nnetra's own scenarios:\n")
    print(o)
    if a.append:
        with open(a.append, "a") as f:
            f.write("\n## netra's ratio to each peer\n\nSame run as the table above; >1 means netra is better.\n\n")
            f.write(r + "\n")
            f.write("\n## netra's own scenarios\n\nPersisted events through the real delivery path "
                    "(`cargo run --release --example persist`): N producers, each appending one event at a time "
                    "to its own thread and awaiting the commit, as a run does; group commit batches whatever "
                    "is pending into one transaction.\n\n")
            f.write(o + "\n")
            with open(a.own) as src:
                f.write("\n<details><summary>Raw results of netra's own scenarios</summary>\n\n```\n" + src.read().strip() + "\n```\n</details>\n")


if __name__ == "__main__":
    main()
