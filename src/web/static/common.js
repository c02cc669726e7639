// What both pages share: building elements with text only, and the light/dark choice
// (absent: follow the system; "light" or "dark": the person's pick, kept per browser).

const THEME_KEY = "netra.theme";

/** A new `tag` element with an optional class and text (set as text, never as HTML). */
export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function applyTheme() {
  const theme = localStorage.getItem(THEME_KEY);
  if (theme) document.documentElement.dataset.theme = theme;
  else delete document.documentElement.dataset.theme;
}

/** Switches to the other of light and dark than the one showing. */
export function toggleTheme() {
  const dark = document.documentElement.dataset.theme
    ? document.documentElement.dataset.theme === "dark"
    : matchMedia("(prefers-color-scheme: dark)").matches;
  localStorage.setItem(THEME_KEY, dark ? "light" : "dark");
  applyTheme();
}
