// webchat's own script: only what htmx can't do (Enter to send, Esc to stop,
// copy buttons, keeping the newest text in view, announcing state changes).
(function () {
  "use strict";

  var stick = true; // follow new text until the reader scrolls up

  function scroller() { return document.getElementById("scroller"); }
  function composer() { return document.getElementById("composer"); }
  function textBox() { return document.getElementById("composer-text"); }

  // The page's words for this script, in the reader's language (data-i18n-* on <body>).
  function phrase(key) {
    return (document.body && document.body.getAttribute("data-i18n-" + key)) || "";
  }

  // Code blocks come from the Markdown renderer, which speaks English: relabel their copy
  // buttons (they only work with this script anyway).
  function labelCopyButtons() {
    var label = phrase("copy"), name = phrase("copy-code");
    if (!label) { return; }
    var buttons = document.querySelectorAll(".code button.copy:not([data-labelled])");
    for (var i = 0; i < buttons.length; i++) {
      buttons[i].textContent = label;
      if (name) { buttons[i].setAttribute("aria-label", name); }
      buttons[i].setAttribute("data-labelled", "");
    }
  }

  function announce(text) {
    var el = document.getElementById("announcer");
    if (el) { el.textContent = text; }
  }

  function nearBottom(el) {
    return el.scrollHeight - el.scrollTop - el.clientHeight < 80;
  }

  function follow() {
    var el = scroller();
    if (el && stick) { el.scrollTop = el.scrollHeight; }
  }

  function fitTextBox() {
    var box = textBox();
    if (!box) { return; }
    box.style.height = "auto";
    box.style.height = Math.min(box.scrollHeight, 240) + "px";
  }

  function streamingStop() {
    var buttons = document.querySelectorAll(".msg[aria-busy=true] [data-stop]");
    return buttons.length ? buttons[buttons.length - 1] : null;
  }

  function copyText(text, button) {
    var done = function () {
      var old = button.textContent;
      button.textContent = button.getAttribute("data-copied") || phrase("copied");
      setTimeout(function () { button.textContent = old; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () {});
    } else {
      var area = document.createElement("textarea");
      area.value = text;
      document.body.appendChild(area);
      area.select();
      try { document.execCommand("copy"); done(); } catch (e) { /* nothing to do */ }
      area.remove();
    }
  }

  // The server groups the sidebar by day in the reader's time zone.
  try {
    var zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
    if (zone && document.cookie.indexOf("tz=" + encodeURIComponent(zone)) === -1) {
      document.cookie = "tz=" + encodeURIComponent(zone) + "; path=/; max-age=31536000; samesite=lax";
    }
  } catch (e) { /* no Intl: UTC it is */ }

  function currentTheme() {
    var set = document.documentElement.getAttribute("data-theme");
    if (set) { return set; }
    return window.matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  }

  document.addEventListener("DOMContentLoaded", function () {
    labelCopyButtons();
    var el = scroller();
    if (el) {
      el.addEventListener("scroll", function () { stick = nearBottom(el); }, { passive: true });
      el.scrollTop = el.scrollHeight;
    }
    var box = textBox();
    if (box) {
      box.addEventListener("input", fitTextBox);
      box.addEventListener("keydown", function (event) {
        if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
          event.preventDefault();
          if (box.value.trim()) { composer().requestSubmit(); }
        }
      });
    }
  });

  document.addEventListener("keydown", function (event) {
    if (event.key === "Escape") {
      var stop = streamingStop();
      if (stop) { event.preventDefault(); stop.click(); }
    }
  });

  document.addEventListener("click", function (event) {
    var target = event.target;
    if (!(target instanceof Element)) { return; }
    var toggle = target.closest("button.theme-toggle");
    if (toggle) {
      // Switch at once; the cookie makes the server render the same colours next time.
      event.preventDefault();
      var next = currentTheme() === "dark" ? "light" : "dark";
      document.documentElement.setAttribute("data-theme", next);
      document.cookie = "theme=" + next + "; path=/; max-age=31536000; samesite=lax";
      return;
    }
    var code = target.closest("button.copy");
    if (code) {
      var pre = code.closest(".code");
      var codeEl = pre && pre.querySelector("pre code, pre");
      if (codeEl) { copyText(codeEl.textContent, code); }
      return;
    }
    var reply = target.closest("button.copy-reply");
    if (reply) {
      var msg = document.getElementById(reply.getAttribute("data-copy-target"));
      var source = msg && msg.querySelector("template.source");
      if (source) { copyText(source.content.textContent, reply); }
    }
  });

  // Forms that come back to this page (language, colours) say where it is; htmx may have
  // changed the address since the page was drawn.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var next = form instanceof HTMLFormElement && form.querySelector("input[name=next]");
    if (next) { next.value = location.pathname + location.search; }
  });

  document.addEventListener("htmx:beforeRequest", function (event) {
    if (event.detail.elt === composer()) {
      document.getElementById("form-error").textContent = "";
      stick = true;
    }
  });

  document.addEventListener("htmx:afterRequest", function (event) {
    if (event.detail.elt === composer() && event.detail.successful) {
      var box = textBox();
      box.value = "";
      fitTextBox();
      box.focus();
      follow();
    }
  });

  document.addEventListener("htmx:sseOpen", function () { announce(phrase("generating")); });
  document.addEventListener("htmx:sseMessage", function () { labelCopyButtons(); follow(); });
  document.addEventListener("htmx:afterSwap", function (event) {
    labelCopyButtons();
    follow();
    var elt = event.detail.elt;
    if (elt && elt.classList && elt.classList.contains("msg") && elt.classList.contains("assistant")) {
      var status = elt.getAttribute("data-status");
      if (status === "error") { announce(phrase("failed")); }
      else if (status && status !== "pending" && status !== "streaming") {
        announce(phrase("complete"));
        var box = textBox();
        if (box && document.activeElement === document.body) { box.focus(); }
      }
    }
  });
})();
