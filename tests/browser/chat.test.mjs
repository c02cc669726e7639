// A person's view of netra: headless Chromium opens the built-in chat page (`/`) of the
// real netra binary and types into it. Run with `node --test tests/browser/`; the binary
// is $NETRA_BIN (default $CARGO_TARGET_DIR/debug/netra) and the browser /usr/bin/chromium.
// Only 127.0.0.1 is ever contacted.

import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, openSync, closeSync, readFileSync, rmSync } from "node:fs";
import { tmpdir, homedir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const TARGET = process.env.CARGO_TARGET_DIR || join(homedir(), ".cache", "netra-target");
const BIN = process.env.NETRA_BIN || join(TARGET, "debug", "netra");
const CHROMIUM = process.env.NETRA_CHROMIUM || "/usr/bin/chromium";
const USER = "dev@example.com";
const ARITHMETIC = "what is 12 * (3 + 4)?";
// No arithmetic and no clock word: the builtin agent answers with ~35 words, streamed one by one.
const LONG = "please tell me a long story about a lighthouse keeper who collects shells";
const LONG_ENDING = "Set LLM_BASE_URL to talk to a real model.";
const TEST_TIMEOUT = 15_000;

/** Polls `probe` until it returns a truthy value, or fails after `ms` naming `what`. */
async function until(what, probe, ms = 5_000) {
  const end = Date.now() + ms;
  let last;
  for (;;) {
    last = await probe();
    if (last) return last;
    if (Date.now() >= end) throw new Error(`timed out after ${ms} ms waiting for ${what} (last: ${JSON.stringify(last)})`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Starts `netra serve` with an explicit environment and waits for /health/ready. */
async function startServer({ dataDir, port = 0, secret, delay }) {
  const logPath = join(dataDir, `stderr-${Date.now()}-${randomBytes(3).toString("hex")}.log`);
  const log = openSync(logPath, "w");
  const env = {
    PATH: process.env.PATH || "/usr/bin:/bin",
    PORT: String(port),
    NETRA_DATA_DIR: dataDir,
    JWT_SECRET: secret,
    NETRA_AGENT_TOKEN_DELAY: delay,
  };
  const child = spawn(BIN, ["serve"], { env, stdio: ["ignore", "pipe", log] });
  closeSync(log);
  const exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  const lines = createInterface({ input: child.stdout });
  const addr = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("no listening line within 10 s")), 10_000);
    lines.on("line", (line) => {
      const m = /^listening on http:\/\/(\S+)$/.exec(line);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`netra exited (${code ?? signal}) before listening:\n${readFileSync(logPath, "utf8")}`));
    });
  });
  // Keep draining stdout (the readline interface does) so the child never blocks.
  const base = `http://${addr}`;
  await until(
    `${base}/health/ready to answer 200`,
    async () => {
      try {
        return (await fetch(`${base}/health/ready`)).status === 200;
      } catch {
        return false;
      }
    },
    10_000,
  );
  return {
    addr,
    base,
    port: Number(addr.split(":").pop()),
    exited,
    /** SIGTERM, then wait for the exit (SIGKILL only if it hangs). */
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return exited;
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
      const result = await exited;
      clearTimeout(timer);
      return result;
    },
  };
}

function freshDataDir() {
  return mkdtempSync(join(tmpdir(), "netra-browser-"));
}

function secret() {
  return randomBytes(24).toString("hex");
}

/** Records every WebSocket frame the page sends and receives (parsed JSON). */
function recordFrames(page) {
  const frames = { received: [], sent: [] };
  page.on("websocket", (ws) => {
    ws.on("framereceived", ({ payload }) => frames.received.push(JSON.parse(payload)));
    ws.on("framesent", ({ payload }) => frames.sent.push(JSON.parse(payload)));
  });
  return frames;
}

async function text(page, selector) {
  return page.evaluate((s) => [...document.querySelectorAll(s)].map((e) => e.textContent), selector);
}

