#!/usr/bin/env python3
"""Abuse scenarios against netra (run through bench/abuse, which sets up the venv).

Starts netra itself on 127.0.0.1 (PORT=0, a fresh NETRA_DATA_DIR, NETRA_LOG=warn,
NETRA_AGENT_TOKEN_DELAY=0, NETRA_MAX_CONNECTIONS_PER_USER=200), runs the scenarios below,
prints one JSON line per scenario and a markdown table, and appends the table to
bench/ABUSE.md. Every wait has a timeout and the whole run a deadline (DEADLINE_S).

  1 baseline   10 users x 1 socket x 30 sequential messages: p50/p99 send -> final_report.
  2 hoarders   a thread of ~40 x 100 KB messages, then 100 sockets of its owner subscribe
               from seq 0 and never read; netra's RSS before/+5 s/+15 s; scenario 1 again
               while they sit there.
  3 storm      2000 sockets (200 users x 10), at most 200 opening at once; all wait for
               their hello, then all close; /health/ready afterwards.
  4 flood      one socket sends 5000 pings back to back (limit 120 per 60 s) while 10 other
               users chat as in scenario 1.
  5 slowloris  netra restarted with NETRA_HEADER_TIMEOUT=2s, NETRA_MAX_PENDING_CONNECTIONS=256;
               1000 raw TCP connections drip one header byte per second (phase A: once;
               phase B: each reconnects when closed); /health/ready probed every 250 ms.

The PASS/FAIL criteria are the CRITERIA constants right below.
"""

import argparse
import asyncio
import base64
import ctypes
import datetime as dt
import hashlib
import hmac
import json
import os
import platform
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import websockets
from websockets.asyncio.client import connect

# --- criteria -------------------------------------------------------------------------
MAX_RSS_PER_HOARDER_MIB = 8.0  # 2: netra's RSS growth per never-reading socket
MAX_P99_RATIO = 3.0  # 2, 4: others' chat p99 within 3x of the baseline p99
STORM_DOCUMENTED = {"close_1013"}  # 3: the only refusals the README documents for a storm
HEALTH_MAX_S = 1.0  # 5: /health/ready answered 200 within 1 s, during and after
FD_SLACK = 16  # 5: descriptors after the attack within 16 of the count before it

# --- sizes ----------------------------------------------------------------------------
SECRET = "abuse-bench-secret-0123456789"
DEADLINE_S = 330
CHAT_USERS, CHAT_MSGS = 10, 30
HOARD_MSGS, HOARD_MSG_BYTES, HOARDERS = 40, 100_000, 100
STORM_USERS, STORM_PER_USER, STORM_CONCURRENCY = 200, 10, 200
FLOOD_PINGS, RATE_LIMIT = 5000, 120
LORIS_CONNS, LORIS_ATTACK_S, LORIS_RECONNECT_S = 1000, 10.0, 1.0

BASE_ENV = {
    "HOST": "127.0.0.1",
    "PORT": "0",
    "NETRA_LOG": "warn",
    "NETRA_AGENT_TOKEN_DELAY": "0",
    "NETRA_MAX_CONNECTIONS_PER_USER": "200",
    "JWT_SECRET": SECRET,
}


def log(*a):
    print("abuse:", *a, file=sys.stderr, flush=True)


def now():
    return time.perf_counter()


def pct(xs, p):
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))  # nearest rank
    return round(s[k], 2)


