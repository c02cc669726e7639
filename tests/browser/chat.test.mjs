// A person's view of netra: headless Chromium opens the chat page (`/`) and the operator
// page (`/status`) of the real netra binary, signs in, types, reloads, stops. Run with
// `node --test tests/browser/`; the binary is $NETRA_BIN (default
// $CARGO_TARGET_DIR/debug/netra) and the browser /usr/bin/chromium. Only 127.0.0.1 is
// ever contacted. Screenshots go to $NETRA_SCREENSHOTS (default
// $CARGO_TARGET_DIR/browser-screenshots), outside the repository.

import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, openSync, closeSync, readFileSync, rmSync } from "node:fs";
import { tmpdir, homedir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const TARGET = process.env.CARGO_TARGET_DIR || join(homedir(), ".cache", "netra-target");
const BIN = process.env.NETRA_BIN || join(TARGET, "debug", "netra");
const CHROMIUM = process.env.NETRA_CHROMIUM || "/usr/bin/chromium";
const SHOTS = process.env.NETRA_SCREENSHOTS || join(TARGET, "browser-screenshots");
const ARITHMETIC = "what is 12 * (3 + 4)?";
// No arithmetic and no clock word: the builtin agent answers with ~35 words, streamed one by one.
const LONG = "please tell me a long story about a lighthouse keeper who collects shells";
const LONG_ENDING = "Set LLM_BASE_URL to talk to a real model.";
const TEST_TIMEOUT = 30_000;
// Within 80 characters, so the builtin agent quotes all of it back in its next answer:
// that is how an answer with markdown (and with hostile HTML) is produced offline.
const MARKDOWN = "**bold** `x`\n```js\nlet y = 2;\n```\n| a | b |\n|---|---|\n| 1 | 2 |\n- one\n- two";

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

/** A user name of its own for each test: tests share servers, never users. */
function someone(prefix) {
  return `${prefix}-${randomBytes(3).toString("hex")}`;
}

/** Records every WebSocket frame the page receives (parsed JSON), and every dialog,
 * page error and console error (a CSP violation is one), which the tests assert away. */
function watch(page) {
  const seen = { received: [], sent: [], dialogs: [], errors: [], outage: false };
  page.on("websocket", (ws) => {
    ws.on("framereceived", ({ payload }) => seen.received.push(JSON.parse(payload)));
    ws.on("framesent", ({ payload }) => seen.sent.push(JSON.parse(payload)));
  });
  page.on("dialog", (d) => {
    seen.dialogs.push(d.message());
    d.dismiss().catch(() => {});
  });
  page.on("pageerror", (e) => seen.errors.push(`pageerror: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    // While a test stops and restarts the server on purpose (`seen.outage`), Chromium logs
    // the refused socket and the answers of a server that is draining or not ready yet
    // (503) to the page's reconnect probes: not the page's fault. Outside that window
    // every one of them is an error.
    const outage = /WebSocket connection to .* failed|Failed to load resource: (net::ERR_CONNECTION_REFUSED|the server responded with a status of 503)/;
    if (seen.outage && outage.test(m.text())) return;
    seen.errors.push(m.text());
  });
  return seen;
}

function clean(seen) {
  assert.deepEqual(seen.dialogs, [], "no dialog opened");
  assert.deepEqual(seen.errors, [], "no page error, console error or CSP violation");
}

async function texts(page, selector) {
  return page.evaluate((s) => [...document.querySelectorAll(s)].map((e) => e.textContent), selector);
}

async function screenshot(page, name) {
  mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: join(SHOTS, `${name}.png`) });
}

async function waitConnected(page) {
  await page.waitForSelector("#conn[data-state=connected]", { timeout: 10_000 });
}

/** Opens the page and signs in with dev login under `name`. */
async function signIn(page, base, name) {
  await page.goto(`${base}/`);
  await page.waitForSelector("#signin-name", { state: "visible" });
  assert.equal(await page.inputValue("#signin-name"), "alice", "the name field starts as the README's alice");
  await page.fill("#signin-name", name);
  await page.click("#signin-submit");
  await waitConnected(page);
  assert.equal(await page.textContent("#whoami"), name);
}

async function send(page, message) {
  await page.fill("#input", message);
  await page.press("#input", "Enter");
}

const answers = (page) => texts(page, ".turn.assistant .answer");
const openThread = (page, user) => page.evaluate((u) => localStorage.getItem(`netra.thread.${u}`), user);

/** Waits for `n` finished assistant turns and returns their answers. */
async function settled(page, n, status = "completed") {
  await until(`${n} ${status} assistant turn(s)`, async () =>
    page.evaluate(
      ([n, status]) => {
        const turns = [...document.querySelectorAll(".turn.assistant")];
        return turns.length === n && turns.at(-1).dataset.status === status;
      },
      [n, status],
    ),
  10_000);
  return answers(page);
}

/** The thread's messages over REST, with the page's own token. */
async function storedMessages(base, page, threadId) {
  const token = await page.evaluate(() => localStorage.getItem("netra.token"));
  const r = await fetch(`${base}/api/threads/${threadId}/messages?limit=100&offset=0`, {
    headers: { Authorization: `Bearer ${token}` },
  });
  assert.equal(r.status, 200);
  return (await r.json()).messages;
}

/** Samples answer number `turns` as fast as the browser answers until the run settles; returns
 * every distinct text seen, the final one last. */
async function sampleUntilSettled(page, turns = 1, ms = 15_000) {
  const samples = [];
  const end = Date.now() + ms;
  for (;;) {
    const { text, status } = await page.evaluate((n) => {
      const turn = document.querySelectorAll(".turn.assistant")[n - 1];
      return { text: turn?.querySelector(".answer").textContent, status: turn?.dataset.status };
    }, turns);
    if (text !== undefined && text !== samples.at(-1)) samples.push(text);
    if (status && status !== "running") return { samples, status };
    assert.ok(Date.now() < end, `the run did not settle within ${ms} ms; seen: ${JSON.stringify(samples)}`);
  }
}

function assertGrowsByPrefix(samples, final) {
  for (const [i, s] of samples.entries()) {
    assert.ok(final.startsWith(s), `sample ${i} is a prefix of the final answer (nothing doubled or lost): ${JSON.stringify(s)} vs ${JSON.stringify(final)}`);
  }
}

let browser;
const cleanup = [];

/** A fresh browser profile whose actions fail fast, naming what they waited for. */
async function newContext(options = {}) {
  const context = await browser.newContext(options);
  context.setDefaultTimeout(8_000);
  return context;
}

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

describe("the chat page at a steady pace (20 ms per word)", () => {
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

  test("sign in, ask: tool chips, streamed answer, the thread listed; click to first token measured", { timeout: TEST_TIMEOUT }, async () => {
    const context = await newContext({ viewport: { width: 1200, height: 800 }, colorScheme: "light" });
    try {
      const page = await context.newPage();
      const seen = watch(page);
      const name = someone("alice");
      await signIn(page, server.base, name);
      assert.equal(await page.evaluate(() => document.activeElement.id), "input", "the message box has the focus");
      assert.deepEqual(await texts(page, "#threads li"), [], "a new user has no threads");
      assert.equal(await page.textContent("#conn-text"), `connected as ${name}`);

      // Shift+Enter adds a line, Enter sends.
      await page.fill("#input", "what is 12 * (3 + 4)");
      await page.press("#input", "Shift+Enter");
      await page.type("#input", "?");
      assert.equal(await page.inputValue("#input"), "what is 12 * (3 + 4)\n?");
      await page.fill("#input", ARITHMETIC);
      await page.click("#send");
      assert.equal(await page.inputValue("#input"), "", "sending clears the input");
      const [answer] = await settled(page, 1);
      assert.equal(answer, "12 * (3 + 4) = 84.");
      const [ms] = await page.evaluate(() =>
        performance.getEntriesByName("netra:click-to-first-token").map((e) => e.duration),
      );
      assert.ok(ms > 0, "the page measured click to first token");
      console.log(`click-to-first-token: ${ms.toFixed(1)} ms (debug build, 20 ms per word)`);

      assert.deepEqual(await texts(page, ".turn.user .text"), [ARITHMETIC]);
      assert.deepEqual(await texts(page, ".chip.tool .chip-name"), ["analyze_message", "calculator"]);
      await page.click('.chip.tool[data-tool="calculator"] summary');
      const chip = await page.evaluate(() => {
        const c = document.querySelector('.chip.tool[data-tool="calculator"]');
        return {
          open: c.open,
          done: c.classList.contains("done"),
          args: JSON.parse(c.querySelector(".chip-args").textContent),
          result: JSON.parse(c.querySelector(".chip-result").textContent),
          state: c.querySelector(".chip-state").textContent,
        };
      });
      assert.deepEqual(chip.args, { expression: "12 * (3 + 4)" });
      assert.equal(chip.result.value, "84");
      assert.ok(chip.open && chip.done, JSON.stringify(chip));
      assert.match(chip.state, /^\d+ ms$/, "the chip shows the tool's duration");
      assert.match(await page.getAttribute(".turn.assistant .run-foot", "title"), /answered in .*\ntools: analyze_message, calculator/);

      const titles = await until("the thread in the sidebar", async () => {
        const t = await texts(page, "#threads .thread-open");
        return t.length === 1 && t;
      });
      assert.deepEqual(titles, [ARITHMETIC]);
      assert.equal(await page.getAttribute("#threads li", "class"), "thread active");
      assert.equal(await page.textContent("#title"), ARITHMETIC);
      await screenshot(page, "chat-light");
      clean(seen);
    } finally {
      await context.close();
    }
  });

  test("the answer is seen growing word by word and ends as the stored message", { timeout: TEST_TIMEOUT }, async () => {
    const context = await newContext();
    try {
      const page = await context.newPage();
      const seen = watch(page);
      const name = someone("walt");
      await signIn(page, server.base, name);
      await send(page, LONG);
      const { samples, status } = await sampleUntilSettled(page);
      assert.equal(status, "completed");
      const final = samples.at(-1);
      assert.match(final, /^You wrote 13 words\. I am netra's builtin agent/);
      assert.ok(final.endsWith(LONG_ENDING));
      assert.ok(samples.length >= 3, `at least two partial texts before the final one: ${JSON.stringify(samples)}`);
      assertGrowsByPrefix(samples, final);
      const stored = await storedMessages(server.base, page, await openThread(page, name));
      assert.deepEqual(stored.map((m) => [m.role, m.content]), [["user", LONG], ["assistant", final]]);
      clean(seen);
    } finally {
      await context.close();
    }
  });

  test("markdown renders: bold, inline code, a code block with Copy, a table, a list (dark)", { timeout: TEST_TIMEOUT }, async () => {
    // The builtin agent writes no markdown of its own; it quotes the previous message back,
    // so the second answer carries MARKDOWN and is rendered as a model's answer would be.
    const context = await newContext({ viewport: { width: 1200, height: 800 }, colorScheme: "dark" });
    await context.grantPermissions(["clipboard-read", "clipboard-write"]);
    try {
      const page = await context.newPage();
      const seen = watch(page);
      await signIn(page, server.base, someone("mark"));
      await send(page, MARKDOWN);
      await settled(page, 1);
      assert.deepEqual(await texts(page, ".turn.user .text"), [MARKDOWN], "the user's own text shows as typed");
      await send(page, "and what did I write before?");
      await settled(page, 2);
      const md = await page.evaluate(() => {
        const a = [...document.querySelectorAll(".turn.assistant .answer")].at(-1);
        const all = (s) => [...a.querySelectorAll(s)].map((e) => e.textContent);
        return {
          strong: all("strong"),
          code: all(":not(pre) > code"),
          block: all(".codeblock pre code"),
          lang: all(".codeblock .lang"),
          th: all("th"),
          td: all("td"),
          li: all("li"),
        };
      });
      assert.deepEqual(md.strong, ["bold"]);
      assert.deepEqual(md.code, ["x"]);
      assert.deepEqual(md.block, ["let y = 2;"]);
      assert.deepEqual(md.lang, ["js"]);
      assert.deepEqual(md.th, ["a", "b"]);
      assert.deepEqual(md.td, ["1", "2"]);
      assert.deepEqual(md.li, ["one", 'two".']);
      await page.click(".turn.assistant >> nth=1 >> .codeblock .copy");
      await until("Copied", async () => (await page.textContent(".turn.assistant >> nth=1 >> .codeblock .copy")) === "Copied");
      assert.equal(await page.evaluate(() => navigator.clipboard.readText()), "let y = 2;");
      await page.evaluate(() => document.querySelector(".log").scrollTo(0, 1e6));
      await screenshot(page, "chat-dark");
      clean(seen);
    } finally {
      await context.close();
    }
  });

  test("the renderer turns hostile markdown into text and safe links only", { timeout: TEST_TIMEOUT }, async () => {
    const context = await newContext();
    try {
      const page = await context.newPage();
      const seen = watch(page);
      await page.goto(`${server.base}/`);
      const out = await page.evaluate(async () => {
        const { renderMarkdown } = await import("/static/markdown.js");
        const box = document.createElement("div");
        box.append(
          renderMarkdown(
            [
              "<script>alert(1)</script> <img src=x onerror=alert(2)>",
              "[a](javascript:alert(3)) [b](data:text/html,<b>x</b>) [c](https://example.com/x?y=1) <a href=x>d</a>",
              "```html\n<script>alert(4)</script>\n```",
              "| <b>t</b> | x |\n|---|---|\n| <i>u</i> | `<svg onload=alert(5)>` |",
              "see https://example.org/page. *em* ~~del~~ _u_ 2 * 3 * 4",
            ].join("\n\n"),
          ),
        );
        return {
          elements: [...box.querySelectorAll("*")].map((e) => e.tagName.toLowerCase()),
          links: [...box.querySelectorAll("a")].map((a) => [a.getAttribute("href"), a.rel, a.textContent]),
          text: box.textContent,
        };
      });
      for (const bad of ["script", "img", "svg", "b", "i"]) assert.ok(!out.elements.includes(bad), `no <${bad}> element: ${out.elements}`);
      assert.deepEqual(out.links, [
        ["https://example.com/x?y=1", "noopener noreferrer nofollow", "c"],
        ["https://example.org/page", "noopener noreferrer nofollow", "https://example.org/page"],
      ]);
      for (const shown of ["<script>alert(1)</script>", "<img src=x onerror=alert(2)>", "[a](javascript:alert(3))", "<svg onload=alert(5)>", "2 * 3 * 4"]) {
        assert.ok(out.text.includes(shown), `shown as text: ${shown}`);
      }
      assert.ok(out.elements.includes("em") && out.elements.includes("del"));
      clean(seen);
    } finally {
      await context.close();
    }
  });

  test("a message with <img onerror> and an answer with <script> render as text, also after reload", { timeout: TEST_TIMEOUT }, async () => {
    const context = await newContext();
    try {
      const page = await context.newPage();
      const seen = watch(page);
      await signIn(page, server.base, someone("eve"));
      const img = "<img src=x onerror=alert(1)>";
      const script = "<script>alert(2)</script>";
      await send(page, img);
      await settled(page, 1);
      await send(page, script);
      await settled(page, 2);
      await send(page, "what did I just write?");
      const all = await settled(page, 3);
      assert.ok(all[2].includes(`you wrote: "${script}".`), `the answer quotes the script tag: ${all[2]}`);
      for (const round of ["live", "after reload"]) {
        assert.deepEqual((await texts(page, ".turn.user .text")).slice(0, 2), [img, script], round);
        const found = await page.evaluate(() => ({
          img: document.querySelectorAll(".log img:not(.avatar), img[src=x]").length,
          script: document.querySelectorAll("body script").length,
        }));
        assert.deepEqual(found, { img: 0, script: 0 }, `no injected element ${round}`);
        await page.reload();
        await waitConnected(page);
        await settled(page, 3);
      }
      assert.deepEqual(seen.dialogs, [], "no alert ever fired");
      clean(seen);
    } finally {
      await context.close();
    }
  });

  test("threads: the last one reopens after reload; rename, search, new chat, delete", { timeout: TEST_TIMEOUT }, async () => {
    const context = await newContext();
    try {
      const page = await context.newPage();
      const seen = watch(page);
      await signIn(page, server.base, someone("tess"));
      await send(page, ARITHMETIC);
      await settled(page, 1);
      await page.click("#new");
      assert.equal(await page.textContent("#title"), "New chat");
      assert.equal(await page.locator(".turn").count(), 0);
      await send(page, "what is 6 * 7?");
      await settled(page, 1);
      await until("two threads listed", async () => (await texts(page, "#threads .thread-open")).length === 2);

      await page.reload();
      await waitConnected(page);
      assert.deepEqual(await settled(page, 1), ["6 * 7 = 42."], "the last open thread is back with its history");
      assert.deepEqual(await texts(page, ".turn.user .text"), ["what is 6 * 7?"]);

      // Rename the open thread (keyboard: Enter saves).
      await page.hover("#threads li.active");
      await page.click("#threads li.active .rename");
      await page.fill(".rename-input", "Answer to everything");
      await page.press(".rename-input", "Enter");
      await until("the new title", async () => (await texts(page, "#threads .thread-open")).includes("Answer to everything"));
      assert.equal(await page.textContent("#title"), "Answer to everything");

      await page.fill("#search", "12 *");
      assert.deepEqual(await texts(page, "#threads .thread-open"), [ARITHMETIC]);
      await page.fill("#search", "");

      // Delete asks once more inline, then the thread goes and the page is a new chat.
      await page.hover("#threads li.active");
      await page.click("#threads li.active .delete");
      await page.click("#threads li.active .delete");
      await until("one thread left", async () => (await texts(page, "#threads .thread-open")).length === 1);
      assert.equal(await page.textContent("#title"), "New chat");
      assert.deepEqual(await texts(page, "#threads .thread-open"), [ARITHMETIC]);
      clean(seen);
    } finally {
      await context.close();
    }
  });

  test("two tabs of one user both show the run; another user's page shows nothing of it", { timeout: TEST_TIMEOUT }, async () => {
    const mine = await newContext();
    const theirs = await newContext();
    try {
      const tabA = await mine.newPage();
      const seenA = watch(tabA);
      const name = someone("bob");
      await signIn(tabA, server.base, name);
      await send(tabA, ARITHMETIC);
      await settled(tabA, 1);
      const threadId = await openThread(tabA, name);

      // The second tab shares the sign-in and reopens the same thread.
      const tabB = await mine.newPage();
      const seenB = watch(tabB);
      await tabB.goto(`${server.base}/`);
      await waitConnected(tabB);
      await settled(tabB, 1);

      const other = await theirs.newPage();
      const seenOther = watch(other);
      await signIn(other, server.base, someone("mallory"));

      await send(tabA, LONG);
      const [a, b] = await Promise.all([sampleUntilSettled(tabA, 2), sampleUntilSettled(tabB, 2)]);
      assert.equal(b.samples.at(-1), a.samples.at(-1), "tab B ends with tab A's answer");
      assertGrowsByPrefix(b.samples, a.samples.at(-1));
      assert.ok(b.samples.length >= 2, "tab B saw the answer stream");
      assert.deepEqual(await texts(tabB, ".turn.user .text"), [ARITHMETIC, LONG]);

      // A rename in one tab shows in the other.
      await tabA.hover("#threads li.active");
      await tabA.click("#threads li.active .rename");
      await tabA.fill(".rename-input", "shared");
      await tabA.press(".rename-input", "Enter");
      await until("the rename in tab B", async () => (await texts(tabB, "#threads .thread-open")).includes("shared"));

      assert.deepEqual(await texts(other, "#threads li"), [], "the other user lists no thread");
      assert.equal(await other.locator(".turn").count(), 0);
      assert.ok(!seenOther.received.some((f) => f.thread_id === threadId), "no frame of the thread reached the other user");
      // Even told the thread's id, the other user's page gets nothing of it.
      await other.evaluate(([id, u]) => localStorage.setItem(`netra.thread.${u}`, id), [threadId, await other.textContent("#whoami")]);
      await other.reload();
      await waitConnected(other);
      await until("the page to give the foreign thread up", async () => (await other.textContent("#title")) === "New chat");
      assert.equal(await other.locator(".turn").count(), 0);
      assert.ok(!seenOther.received.some((f) => f.thread_id === threadId));
      clean(seenA);
      clean(seenB);
      clean(seenOther);
    } finally {
      await mine.close();
      await theirs.close();
    }
  });

  test("/status shows every startup component, health and live counters, and refreshes", { timeout: TEST_TIMEOUT }, async () => {
    const context = await newContext({ viewport: { width: 1200, height: 900 } });
    try {
      const page = await context.newPage();
      const seen = watch(page);
      const report = await (await fetch(`${server.base}/health/startup`)).json();
      await page.goto(`${server.base}/status`);
      const rows = await until("the startup table", async () => {
        const r = await page.evaluate(() =>
          [...document.querySelectorAll("#components tbody tr")].map((tr) => [tr.dataset.component, tr.cells[1].textContent]),
        );
        return r.length > 0 && r;
      });
      assert.deepEqual(rows, report.components.map((c) => [c.name, "ready"]));
      for (const name of ["store", "auth", "delivery", "agent_supervisor", "gateway", "self_test"]) {
        assert.ok(rows.some(([n]) => n === name), `${name} is listed`);
      }
      assert.equal(await page.textContent("#health"), "health: pass");
      assert.equal(await page.textContent("#ready"), "ready");
      const first = await page.textContent("#updated");
      await until("a refresh", async () => (await page.textContent("#updated")) !== first, 6_000);
      assert.match(await page.textContent("#m-connections"), /^\d+$/);
      assert.match(await page.textContent("#m-runs-sub"), /\d+ completed/);
      assert.match(await page.textContent("#m-latency"), /(µs|ms|s)$/);
      assert.ok((await page.locator("#c-events polyline").count()) === 1, "the events chart is drawn");
      mkdirSync(SHOTS, { recursive: true });
      await page.screenshot({ path: join(SHOTS, "status.png"), fullPage: true });
      clean(seen);
    } finally {
      await context.close();
    }
  });

  test("pages carry a CSP without inline script, nosniff, frame-ancestors none, and a favicon", async () => {
    for (const path of ["/", "/status", "/static/app.js", "/static/app.css"]) {
      const r = await fetch(`${server.base}${path}`);
      assert.equal(r.status, 200, path);
      const csp = r.headers.get("content-security-policy");
      assert.ok(csp && csp.includes("script-src 'self'") && !csp.includes("unsafe-inline"), `${path}: ${csp}`);
      assert.ok(csp.includes("frame-ancestors 'none'"), csp);
      assert.equal(r.headers.get("x-content-type-options"), "nosniff");
      if (path === "/" || path === "/status") {
        const html = await r.text();
        assert.ok(!/<script(?![^>]*\bsrc=)[^>]*>/.test(html), `${path} has no inline script`);
        assert.ok(!/\son\w+=/.test(html), `${path} has no inline handler`);
        assert.ok(html.includes('rel="icon" href="/favicon.svg"'), `${path} links the favicon`);
      }
    }
    for (const path of ["/favicon.svg", "/favicon.ico"]) {
      const r = await fetch(`${server.base}${path}`);
      assert.equal(r.status, 200);
      assert.equal(r.headers.get("content-type"), "image/svg+xml");
    }
  });

  test("at phone width the thread list folds away and the chat still works", { timeout: TEST_TIMEOUT }, async () => {
    const context = await newContext({ viewport: { width: 375, height: 740 }, isMobile: true, hasTouch: true });
    try {
      const page = await context.newPage();
      const seen = watch(page);
      await signIn(page, server.base, someone("pia"));
      assert.ok(!(await page.isVisible("#search")) || (await page.evaluate(() => document.querySelector("#sidebar").getBoundingClientRect().right <= 0)));
      await send(page, ARITHMETIC);
      await settled(page, 1);
      const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      assert.ok(overflow <= 0, `no horizontal scrolling (${overflow} px too wide)`);
      await page.click("#open-sidebar");
      await until("the thread list slid in", async () =>
        page.evaluate(() => document.querySelector("#sidebar").getBoundingClientRect().left >= 0),
      );
      await screenshot(page, "chat-phone-sidebar");
      await page.click("#threads .thread-open");
      await until("the thread list folded away", async () =>
        page.evaluate(() => document.querySelector("#sidebar").getBoundingClientRect().right <= 0),
      );
      await screenshot(page, "chat-phone");
      clean(seen);
    } finally {
      await context.close();
    }
  });
});

describe("a slow answer (word delays of 150-300 ms)", () => {
  test("Stop ends the run, keeps the partial answer and says so, also after a reload", { timeout: TEST_TIMEOUT }, async () => {
    const delayMs = 300;
    const dataDir = freshDataDir();
    const server = await startServer({ dataDir, secret: secret(), delay: `${delayMs}ms` });
    const context = await newContext();
    try {
      const page = await context.newPage();
      const seen = watch(page);
      const name = someone("stella");
      await signIn(page, server.base, name);
      await send(page, LONG);
      await until("the answer to start streaming", async () => (await answers(page))[0]?.length > 0);
      assert.ok(await page.isVisible("#stop"), "Stop shows while the answer streams");
      await page.click("#stop");
      const [partial] = await settled(page, 1, "cancelled");
      assert.ok(partial.length > 0 && !partial.endsWith(LONG_ENDING), `cut short: ${partial}`);
      assert.match(await page.textContent(".run-foot"), /^Stopped: the run was stopped — the answer above is partial$/);
      assert.ok(await page.isVisible("#send"), "Send is back");
      await new Promise((r) => setTimeout(r, 3 * delayMs));
      assert.deepEqual(await answers(page), [partial], "nothing more was streamed after Stop");

      await page.reload();
      await waitConnected(page);
      assert.deepEqual(await settled(page, 1, "cancelled"), [partial], "the partial answer is back after reload");
      assert.match(await page.textContent(".run-foot"), /^Stopped/);
      const stored = await storedMessages(server.base, page, await openThread(page, name));
      assert.deepEqual(stored.map((m) => m.role), ["user"], "a stopped run stores no answer message");
      await screenshot(page, "chat-stopped");
      clean(seen);
    } finally {
      await context.close();
      await server.stop();
      rmSync(dataDir, { recursive: true, force: true });
    }
  });

  test("reload mid-run: the run finishes on screen with every word once", { timeout: TEST_TIMEOUT }, async () => {
    const dataDir = freshDataDir();
    const server = await startServer({ dataDir, secret: secret(), delay: "150ms" });
    const context = await newContext();
    try {
      const page = await context.newPage();
      const seen = watch(page);
      const name = someone("rhea");
      await signIn(page, server.base, name);
      await send(page, LONG);
      await until("a few words", async () => ((await answers(page))[0] || "").split(" ").length >= 4);
      await page.reload();
      await waitConnected(page);
      const { samples, status } = await sampleUntilSettled(page);
      assert.equal(status, "completed");
      const final = samples.at(-1);
      assert.ok(final.endsWith(LONG_ENDING), final);
      assert.ok(samples.length >= 3, `the run went on streaming after the reload: ${JSON.stringify(samples)}`);
      assertGrowsByPrefix(samples, final);
      assert.deepEqual(await texts(page, ".turn.user .text"), [LONG], "the question shows once");
      assert.equal(await page.locator(".turn.assistant").count(), 1, "one answer");
      const stored = await storedMessages(server.base, page, await openThread(page, name));
      assert.equal(stored.at(-1).content, final);
      // The page asked for the thread from the start, then applied each seq exactly once.
      const subscribe = seen.sent.find((f) => f.type === "subscribe");
      assert.equal(subscribe.payload.after_seq, 0);
      clean(seen);
    } finally {
      await context.close();
      await server.stop();
      rmSync(dataDir, { recursive: true, force: true });
    }
  });

  test("the network drops mid-run: the page reconnects, resumes by seq and shows every word once", { timeout: TEST_TIMEOUT }, async () => {
    const dataDir = freshDataDir();
    const server = await startServer({ dataDir, secret: secret(), delay: "150ms" });
    const context = await newContext();
    try {
      const page = await context.newPage();
      const seen = watch(page);
      // Every socket of the page goes through the test, which can cut it like a network would.
      const sockets = [];
      await page.routeWebSocket(/\/ws$/, (ws) => {
        ws.connectToServer();
        sockets.push(ws);
      });
      const name = someone("nia");
      await signIn(page, server.base, name);
      await send(page, LONG);
      await until("a few words", async () => ((await answers(page))[0] || "").split(" ").length >= 4);
      const before = await answers(page);
      const sentBefore = seen.sent.length;
      await sockets.at(-1).close({ code: 1006, reason: "network drop" }).catch(() => {});
      await until("the page to show it reconnects", async () => (await page.getAttribute("#conn", "data-state")) !== "connected");
      await waitConnected(page);
      assert.equal(sockets.length, 2, "one new socket");
      const { samples, status } = await sampleUntilSettled(page);
      assert.equal(status, "completed");
      const final = samples.at(-1);
      assert.ok(final.endsWith(LONG_ENDING), final);
      assert.ok(final.startsWith(before[0]));
      assertGrowsByPrefix(samples, final);
      const subscribe = seen.sent.slice(sentBefore).find((f) => f.type === "subscribe");
      assert.ok(subscribe && subscribe.payload.after_seq > 0, `resumed after the last seq shown: ${JSON.stringify(subscribe)}`);
      assert.equal(await page.locator(".turn.assistant").count(), 1);
      assert.deepEqual(await texts(page, ".turn.user .text"), [LONG]);
      clean(seen);
    } finally {
      await context.close();
      await server.stop();
      rmSync(dataDir, { recursive: true, force: true });
    }
  });

  test("a server restart mid-run: the page shows reconnecting, resumes by seq, nothing doubled", { timeout: TEST_TIMEOUT }, async () => {
    const dataDir = freshDataDir();
    const key = secret();
    let server = await startServer({ dataDir, secret: key, delay: "20ms" });
    const context = await newContext();
    try {
      const page = await context.newPage();
      const seen = watch(page);
      const name = someone("ray");
      await signIn(page, server.base, name);
      await send(page, ARITHMETIC);
      await settled(page, 1);
      const threadId = await openThread(page, name);
      const lastSeq = Math.max(...seen.received.filter((f) => f.thread_id === threadId).map((f) => f.seq));

      const { port, base } = server;
      seen.outage = true;
      const exit = await server.stop();
      assert.equal(exit.code, 0);
      await until("the page to show it reconnects", async () =>
        ["reconnecting", "offline"].includes(await page.getAttribute("#conn", "data-state")),
      );
      const sentBefore = seen.sent.length;
      server = await startServer({ dataDir, port, secret: key, delay: "20ms" });
      assert.equal(server.base, base);
      await waitConnected(page);
      seen.outage = false;
      const subscribe = await until("the subscribe after reconnecting", async () =>
        seen.sent.slice(sentBefore).find((f) => f.type === "subscribe"),
      );
      assert.deepEqual(subscribe.payload, { thread_id: threadId, after_seq: lastSeq });

      await send(page, "and what is 6 * 7?");
      const all = await settled(page, 2);
      assert.match(all[1], /^6 \* 7 = 42\. Earlier in this thread \(1 message from you\)/);
      assert.deepEqual(await texts(page, ".turn.user .text"), [ARITHMETIC, "and what is 6 * 7?"]);
      clean(seen);
    } finally {
      await context.close();
      await server.stop();
      rmSync(dataDir, { recursive: true, force: true });
    }
  });
});
