// A small markdown renderer for chat answers. It builds DOM nodes and puts every piece
// of text in with createTextNode/textContent, never innerHTML: whatever a model or a user
// writes ("<script>", "<img onerror>", "javascript:" links) ends up as visible text.
// Covered: paragraphs (single newlines break lines), headings, bold, italic,
// strikethrough, inline code, fenced code blocks with a Copy button (an unclosed fence,
// as while streaming, runs to the end), ordered and unordered lists (nested by indent),
// block quotes, tables, horizontal rules, [links](https://…) and bare https:// URLs.
// Links are http(s) only and open with rel=noopener.

import { el } from "./common.js";

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}>\s?(.*)$/;
const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

/** Renders `source` into a DocumentFragment. */
export function renderMarkdown(source) {
  const fragment = document.createDocumentFragment();
  blocks(String(source).replace(/\r\n?/g, "\n").split("\n"), fragment);
  return fragment;
}

const indentOf = (line) => line.match(/^\s*/)[0].length;
const isBlank = (line) => line.trim() === "";
const isTableStart = (lines, i) => lines[i].includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].includes("-");

function startsBlock(lines, i) {
  const line = lines[i];
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line) || isTableStart(lines, i);
}

function blocks(lines, parent) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (isBlank(line)) {
      i++;
      continue;
    }
    let m;
    if ((m = FENCE.exec(line))) {
      const marker = m[1];
      const body = [];
      i++;
      while (i < lines.length && !new RegExp(`^ {0,3}${marker[0]}{${marker.length},}\\s*$`).test(lines[i])) body.push(lines[i++]);
      i++; // the closing fence, if any
      parent.appendChild(codeBlock(body.join("\n"), m[2]));
    } else if (RULE.test(line)) {
      parent.appendChild(el("hr"));
      i++;
    } else if ((m = HEADING.exec(line))) {
      const h = el(`h${Math.min(m[1].length + 2, 6)}`);
      inline(m[2], h);
      parent.appendChild(h);
      i++;
    } else if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) {
        inner.push(m[1]);
        i++;
      }
      const quote = el("blockquote");
      blocks(inner, quote);
      parent.appendChild(quote);
    } else if (isTableStart(lines, i)) {
      i = table(lines, i, parent);
    } else if (ITEM.test(line)) {
      i = list(lines, i, parent);
    } else {
      const text = [line];
      i++;
      while (i < lines.length && !isBlank(lines[i]) && !startsBlock(lines, i)) text.push(lines[i++]);
      const p = el("p");
      inline(text.join("\n"), p);
      parent.appendChild(p);
    }
  }
}

function codeBlock(code, language) {
  const wrap = el("div", "codeblock");
  const head = el("div", "codehead");
  head.appendChild(el("span", "lang", language || "code"));
  const copy = el("button", "copy", "Copy");
  copy.type = "button";
  copy.setAttribute("aria-label", `Copy ${language || "code"} to the clipboard`);
  copy.addEventListener("click", () => copyText(code, copy));
  head.appendChild(copy);
  const pre = el("pre");
  pre.tabIndex = 0;
  pre.appendChild(el("code", "", code));
  wrap.append(head, pre);
  return wrap;
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // No clipboard API (an insecure origin): copy through a selected, hidden textarea.
    const area = el("textarea", "visually-hidden");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  button.classList.add("done");
  setTimeout(() => {
    button.textContent = "Copy";
    button.classList.remove("done");
  }, 1500);
}

function splitRow(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
}

function table(lines, i, parent) {
  const header = splitRow(lines[i]);
  const aligns = splitRow(lines[i + 1]).map((c) => (c.endsWith(":") ? (c.startsWith(":") ? "center" : "right") : c.startsWith(":") ? "left" : ""));
  const wrap = el("div", "tablewrap");
  const t = el("table");
  const head = el("thead");
  const headRow = el("tr");
  header.forEach((cell, c) => {
    const th = el("th");
    th.scope = "col";
    if (aligns[c]) th.dataset.align = aligns[c];
    inline(cell, th);
    headRow.appendChild(th);
  });
  head.appendChild(headRow);
  t.appendChild(head);
  const body = el("tbody");
  i += 2;
  while (i < lines.length && !isBlank(lines[i]) && lines[i].includes("|")) {
    const tr = el("tr");
    const cells = splitRow(lines[i]);
    header.forEach((_, c) => {
      const td = el("td");
      if (aligns[c]) td.dataset.align = aligns[c];
      inline(cells[c] || "", td);
      tr.appendChild(td);
    });
    body.appendChild(tr);
    i++;
  }
  t.appendChild(body);
  wrap.appendChild(t);
  parent.appendChild(wrap);
  return i;
}