# --- tokens ---------------------------------------------------------------------------
def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def token(user):
    iat = int(time.time())
    head = b64u(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {"sub": user, "email": f"{user}@abuse.test", "iat": iat, "exp": iat + 3600,
              "type": "access", "token_type": "access"}
    body = b64u(json.dumps(claims).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64u(sig)}"


# --- the server -----------------------------------------------------------------------
def _die_with_parent():
    try:  # PR_SET_PDEATHSIG = 1: netra gets SIGKILL if this script dies
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


class Netra:
    def __init__(self, binary, extra_env=None, tag="netra"):
        self.binary, self.extra, self.tag = binary, extra_env or {}, tag
        self.proc = None

    async def start(self):
        self.data = tempfile.mkdtemp(prefix="netra-abuse-")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NETRA_DATA_DIR": self.data,
               **BASE_ENV, **self.extra}
        self.stderr = open(os.path.join(self.data, "stderr.log"), "wb")
        self.proc = subprocess.Popen([self.binary, "serve"], env=env, stdout=subprocess.PIPE,
                                     stderr=self.stderr, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        found = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()

        def reader():  # keeps draining stdout for the server's whole life
            for line in self.proc.stdout:
                text = line.decode(errors="replace").strip()
                if text.startswith("listening on http://") and not found.done():
                    loop.call_soon_threadsafe(found.set_result, text.split("http://", 1)[1])
            if not found.done():
                loop.call_soon_threadsafe(found.set_exception, RuntimeError("netra exited"))

        threading.Thread(target=reader, daemon=True).start()
        try:
            addr = await asyncio.wait_for(found, 30)
        except Exception:
            raise RuntimeError(f"netra did not print its address: {self.log_tail()}")
        host, port = addr.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.ws_url = f"ws://{host}:{port}/ws"
        t0 = now()
        while now() - t0 < 60:
            st, _ = await http_get(self.host, self.port, "/health/ready", 2)
            if st == 200:
                log(f"{self.tag} ready on {addr} in {now() - t0:.2f}s (pid {self.proc.pid})")
                return self
            await asyncio.sleep(0.05)
        raise RuntimeError(f"/health/ready never 200: {self.log_tail()}")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return None

    def fds(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def log_tail(self, n=1500):
        try:
            with open(os.path.join(self.data, "stderr.log"), "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.stderr.close()
            shutil.rmtree(self.data, ignore_errors=True)


async def http_get(host, port, path, timeout):
    """Returns (status or error kind, seconds from connect to the status line)."""
    t0 = now()
    w = None
    try:
        async with asyncio.timeout(timeout):
            r, w = await asyncio.open_connection(host, port)
            w.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            line = await r.readline()
            if not line:
                return "closed", now() - t0
            return int(line.split()[1]), now() - t0
    except TimeoutError:
        return "timeout", now() - t0
    except ConnectionRefusedError:
        return "refused", now() - t0
    except ConnectionResetError:
        return "reset", now() - t0
    except OSError as e:
        return f"oserror_{e.errno}", now() - t0
    finally:
        if w:
            w.close()


async def metrics(n):
    """netra's /metrics, as {name{labels}: value}, connection and closing lines only."""
    out = {}
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(n.host, n.port), 3)
        w.write(f"GET /metrics HTTP/1.1\r\nHost: {n.host}\r\nConnection: close\r\n\r\n".encode())
        body = (await asyncio.wait_for(r.read(), 5)).decode(errors="replace")
        w.close()
        for line in body.split("\r\n\r\n", 1)[-1].splitlines():
            if line.startswith("#") or not line.strip():
                continue
            k, _, v = line.rpartition(" ")
            if any(s in k for s in ("connection", "close", "queue", "rate", "frames")):
                out[k] = float(v)
    except Exception as e:  # informational only
        out["error"] = repr(e)
    return out


# --- chat -----------------------------------------------------------------------------
def ws_connect(n, user, **kw):
    kw.setdefault("open_timeout", 15)
    return connect(n.ws_url, additional_headers={"Authorization": f"Bearer {token(user)}"},
                   ping_interval=None, max_size=None, **kw)


async def hello(ws, timeout=15):
    m = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    if m.get("type") != "system_message" or m.get("payload", {}).get("event") != "connection_established":
        raise RuntimeError(f"unexpected first frame {str(m)[:200]}")


async def chat_user(n, user, msgs, content, window=None):
    """Sequential messages on one socket; returns [(t_sent, latency_ms)], [errors], bytes."""
    lats, errs, nbytes = [], [], 0
    async with ws_connect(n, user) as ws:
        await hello(ws)
        thread = None
        for i in range(msgs):
            t0 = now()
            await ws.send(json.dumps({"type": "user_message",
                                      "payload": {"content": content(i), "thread_id": thread}}))
            while True:
                raw = await asyncio.wait_for(ws.recv(), 60)
                nbytes += len(raw)
                m = json.loads(raw)
                if m["type"] == "thread_created" and thread is None:
                    thread = m.get("thread_id") or m["payload"]["thread_id"]
                elif m["type"] == "final_report":
                    lats.append((t0, (now() - t0) * 1000))
                    break
                elif m["type"] == "error":
                    errs.append(m["payload"].get("code"))
                    break
    return lats, errs, nbytes, thread


async def chat_round(n, prefix):
    """Scenario 1's load: CHAT_USERS users in parallel, CHAT_MSGS sequential messages each."""
    t0 = now()
    res = await asyncio.gather(*(chat_user(n, f"{prefix}-u{i}", CHAT_MSGS,
                                           lambda k: f"what is {k} * 7 + 3?")
                                 for i in range(CHAT_USERS)), return_exceptions=True)
    lats, errs, exc = [], [], []
    for r in res:
        if isinstance(r, BaseException):
            exc.append(repr(r)[:200])
        else:
            lats += r[0]
            errs += r[1]
    ms = [l for _, l in lats]
    return {"n": len(ms), "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99), "max_ms": pct(ms, 100),
            "errors": errs, "exceptions": exc, "seconds": round(now() - t0, 2), "_lats": lats}


def public(d):
    return {k: v for k, v in d.items() if not k.startswith("_")}


# --- scenario 1 -----------------------------------------------------------------------
async def s1_baseline(n, ctx):
    r = await chat_round(n, "base")
    ctx["baseline_p99"] = r["p99_ms"]
    ok = r["n"] == CHAT_USERS * CHAT_MSGS and not r["errors"] and not r["exceptions"]
    return {**public(r), "pass": ok,
            "criterion": f"all {CHAT_USERS * CHAT_MSGS} messages end in final_report, no error"}, \
        f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms ({r['n']} msgs, {r['seconds']} s)"


# --- scenario 2 -----------------------------------------------------------------------
def ws_frame(text):
    data = text.encode()
    mask = os.urandom(4)
    ln = len(data)
    head = bytes([0x81])
    if ln < 126:
        head += bytes([0x80 | ln])
    elif ln < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", ln)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", ln)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def raw_ws_open(host, port, tok, timeout=10):
    """A WebSocket handshake by hand: reads the 101 head byte by byte and nothing after it."""
    s = socket.create_connection((host, port), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
               f"Authorization: Bearer {tok}\r\n\r\n").encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        c = s.recv(1)
        if not c:
            raise ConnectionError("closed during handshake")
        head += c
    status = int(head.split(b" ", 2)[1])
    if status != 101:
        raise ConnectionError(f"handshake status {status}")
    return s


def sockstat_tcp_mib():
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()
                return int(parts[parts.index("mem") + 1]) * 4096 / 2**20
    return None


def drain(socks, seconds):
    """After the measurement: read what the hoarders were sent and who got closed."""
    import selectors
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    got, eof, end = 0, 0, now() + seconds
    while sel.get_map() and now() < end:
        for key, _ in sel.select(0.2):
            try:
                b = key.fileobj.recv(1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                b = b""
            if b:
                got += len(b)
            else:
                eof += 1
                sel.unregister(key.fileobj)
    return got, eof


async def s2_hoarders(n, ctx):
    owner = "hoard-owner"
    pad = ("lorem ipsum dolor sit amet " * 4000)[:HOARD_MSG_BYTES - 20]
    t0 = now()
    lats, errs, nbytes, thread = await chat_user(n, owner, HOARD_MSGS, lambda k: f"part {k}: {pad}")
    build = {"messages": len(lats), "errors": errs, "bytes_received_live": nbytes,
             "thread_id": thread, "seconds": round(now() - t0, 2)}
    if len(lats) != HOARD_MSGS:
        raise RuntimeError(f"thread build incomplete: {build}")
    await asyncio.sleep(1)
    rss0, kmem0, fd0 = n.rss_mib(), sockstat_tcp_mib(), n.fds()
    tok = token(owner)
    sub = ws_frame(json.dumps({"type": "subscribe", "payload": {"thread_id": thread, "after_seq": 0}}))

    def open_all():
        socks = []
        for _ in range(HOARDERS):
            s = raw_ws_open(n.host, n.port, tok)
            s.sendall(sub)
            socks.append(s)
        return socks

    t_start_open = now()
    socks = await asyncio.to_thread(open_all)
    t_open = now()
    open_s = t_open - t_start_open
    samples = []

    async def sampler():
        while now() - t_open < 15.5:
            samples.append((round(now() - t_open, 1), round(n.rss_mib(), 1)))
            await asyncio.sleep(0.5)

    samp = asyncio.create_task(sampler())
    await asyncio.sleep(5 - (now() - t_open))
    rss5 = n.rss_mib()
    chat = await chat_round(n, "hoardchat")
    if now() - t_open < 15:
        await asyncio.sleep(15 - (now() - t_open))
    rss15 = n.rss_mib()
    await samp
    kmem15, fd15 = sockstat_tcp_mib(), n.fds()
    m = await metrics(n)
    got, eof = await asyncio.to_thread(drain, socks, 3)
    for s in socks:
        s.close()
    t_close = now()
    # netra has dropped the connections at once (see conns_after_close), but mimalloc keeps
    # the pages a worker freed until that worker allocates again: an idle netra may hold
    # them. Probing gives the workers something to do; 5 s at most.
    while n.rss_mib() > rss0 + 0.1 * (max(rss5, rss15) - rss0) and now() - t_close < 5:
        await http_get(n.host, n.port, "/health/ready", 2)
        await asyncio.sleep(0.2)
    conns_after = (await metrics(n)).get("netra_ws_connections")
    rss_after, freed_s = n.rss_mib(), now() - t_close
    peak = max(r for _, r in samples)
    growth = max(rss5, rss15, peak) - rss0
    per = growth / HOARDERS
    base = ctx.get("baseline_p99")
    ratio = round(chat["p99_ms"] / base, 2) if base and chat["p99_ms"] else None
    ok = (per < MAX_RSS_PER_HOARDER_MIB and ratio is not None and ratio <= MAX_P99_RATIO
          and chat["n"] == CHAT_USERS * CHAT_MSGS and not chat["errors"] and not chat["exceptions"])
    res = {"build": build, "rss_before_mib": round(rss0, 1), "rss_5s_mib": round(rss5, 1),
           "rss_15s_mib": round(rss15, 1), "rss_peak_mib": round(peak, 1),
           "rss_after_close_mib": round(rss_after, 1), "rss_after_close_s": round(freed_s, 1),
           "conns_after_close": conns_after, "open_100_s": round(open_s, 2),
           "rss_growth_mib": round(growth, 1), "rss_per_socket_mib": round(per, 3),
           "kernel_tcp_mem_mib": [round(kmem0, 1), round(kmem15, 1)], "fds": [fd0, fd15],
           "chat_under_hoarders": public(chat), "baseline_p99_ms": base, "p99_ratio": ratio,
           "hoarders_closed_by_server": eof, "hoarder_bytes_drained_after": got,
           "rss_samples": samples, "metrics": m, "pass": ok,
           "criterion": f"RSS growth < {MAX_RSS_PER_HOARDER_MIB} MiB per never-reading socket and "
                        f"others' p99 <= {MAX_P99_RATIO}x baseline, no chat errors"}
    summary = (f"{HOARDERS} hoarders on a {nbytes / 2**20:.1f} MiB thread ({HOARD_MSGS}x{HOARD_MSG_BYTES // 1000} KB "
               f"messages): RSS {rss0:.0f}→{rss5:.0f}→{rss15:.0f} MiB (+{growth:.1f}, {per:.2f} MiB/socket; "
               f"{rss_after:.0f} {freed_s:.0f} s after they closed, {'?' if conns_after is None else int(conns_after)} sockets left), {eof} closed by the server; kernel TCP mem "
               f"{kmem0:.0f}→{kmem15:.0f} MiB; "
               f"others p50 {chat['p50_ms']} / p99 {chat['p99_ms']} ms = {ratio}x baseline p99")
    return res, summary


# --- scenario 3 -----------------------------------------------------------------------
def failure_kind(e):
    if isinstance(e, websockets.exceptions.InvalidStatus):
        return f"http_{e.response.status_code}"
    if isinstance(e, websockets.exceptions.ConnectionClosed):
        return f"close_{e.rcvd.code if e.rcvd else 'none'}"
    if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
        return "timeout"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, OSError):
        return f"oserror_{e.errno}"
    return type(e).__name__


async def s3_storm(n, ctx):
    fd0 = n.fds()
    sem = asyncio.Semaphore(STORM_CONCURRENCY)
    conns, fails, t_hello = [], {}, []
    t0 = now()

    async def one(i):
        user = f"storm-u{i // STORM_PER_USER}"
        async with sem:
            try:
                ws = await ws_connect(n, user, open_timeout=20, max_queue=None)
                try:
                    await hello(ws, 20)
                except BaseException:
                    await ws.close()
                    raise
                conns.append(ws)
                t_hello.append(now() - t0)
            except Exception as e:
                k = failure_kind(e)
                fails[k] = fails.get(k, 0) + 1

    await asyncio.gather(*(one(i) for i in range(STORM_USERS * STORM_PER_USER)))
    all_hellos = round(max(t_hello), 2) if t_hello else None
    fd_peak, rss = n.fds(), round(n.rss_mib(), 1)
    ready_during = await http_get(n.host, n.port, "/health/ready", 5)
    tc = now()
    await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
    close_s = round(now() - tc, 2)
    await asyncio.sleep(1)
    st, lat = await http_get(n.host, n.port, "/health/ready", 5)
    undocumented = {k: v for k, v in fails.items() if k not in STORM_DOCUMENTED}
    ok = not undocumented and st == 200 and len(conns) + sum(fails.values()) == STORM_USERS * STORM_PER_USER
    res = {"sockets": STORM_USERS * STORM_PER_USER, "hellos": len(conns),
           "seconds_to_all_hellos": all_hellos, "hellos_per_s": round(len(conns) / all_hellos, 1) if all_hellos else None,
           "failures": fails, "close_all_s": close_s, "fds": [fd0, fd_peak, n.fds()],
           "rss_at_peak_mib": rss, "ready_at_peak": [ready_during[0], round(ready_during[1] * 1000, 1)],
           "ready_after": st, "ready_after_ms": round(lat * 1000, 1), "pass": ok,
           "criterion": f"no failures other than documented refusals ({', '.join(sorted(STORM_DOCUMENTED))}); "
                        "/health/ready 200 afterwards"}
    summary = (f"{len(conns)}/{STORM_USERS * STORM_PER_USER} hellos in {all_hellos} s, failures {fails or 'none'}; "
               f"ready after: {st} in {lat * 1000:.0f} ms")
    return res, summary


# --- scenario 4 -----------------------------------------------------------------------
async def flood_child(url):
    """The flooder, in its own process so that its 5000 sends and replies do not queue the
    chat clients' frames behind them in one event loop. Prints `ready`, waits for a line on
    stdin, floods, prints one JSON line."""
    counts = {"pong": 0, "rate_limited": 0, "other": 0}
    others = {}
    closed = None
    tok = token("flood-u0")
    async with connect(url, additional_headers={"Authorization": f"Bearer {tok}"}, ping_interval=None,
                       max_size=None, max_queue=None, open_timeout=15) as ws:
        await hello(ws)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        done = asyncio.Event()
        t_last = [now()]

        async def reader():
            nonlocal closed
            try:
                async for raw in ws:
                    m = json.loads(raw)
                    t_last[0] = now()
                    if m["type"] == "pong":
                        counts["pong"] += 1
                    elif m["type"] == "error" and m["payload"].get("code") == "rate_limited":
                        counts["rate_limited"] += 1
                    else:
                        counts["other"] += 1
                        k = m["type"] + ":" + str(m.get("payload", {}).get("code", ""))
                        others[k] = others.get(k, 0) + 1
                    if sum(counts.values()) >= FLOOD_PINGS:
                        done.set()
            except websockets.exceptions.ConnectionClosed as e:
                closed = e.rcvd.code if e.rcvd else "no close frame"
            done.set()

        rt = asyncio.create_task(reader())
        t0 = now()
        for _ in range(FLOOD_PINGS):
            await ws.send(json.dumps({"type": "ping", "timestamp": int(time.time() * 1000)}))
            await asyncio.sleep(0)  # lets the reader run; no pause
        t_sent = now() - t0
        try:
            await asyncio.wait_for(done.wait(), 30)
        except TimeoutError:
            pass
        t_flood = t_last[0] - t0
        # Still open? One more frame must be answered (rate_limited: the window has not passed).
        before = dict(counts)
        alive = False
        if closed is None:
            try:
                await ws.send(json.dumps({"type": "ping"}))
                for _ in range(50):
                    await asyncio.sleep(0.1)
                    if counts != before or closed is not None:
                        alive = closed is None
                        break
            except websockets.exceptions.ConnectionClosed as e:
                closed = e.rcvd.code if e.rcvd else "no close frame"
        rt.cancel()
    print(json.dumps({**before, "other_frames": others, "send_s": round(t_sent, 3),
                      "flood_s": round(t_flood, 3), "socket_closed": closed,
                      "answers_after_flood": alive}), flush=True)


async def s4_flood(n, ctx):
    child = await asyncio.create_subprocess_exec(
        sys.executable, os.path.abspath(__file__), "--flood-child", n.ws_url,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        ready = await asyncio.wait_for(child.stdout.readline(), 20)
        if ready.strip() != b"ready":
            raise RuntimeError(f"flood child: {ready!r}")
        chat = asyncio.create_task(chat_round(n, "floodchat"))
        t0 = now()
        child.stdin.write(b"go\n")
        await child.stdin.drain()
        fl = json.loads(await asyncio.wait_for(child.stdout.readline(), 60))
        chat = await chat
        await asyncio.wait_for(child.wait(), 10)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    lats = chat.pop("_lats")
    in_flood = [l for t, l in lats if t - t0 <= fl["flood_s"]]
    base = ctx.get("baseline_p99")
    ratio = round(chat["p99_ms"] / base, 2) if base and chat["p99_ms"] else None
    answered = fl["pong"] + fl["rate_limited"]
    ok = (fl["socket_closed"] is None and fl["answers_after_flood"] and fl["rate_limited"] > 0
          and fl["pong"] <= RATE_LIMIT and answered == FLOOD_PINGS and ratio is not None
          and ratio <= MAX_P99_RATIO and chat["n"] == CHAT_USERS * CHAT_MSGS and not chat["errors"]
          and not chat["exceptions"])
    res = {"pings": FLOOD_PINGS, **fl, "chat_during_flood": chat,
           "chat_msgs_sent_inside_flood": len(in_flood), "chat_p99_inside_flood_ms": pct(in_flood, 99),
           "baseline_p99_ms": base, "p99_ratio": ratio, "pass": ok,
           "criterion": f"socket stays open and answers, rate_limited counted, pongs <= {RATE_LIMIT}, "
                        f"every ping answered, other users' p99 <= {MAX_P99_RATIO}x baseline"}
    closed = fl["socket_closed"]
    summary = (f"{fl['pong']} pong, {fl['rate_limited']} rate_limited of {FLOOD_PINGS} in "
               f"{fl['flood_s']:.2f} s; socket {'open' if closed is None else f'closed {closed}'}; "
               f"others p50 {chat['p50_ms']} / p99 {chat['p99_ms']} ms = {ratio}x baseline p99 "
               f"({len(in_flood)}/{chat['n']} sent inside the flood)")
    return res, summary


# --- scenario 5 -----------------------------------------------------------------------
LORIS_BYTES = b"GET /health/ready HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200


async def loris_conn(n, t_end, rec):
    """One connection dripping a byte per second; records (opened_at, closed_after or None)."""
    t0 = now()
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(n.host, n.port), 5)
    except Exception as e:
        rec["connect_fail"][failure_kind(e)] = rec["connect_fail"].get(failure_kind(e), 0) + 1
        return
    t_open = now()
    rec["opened"] += 1
    closed_at, how = None, None

    async def watch():
        try:
            b = await r.read(4096)
            return "eof" if not b else f"answer:{b[:12]!r}"
        except (ConnectionResetError, BrokenPipeError):
            return "reset"

    wt = asyncio.create_task(watch())
    i = 0
    try:
        while now() < t_end:
            w.write(LORIS_BYTES[i:i + 1])
            i = (i + 1) % len(LORIS_BYTES)
            done, _ = await asyncio.wait({wt}, timeout=min(1.0, max(0.0, t_end - now())))
            if done:
                how = wt.result()
                closed_at = now() - t_open
                break
    except (ConnectionResetError, BrokenPipeError):
        how, closed_at = "reset", now() - t_open
    finally:
        wt.cancel()
        w.close()
    if closed_at is None:
        rec["survived"] += 1
    else:
        rec["closes"].append(round(closed_at, 2))
        rec["how"][how] = rec["how"].get(how, 0) + 1


async def loris_phase(n, reconnect):
    rec = {"opened": 0, "survived": 0, "closes": [], "how": {}, "connect_fail": {}}
    probes, fd_samples = [], []
    t_start = now()
    t_end = t_start + LORIS_ATTACK_S

    async def slot():
        while True:
            await loris_conn(n, t_end, rec)
            if not reconnect or now() + LORIS_RECONNECT_S >= t_end:
                return
            await asyncio.sleep(LORIS_RECONNECT_S)

    async def prober():
        await asyncio.sleep(0.25)
        while now() < t_end:
            st, lat = await http_get(n.host, n.port, "/health/ready", 3)
            probes.append((round(now() - t_start, 2), st, round(lat * 1000, 1)))
            await asyncio.sleep(0.25)

    async def fd_sampler():
        while now() < t_end + 0.5:
            fd_samples.append(n.fds())
            await asyncio.sleep(0.1)

    await asyncio.gather(*(slot() for _ in range(LORIS_CONNS)), prober(), fd_sampler())
    closes = rec.pop("closes")
    buckets = {"<0.5s": 0, "0.5-1.5s": 0, "1.5-3s": 0, "3-6s": 0, ">6s": 0}
    for c in closes:
        k = "<0.5s" if c < 0.5 else "0.5-1.5s" if c < 1.5 else "1.5-3s" if c < 3 else "3-6s" if c < 6 else ">6s"
        buckets[k] += 1
    bad = [p for p in probes if p[1] != 200 or p[2] > HEALTH_MAX_S * 1000]
    lat = [p[2] for p in probes if p[1] == 200]
    return {**rec, "closed": len(closes), "close_after_s": buckets,
            "close_after_median_s": pct(closes, 50), "fd_peak": max(fd_samples),
            "probes": len(probes), "probes_bad": bad[:10], "probes_bad_count": len(bad),
            "probe_p50_ms": pct(lat, 50), "probe_max_ms": pct(lat, 100)}


async def s5_slowloris(n, ctx):
    await asyncio.sleep(0.5)
    fd0 = n.fds()
    phases = {}
    for name, reconnect in (("A_once", False), ("B_reconnect", True)):
        phases[name] = await loris_phase(n, reconnect)
        t0 = now()
        while n.fds() > fd0 + FD_SLACK and now() - t0 < 5:
            await asyncio.sleep(0.1)
        phases[name]["fd_after"] = n.fds()
        phases[name]["fd_recovery_s"] = round(now() - t0, 2)
    st, lat = await http_get(n.host, n.port, "/health/ready", 3)
    ok = (all(p["probes_bad_count"] == 0 and p["probes"] > 0 for p in phases.values())
          and st == 200 and lat <= HEALTH_MAX_S and phases["B_reconnect"]["fd_after"] <= fd0 + FD_SLACK
          and phases["A_once"]["fd_after"] <= fd0 + FD_SLACK)
    res = {"header_timeout": "2s", "max_pending": 256, "fd_start": fd0, **phases,
           "ready_after": st, "ready_after_ms": round(lat * 1000, 1), "pass": ok,
           "criterion": f"every /health/ready during the attack 200 within {HEALTH_MAX_S} s, and after; "
                        f"descriptors after <= start + {FD_SLACK}"}
    a, b = phases["A_once"], phases["B_reconnect"]
    summary = (f"A: {a['closed']}/{a['opened']} closed by server {a['close_after_s']}, fd {fd0}→{a['fd_peak']}→{a['fd_after']}, "
               f"health {a['probes'] - a['probes_bad_count']}/{a['probes']} ok (max {a['probe_max_ms']} ms); "
               f"B (reconnecting, {b['opened']} conns): fd peak {b['fd_peak']}→{b['fd_after']}, "
               f"health {b['probes'] - b['probes_bad_count']}/{b['probes']} ok (max {b['probe_max_ms']} ms); "
               f"after: {st} in {lat * 1000:.0f} ms")
    return res, summary


# --- driver ---------------------------------------------------------------------------
SCENARIOS = [
    ("1", "baseline chat latency", s1_baseline, None, 90),
    ("2", "100 never-reading subscribers", s2_hoarders, None, 120),
    ("3", "connection storm", s3_storm, None, 90),
    ("4", "ping flood past the rate limit", s4_flood, None, 90),
    ("5", "slowloris", s5_slowloris,
     {"NETRA_HEADER_TIMEOUT": "2s", "NETRA_MAX_PENDING_CONNECTIONS": "256"}, 90),
]


async def run(args):
    only = set(args.only.split(",")) if args.only else None
    rows, lines, ctx = [], [], {}
    servers = {}
    t_all = now()
    try:
        for sid, title, fn, extra, limit in SCENARIOS:
            if only and sid not in only:
                continue
            key = json.dumps(extra, sort_keys=True)
            if key not in servers or not servers[key].alive():
                for other in list(servers.values()):  # one server at a time
                    other.stop()
                servers.clear()
                servers[key] = await Netra(args.netra, extra, tag=f"netra{' (' + ', '.join(f'{k}={v}' for k, v in extra.items()) + ')' if extra else ''}").start()
            n = servers[key]
            log(f"scenario {sid}: {title}")
            t0 = now()
            try:
                res, summary = await asyncio.wait_for(fn(n, ctx), limit)
            except Exception as e:
                res, summary = {"pass": False, "error": repr(e)[:500], "netra_stderr": n.log_tail(600)}, f"ERROR {e!r}"[:300]
            if not n.alive():
                res["pass"] = False
                res["netra_exited"] = n.proc.returncode
                summary += f" (netra exited {n.proc.returncode})"
            res = {"scenario": sid, "name": title, "seconds": round(now() - t0, 1), **res}
            line = json.dumps(res)
            print(line, flush=True)
            lines.append(line)
            rows.append((sid, title, summary, res.get("criterion", ""), "PASS" if res["pass"] else "FAIL"))
    finally:
        for s in servers.values():
            s.stop()
    total = now() - t_all
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=5).stdout.strip()
    except Exception:
        commit = "?"
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    table = [f"### {stamp}: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), "
             f"{mem:.1f} GiB RAM, {platform.machine()}, netra {commit}, total {total:.0f} s", "",
             "| # | scenario | result | criterion | verdict |", "|---|---|---|---|---|"]
    for sid, title, summary, crit, verdict in rows:
        table.append(f"| {sid} | {title} | {summary.replace('|', '/')} | {crit} | **{verdict}** |")
    md = "\n".join(table)
    print()
    print(md)
    if args.md and args.md != "-":
        new = not os.path.exists(args.md)
        with open(args.md, "a") as f:
            if new:
                f.write("# netra under abuse\n\nWritten by `bench/abuse` (criteria: the constants at the "
                        "top of `bench/abuse.py`); each run is appended, newest last. Raw JSON lines are "
                        "in each run's details.\n")
            f.write("\n" + md + "\n\n<details><summary>raw</summary>\n\n```\n" + "\n".join(lines)
                    + "\n```\n</details>\n")
        log(f"appended to {args.md}")
    return all(r[4] == "PASS" for r in rows)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--flood-child":
        asyncio.run(flood_child(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--netra", required=True, help="the netra binary")
    ap.add_argument("--md", default="bench/ABUSE.md", help="markdown file to append to ('-': none)")
    ap.add_argument("--only", help="comma-separated scenario numbers, e.g. 1,4")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    async def bounded():
        return await asyncio.wait_for(run(args), DEADLINE_S)

    ok = asyncio.run(bounded())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
