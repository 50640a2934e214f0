/*! webchat embed snippet: adds a chat button to this page and opens webchat in an iframe.
 *
 *   <script src="https://chat.example.com/embed.js" async
 *           data-title="Ask us" data-position="bottom-right" data-color="#0a7d55"
 *           data-theme="auto" data-lang="en" data-open="false"></script>
 *
 * Nothing of webchat runs in this page: the chat lives in the iframe, on webchat's own
 * origin. This page may steer it with window.webchat.open(), .close(), .toggle(),
 * .isOpen() and .setTheme({color: "#0a7d55", scheme: "light" | "dark" | "auto"}).
 */
(function () {
  "use strict";

  var script = document.currentScript;
  if (!script || window.webchat) { return; }

  var origin = new URL(script.src, location.href).origin;
  var data = script.dataset;
  var left = data.position === "bottom-left";
  var title = data.title || "Chat";
  var color = /^#([0-9a-f]{3}|[0-9a-f]{6})$/i.test(data.color || "") ? data.color : "";
  var scheme = data.theme === "light" || data.theme === "dark" ? data.theme : "auto";

  var params = new URLSearchParams();
  if (scheme !== "auto") { params.set("theme", scheme); }
  if (color) { params.set("color", color); }
  if (/^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8}){0,3}$/.test(data.lang || "")) { params.set("lang", data.lang); }
  if (data.sidebar === "true") { params.set("sidebar", "1"); }
  var src = origin + "/embed" + (params.toString() ? "?" + params.toString() : "");

  // A shadow root keeps this page's CSS off the button and panel, and theirs off it.
  var host = document.createElement("div");
  host.setAttribute("data-webchat", "");
  var shadow = host.attachShadow({ mode: "open" });
  var side = left ? "left" : "right";
  var accent = color || "#2456c6";
  var css = [
    ":host { all: initial; }",
    ".launcher { position: fixed; bottom: 20px; " + side + ": 20px; z-index: 2147483000;",
    "  font: 600 15px/1 system-ui, sans-serif; color: #fff; background: " + accent + ";",
    "  border: 0; border-radius: 999px; padding: 14px 20px; cursor: pointer;",
    "  box-shadow: 0 4px 16px rgba(0,0,0,.25); }",
    ".launcher:focus-visible { outline: 3px solid " + accent + "; outline-offset: 3px; }",
    ".panel { position: fixed; bottom: 84px; " + side + ": 20px; z-index: 2147483000;",
    "  width: min(400px, calc(100vw - 24px)); height: min(620px, calc(100vh - 110px));",
    "  display: flex; flex-direction: column; border-radius: 14px; overflow: hidden;",
    "  background: #fff; box-shadow: 0 8px 40px rgba(0,0,0,.3); }",
    ".panel[hidden] { display: none; }",
    ".bar { display: flex; align-items: center; gap: 8px; padding: 8px 8px 8px 14px;",
    "  background: " + accent + "; color: #fff; font: 600 14px/1.2 system-ui, sans-serif; }",
    ".bar span { flex: 1; overflow: hidden; white-space: nowrap; text-overflow: ellipsis; }",
    ".close { font: inherit; font-size: 20px; line-height: 1; color: inherit; background: none;",
    "  border: 0; border-radius: 6px; padding: 2px 8px; cursor: pointer; }",
    "iframe { flex: 1; width: 100%; border: 0; background: #fff; }",
    "@media (max-width: 480px) { .panel { inset: 0; width: auto; height: auto; border-radius: 0; } }"
  ].join("\n");
  if ("adoptedStyleSheets" in shadow && typeof CSSStyleSheet === "function") {
    var sheet = new CSSStyleSheet();
    sheet.replaceSync(css);
    shadow.adoptedStyleSheets = [sheet];
  } else {
    var style = document.createElement("style");
    style.textContent = css;
    shadow.appendChild(style);
  }

  var launcher = document.createElement("button");
  launcher.type = "button";
  launcher.className = "launcher";
  launcher.textContent = title;
  launcher.setAttribute("aria-expanded", "false");
  launcher.setAttribute("aria-controls", "webchat-panel");

  var panel = document.createElement("div");
  panel.className = "panel";
  panel.id = "webchat-panel";
  panel.hidden = true;
  panel.setAttribute("role", "dialog");
  panel.setAttribute("aria-label", title);
  var bar = document.createElement("div");
  bar.className = "bar";
  var label = document.createElement("span");
  label.textContent = title;
  var closeButton = document.createElement("button");
  closeButton.type = "button";
  closeButton.className = "close";
  closeButton.setAttribute("aria-label", "Close chat");
  closeButton.textContent = "\u00d7";
  bar.appendChild(label);
  bar.appendChild(closeButton);
  panel.appendChild(bar);
  shadow.appendChild(panel);
  shadow.appendChild(launcher);

  var frame = null; // made on first open: a page that never opens the chat loads nothing
  var theme = { color: color, scheme: scheme };

  function post(message) {
    if (frame && frame.contentWindow) { frame.contentWindow.postMessage(message, origin); }
  }

  function sendTheme() {
    post({ type: "webchat:theme", color: theme.color, scheme: theme.scheme });
  }

  function ensureFrame() {
    if (frame) { return; }
    frame = document.createElement("iframe");
    frame.src = src;
    frame.title = title;
    frame.setAttribute("allow", "clipboard-write");
    frame.addEventListener("load", function () {
      sendTheme();
      if (isOpen()) { post({ type: "webchat:focus" }); }
    });
    panel.appendChild(frame);
  }

  function isOpen() { return !panel.hidden; }

  function open() {
    ensureFrame();
    panel.hidden = false;
    launcher.setAttribute("aria-expanded", "true");
    frame.focus();
    post({ type: "webchat:focus" });
  }

  function close() {
    panel.hidden = true;
    launcher.setAttribute("aria-expanded", "false");
  }

  function toggle() { if (isOpen()) { close(); } else { open(); } }

  function setTheme(next) {
    next = next || {};
    if (/^#([0-9a-f]{3}|[0-9a-f]{6})$/i.test(next.color || "")) {
      theme.color = next.color;
      launcher.style.background = next.color;
      bar.style.background = next.color;
    }
    if (next.scheme === "light" || next.scheme === "dark" || next.scheme === "auto") { theme.scheme = next.scheme; }
    sendTheme();
  }

  launcher.addEventListener("click", toggle);
  closeButton.addEventListener("click", function () { close(); launcher.focus(); });
  panel.addEventListener("keydown", function (event) {
    if (event.key === "Escape") { close(); launcher.focus(); }
  });

  window.webchat = { open: open, close: close, toggle: toggle, isOpen: isOpen, setTheme: setTheme };

  function mount() {
    document.body.appendChild(host);
    if (data.open === "true") { open(); }
  }
  if (document.body) { mount(); } else { document.addEventListener("DOMContentLoaded", mount); }
})();