function list(lines, i, parent) {
  const first = ITEM.exec(lines[i]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  while (i < lines.length) {
    const m = ITEM.exec(lines[i]);
    if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
    const contentIndent = indent + m[2].length + 1;
    const item = [m[3]];
    i++;
    while (i < lines.length) {
      const line = lines[i];
      if (isBlank(line)) {
        // A blank line ends the item unless the next line is indented under it.
        let j = i + 1;
        while (j < lines.length && isBlank(lines[j])) j++;
        if (j < lines.length && indentOf(lines[j]) >= contentIndent) {
          item.push("");
          i++;
          continue;
        }
        break;
      }
      const lineIndent = indentOf(line);
      if (lineIndent <= indent && startsBlock(lines, i)) break;
      item.push(line.slice(Math.min(lineIndent, contentIndent)));
      i++;
    }
    const li = el("li");
    blocks(item, li);
    // A one-paragraph item shows its text directly, as a tight list does.
    if (li.children.length >= 1 && li.firstElementChild.tagName === "P") {
      const p = li.firstElementChild;
      p.replaceWith(...p.childNodes);
    }
    node.appendChild(li);
  }
  parent.appendChild(node);
  return i;
}

// Inline spans, tried at every position; the earliest match wins, ties go to the first.
const SPANS = [
  ["escape", /\\([\\`*_{}[\]()#+\-.!~|>])/g],
  ["code", /(`+)([\s\S]*?[^`])\1(?!`)/g],
  ["link", /\[([^\]\n]+)\]\(\s*<?([^\s<>()]+)>?(?:\s+"[^"\n]*")?\s*\)/g],
  ["url", /https?:\/\/[^\s<>"'`]+/g],
  ["strong", /\*\*(?=\S)([\s\S]*?\S)\*\*|__(?=\S)([\s\S]*?\S)__(?!\w)/g],
  ["del", /~~(?=\S)([\s\S]*?\S)~~/g],
  ["em", /\*(?=[^\s*])([\s\S]*?[^\s*])\*(?!\*)|(?<![\w])_(?=[^\s_])([\s\S]*?[^\s_])_(?![\w])/g],
];

/** Appends the inline content of `text` to `parent`. */
export function inline(text, parent) {
  let pos = 0;
  while (pos < text.length) {
    let best = null;
    for (const [kind, re] of SPANS) {
      re.lastIndex = pos;
      const m = re.exec(text);
      if (m && (!best || m.index < best.m.index)) best = { kind, m };
    }
    if (!best) break;
    const { kind, m } = best;
    addText(text.slice(pos, m.index), parent);
    pos = m.index + m[0].length;
    switch (kind) {
      case "escape":
        addText(m[1], parent);
        break;
      case "code":
        parent.appendChild(el("code", "", m[2].replace(/^ (.*) $/s, "$1")));
        break;
      case "link": {
        const a = link(m[2]);
        if (a) {
          inline(m[1], a);
          parent.appendChild(a);
        } else {
          addText(m[0], parent);
        }
        break;
      }
      case "url": {
        // Trailing punctuation belongs to the sentence, not to the address.
        const url = m[0].replace(/[.,;:!?)\]]+$/, "");
        pos = m.index + url.length;
        const a = link(url);
        if (a) {
          a.textContent = url;
          parent.appendChild(a);
        } else {
          addText(url, parent);
        }
        break;
      }
      default: {
        const node = el(kind);
        inline(m[1] ?? m[2], node);
        parent.appendChild(node);
      }
    }
  }
  addText(text.slice(pos), parent);
}

function link(href) {
  let url;
  try {
    url = new URL(href);
  } catch {
    return null;
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") return null;
  const a = el("a");
  a.href = url.href;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  return a;
}

function addText(text, parent) {
  if (!text) return;
  const parts = text.split("\n");
  parts.forEach((part, k) => {
    if (k > 0) parent.appendChild(el("br"));
    if (part) parent.appendChild(document.createTextNode(part));
  });
}