async function waitConnected(page) {
  await until(`header "connected as ${USER}"`, async () => (await page.textContent("#status")) === `connected as ${USER}`);
}

async function send(page, message) {
  await page.fill("#input", message);
  await page.press("#input", "Enter");
}

/** The assistant messages of a thread, read over REST with the page's own token. */
async function assistantMessages(base, page, threadId) {
  const token = await page.evaluate(() => sessionStorage.getItem("netra-token"));
  assert.ok(token, "the page stored its token in sessionStorage");
  const r = await fetch(`${base}/api/threads/${threadId}/messages?limit=100&offset=0`, {
    headers: { Authorization: `Bearer ${token}` },
  });
  assert.equal(r.status, 200);
  const body = await r.json();
  return body.messages.filter((m) => m.role === "assistant").map((m) => m.content);
}

/** Polls until the thread has `count` stored assistant messages: the page shows the last
 * streamed word slightly before the run's final_report is persisted. */
async function storedAnswers(base, page, threadId, count) {
  return until(`${count} stored assistant message(s)`, async () => {
    const m = await assistantMessages(base, page, threadId);
    return m.length === count && m;
  });
}

function createdThread(frames) {
  const f = frames.received.find((f) => f.type === "thread_created");
  return f && f.payload.thread_id;
}

let browser;
const cleanup = [];

before(async () => {
  assert.ok(existsSync(BIN), `netra binary not found at ${BIN}: build it or set NETRA_BIN`);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--disable-quic",
      "--no-first-run",
    ],
  });
});

after(async () => {
  await browser?.close();
  for (const f of cleanup.reverse()) await f();
});

