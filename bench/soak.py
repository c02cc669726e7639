"""Soak: mixed load on one netra for SOAK_SECONDS, RSS and open descriptors sampled.

Users chat in a loop (new and old threads), tabs connect and go away, pings flow and one
tab resumes with subscribe now and then. Every 10 s netra's RSS and descriptor count are
sampled; the verdict compares the last third of the run with the middle third: flat means
growth below SOAK_RSS_SLACK_MIB and SOAK_FD_SLACK. Appends a line to bench/SOAK.md.
The store's caches (history, thread owners, users: each capped) are sampled from
/metrics beside them, so growth can be told from the caches filling toward their caps.
Reuses bench/abuse.py's server and token helpers.
"""
import asyncio, json, os, platform, random, sys, time, urllib.request

sys.path.insert(0, os.path.dirname(__file__))
import abuse  # noqa: E402
import websockets  # noqa: E402

SECONDS = int(os.environ.get("SOAK_SECONDS", "600"))
USERS = int(os.environ.get("SOAK_USERS", "20"))
RSS_SLACK = float(os.environ.get("SOAK_RSS_SLACK_MIB", "16"))
FD_SLACK = int(os.environ.get("SOAK_FD_SLACK", "16"))
# NETRA_CACHE_BYTES for the server: a small budget makes the caches reach their caps in
# minutes, so a short soak shows whether anything else grows.
CACHE_BYTES = os.environ.get("SOAK_CACHE_BYTES", "")


async def frames_until_end(ws):
    while True:
        f = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if f["type"] in ("final_report", "error"):
            return f


async def chatter(url, user, deadline, stats):
    thread = None
    while time.monotonic() < deadline:
        try:
            async with websockets.connect(url, additional_headers={"Authorization": "Bearer " + abuse.token(user)},
                                          max_size=None) as ws:
                await ws.recv()
                for _ in range(random.randint(3, 15)):
                    if time.monotonic() >= deadline:
                        return
                    text = random.choice(["what is 12 * (3 + 4)?", "hello there", "x" * random.randint(10, 5000)])
                    start = time.monotonic()
                    await ws.send(json.dumps({"type": "user_message",
                                              "payload": {"content": text, "thread_id": random.choice([thread, None])}}))
                    f = await frames_until_end(ws)
                    thread = f.get("thread_id", thread)
                    stats["runs"] += 1
                    stats["latency"].append((time.monotonic() - start) * 1000)
                    if f["type"] == "error":
                        stats["errors"] += 1
                    await ws.send(json.dumps({"type": "ping"}))
                    if thread and random.random() < 0.1:
                        await ws.send(json.dumps({"type": "subscribe", "payload": {"thread_id": thread, "after_seq": 0}}))
                    await asyncio.sleep(random.uniform(0.05, 0.3))
        except Exception as e:  # a failed tab is counted, the user goes on
            stats["exceptions"].append(repr(e)[:120])
        stats["reconnects"] += 1


async def main():
    extra = {"NETRA_RATE_LIMIT": "100000"}
    if CACHE_BYTES:
        extra["NETRA_CACHE_BYTES"] = CACHE_BYTES
    netra = await abuse.Netra(sys.argv[1], extra, "soak").start()
    stats = {"runs": 0, "errors": 0, "reconnects": 0, "exceptions": [], "latency": []}
    deadline = time.monotonic() + SECONDS
    samples = []

    def caches():
        """The store's in-memory caches, from /metrics: entries of each, history bytes."""
        try:
            with urllib.request.urlopen(f"http://{netra.host}:{netra.port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        found = {}
        for line in text.splitlines():
            if line.startswith(("netra_cache_entries{", "netra_cache_bytes{")):
                name, value = line.rsplit(" ", 1)
                key = name.split('cache="')[1].split('"')[0] + ("_bytes" if "bytes" in name else "")
                found[key] = int(float(value))
        return found

    async def sampler():
        t0 = time.monotonic()
        while time.monotonic() < deadline:
            sizes = await asyncio.to_thread(caches)
            samples.append((round(time.monotonic() - t0), round(netra.rss_mib(), 1), netra.fds(), sizes))
            await asyncio.sleep(10)

    try:
        await asyncio.gather(sampler(), *(chatter(netra.ws_url, f"soak-{i}", deadline, stats) for i in range(USERS)))
    finally:
        alive = netra.alive()
        netra.stop()
    third = max(1, len(samples) // 3)
    middle, last = samples[third:2 * third] or samples, samples[-third:]
    rss_growth = max(s[1] for s in last) - max(s[1] for s in middle)
    fd_growth = max(s[2] for s in last) - max(s[2] for s in middle)
    lat = sorted(stats["latency"])
    p99 = lat[int(len(lat) * 0.99) - 1] if lat else None
    ok = alive and rss_growth < RSS_SLACK and fd_growth < FD_SLACK and not stats["exceptions"] and stats["errors"] == 0
    result = {"seconds": SECONDS, "users": USERS, "runs": stats["runs"], "errors": stats["errors"],
              "reconnects": stats["reconnects"], "exceptions": stats["exceptions"][:5],
              "p99_ms": round(p99, 1) if p99 else None, "rss_growth_mib": round(rss_growth, 1),
              "fd_growth": fd_growth, "samples": samples, "pass": ok}
    print(json.dumps(result))
    line = (f"| {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {os.cpu_count()} CPUs, {platform.machine()} | "
            f"{SECONDS} s, {USERS} users{', caches ' + CACHE_BYTES + ' B' if CACHE_BYTES else ''} | {stats['runs']} runs, {stats['errors']} errors, p99 {result['p99_ms']} ms | "
            f"RSS {samples[0][1]}→{samples[-1][1]} MiB (last third +{result['rss_growth_mib']}), "
            f"fds {samples[0][2]}→{samples[-1][2]} | {'PASS' if ok else 'FAIL'} |\n")
    path = os.path.join(os.path.dirname(__file__), "SOAK.md")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write("# netra soak runs (bench/soak)\n\n| date | machine | load | runs | memory and descriptors | verdict |\n"
                    "|---|---|---|---|---|---|\n")
    with open(path, "a") as f:
        f.write(line)
    print(line)
    sys.exit(0 if ok else 1)


asyncio.run(main())