describe("the built-in chat page at a steady pace (20 ms per word)", () => {
  let server;
  let dataDir;

  before(async () => {
    dataDir = freshDataDir();
    server = await startServer({ dataDir, secret: secret(), delay: "20ms" });
    cleanup.push(async () => {
      await server.stop();
      rmSync(dataDir, { recursive: true, force: true });
    });
  });

  test("a typed question is answered with the calculator and listed in the sidebar", { timeout: TEST_TIMEOUT }, async () => {
    const context = await browser.newContext();
    try {
      const page = await context.newPage();
      const frames = recordFrames(page);
      await page.goto(`${server.base}/`);
      // Dev login, then `/ws` offering `netra` and `jwt.<token>`: Chrome only opens the
      // socket when the server selects an offered protocol, so connecting proves it does.
      await waitConnected(page);
      assert.deepEqual(await text(page, "#threads li"), [], "a new user has no threads");

      await send(page, ARITHMETIC);
      assert.equal(await page.inputValue("#input"), "", "Enter sends and clears the input");
      assert.deepEqual(await text(page, ".msg.user"), [ARITHMETIC]);
      const [answer] = await until("an assistant bubble with 84", async () => {
        const bubbles = await text(page, ".msg.assistant");
        return bubbles.length === 1 && bubbles[0].includes("84") && bubbles;
      });
      assert.match(answer, /= 84\.$/);
      const steps = await text(page, ".step");
      assert.ok(
        steps.some((s) => s.startsWith("⚙ calculator ")),
        `a calculator step line is shown: ${JSON.stringify(steps)}`,
      );
      assert.ok(steps.some((s) => s.startsWith("✓ calculator → ") && s.includes("84")), JSON.stringify(steps));
      const titles = await until("the thread in the sidebar", async () => {
        const t = await text(page, "#threads li");
        return t.length === 1 && t;
      });
      assert.deepEqual(titles, [ARITHMETIC], "the sidebar lists the thread under its first message");
      assert.equal(await page.getAttribute("#threads li", "class"), "active");

      const threadId = createdThread(frames);
      assert.ok(threadId, "the page received thread_created");
      assert.deepEqual(await storedAnswers(server.base, page, threadId, 1), [answer]);
      assert.equal(frames.received.filter((f) => f.type === "error").length, 0, JSON.stringify(frames.received));
    } finally {
      await context.close();
    }
  });

  test("the answer is seen growing word by word and ends as the stored message", { timeout: TEST_TIMEOUT }, async () => {
    const context = await browser.newContext();
    try {
      const page = await context.newPage();
      const frames = recordFrames(page);
      await page.goto(`${server.base}/`);
      await waitConnected(page);
      await page.click("#new");
      await send(page, LONG);

      // Sample the bubble as fast as the browser answers, keeping each distinct text.
      const samples = [];
      const end = Date.now() + 10_000;
      for (;;) {
        const [bubble] = await text(page, ".msg.assistant");
        if (bubble !== undefined && bubble !== samples.at(-1)) samples.push(bubble);
        if (bubble !== undefined && bubble.endsWith(LONG_ENDING)) break;
        assert.ok(Date.now() < end, `the answer did not finish within 10 s; seen: ${JSON.stringify(samples)}`);
      }
      const final = samples.at(-1);
      const partial = samples.slice(0, -1);
      assert.ok(partial.length >= 2, `at least two partial texts seen before the final one: ${JSON.stringify(samples)}`);
      for (const [i, s] of partial.entries()) {
        assert.ok(s.length > 0 && s.length < final.length, `sample ${i} is shorter than the final text`);
        assert.ok(samples[i + 1].startsWith(s), `sample ${i + 1} extends sample ${i}: ${JSON.stringify(samples)}`);
      }
      assert.match(final, /^You wrote 13 words\. I am netra's builtin agent/);

      const threadId = createdThread(frames);
      assert.ok(threadId, "the page received thread_created");
      assert.deepEqual(await storedAnswers(server.base, page, threadId, 1), [final]);
      assert.deepEqual(await text(page, ".msg.assistant"), [final], "one bubble, still showing the final text");
    } finally {
      await context.close();
    }
  });

  test("a question typed in one tab is answered in the other tab too", { timeout: TEST_TIMEOUT }, async () => {
    const context = await browser.newContext();
    try {
      const tabA = await context.newPage();
      const tabB = await context.newPage();
      await tabA.goto(`${server.base}/`);
      await waitConnected(tabA);
      await tabB.goto(`${server.base}/`);
      await waitConnected(tabB);
      // Both tabs start on "New chat" (no thread selected), so each shows any thread's frames.
      await send(tabA, ARITHMETIC);

      const [inA] = await until("the answer in tab A", async () => {
        const b = await text(tabA, ".msg.assistant");
        return b.length === 1 && b[0].endsWith("= 84.") && b;
      });
      const [inB] = await until("the answer in tab B", async () => {
        const b = await text(tabB, ".msg.assistant");
        return b.length === 1 && b[0].endsWith("= 84.") && b;
      });
      assert.equal(inB, inA);
      assert.deepEqual(await text(tabB, ".msg.user"), [], "tab B did not type anything");
      const stepsB = await text(tabB, ".step");
      assert.ok(stepsB.some((s) => s.startsWith("⚙ calculator ")), JSON.stringify(stepsB));
      // Tab B learns the new thread from thread_created and lists it as the current one.
      await until("the new thread active in tab B's sidebar", async () =>
        tabB.evaluate(() => {
          const active = document.querySelector("#threads li.active");
          return active && active.textContent === "what is 12 * (3 + 4)?";
        }),
      );
    } finally {
      await context.close();
    }
  });
});

test("Stop ends a slow answer: the page shows stopped and the bubble stops growing", { timeout: TEST_TIMEOUT }, async () => {
  const delayMs = 300;
  const dataDir = freshDataDir();
  const server = await startServer({ dataDir, secret: secret(), delay: `${delayMs}ms` });
  const context = await browser.newContext();
  try {
    const page = await context.newPage();
    const frames = recordFrames(page);
    await page.goto(`${server.base}/`);
    await waitConnected(page);
    await send(page, LONG);
    // ~35 words at 300 ms each: the answer would take ~10 s. Stop once it is visibly streaming.
    await until("the answer to start streaming", async () => {
      const [b] = await text(page, ".msg.assistant");
      return b && b.length > 0;
    });
    await page.click("#stop");
    await until('the "stopped" step line', async () => (await text(page, ".step")).includes("stopped"));
    const atStop = await text(page, ".msg.assistant");
    assert.equal(atStop.length, 1);
    assert.ok(!atStop[0].endsWith(LONG_ENDING), `the answer was cut short: ${atStop[0]}`);

    const threadId = createdThread(frames);
    const ended = frames.received.filter((f) => f.type === "agent_completed" && f.thread_id === threadId);
    assert.equal(ended.length, 1);
    assert.equal(ended[0].payload.status, "cancelled");
    // Proving an absence needs a window: three word intervals in which a live run would
    // have added at least two words or a new bubble.
    await new Promise((r) => setTimeout(r, 3 * delayMs));
    assert.deepEqual(await text(page, ".msg.assistant"), atStop, "nothing more was streamed after stopped");
    const late = frames.received.filter(
      (f) => f.thread_id === threadId && ["partial_result", "final_report"].includes(f.type) && f.seq > ended[0].seq,
    );
    assert.deepEqual(late, [], "no frame of the run after agent_completed");
    assert.equal(frames.received.filter((f) => f.type === "final_report").length, 0);
    assert.deepEqual(await assistantMessages(server.base, page, threadId), [], "no answer was stored");
  } finally {
    await context.close();
    await server.stop();
    rmSync(dataDir, { recursive: true, force: true });
  }
});

test("after a server restart the page reconnects by itself, resumes and is answered", { timeout: TEST_TIMEOUT }, async () => {
  const dataDir = freshDataDir();
  const key = secret();
  let server = await startServer({ dataDir, secret: key, delay: "20ms" });
  const context = await browser.newContext();
  try {
    const page = await context.newPage();
    const frames = recordFrames(page);
    await page.goto(`${server.base}/`);
    await waitConnected(page);
    await send(page, ARITHMETIC);
    await until("the first answer", async () => (await text(page, ".msg.assistant"))[0]?.endsWith("= 84."));
    const threadId = createdThread(frames);
    await until("the final_report frame", async () => frames.received.some((f) => f.type === "final_report"));
    const lastSeq = Math.max(...frames.received.filter((f) => f.thread_id === threadId).map((f) => f.seq));

    const { port, base } = server;
    const exit = await server.stop();
    assert.equal(exit.code, 0, `netra exits 0 on SIGTERM (got ${JSON.stringify(exit)})`);
    await until("the page to notice the drop", async () => (await page.textContent("#status")).startsWith("disconnected ("));
    const sentBefore = frames.sent.length;

    server = await startServer({ dataDir, port, secret: key, delay: "20ms" });
    assert.equal(server.base, base, "the new server listens on the same address");
    await waitConnected(page);
    const subscribe = await until("the page's subscribe after reconnecting", async () =>
      frames.sent.slice(sentBefore).find((f) => f.type === "subscribe"),
    );
    assert.deepEqual(subscribe.payload, { thread_id: threadId, after_seq: lastSeq });

    await send(page, "and what is 6 * 7?");
    const bubbles = await until("the answer after the restart", async () => {
      const b = await text(page, ".msg.assistant");
      return b.length === 2 && b[1].includes("= 42.") && b[1].endsWith('"what is 12 * (3 + 4)?".') && b;
    });
    // The same thread went on: the agent saw the message sent before the restart.
    assert.match(bubbles[1], /Earlier in this thread \(1 message from you\)/);
    assert.deepEqual(await storedAnswers(server.base, page, threadId, 2), bubbles);
    const errors = frames.received.filter((f) => f.type === "error");
    assert.deepEqual(errors, [], "no error frame");
  } finally {
    await context.close();
    await server.stop();
    rmSync(dataDir, { recursive: true, force: true });
  }
});
