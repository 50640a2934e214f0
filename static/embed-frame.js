// Runs inside the /embed iframe (loaded at the top of <body>, before the page is drawn):
// applies the host's colours, keeps every navigation inside /embed (the other pages
// refuse to be framed), and listens to the host page's postMessage API — only to the
// origins the operator allowed (data-embed-origins) and only from the parent window.
(function () {
  "use strict";

  var root = document.documentElement;
  var body = document.body;
  var allowed = (body.getAttribute("data-embed-origins") || "").split(" ").filter(Boolean);
  var options = new URLSearchParams(body.getAttribute("data-embed-query") || "");

  function hexColor(value) {
    return typeof value === "string" && /^#([0-9a-f]{3}|[0-9a-f]{6})$/i.test(value) ? value : "";
  }

  function readableOn(hex) {
    var h = hex.length === 4 ? hex.replace(/[0-9a-f]/gi, "$&$&").slice(1) : hex.slice(1);
    var r = parseInt(h.slice(0, 2), 16), g = parseInt(h.slice(2, 4), 16), b = parseInt(h.slice(4, 6), 16);
    return (0.299 * r + 0.587 * g + 0.114 * b) > 160 ? "#111111" : "#ffffff";
  }

  function applyColor(color) {
    if (!color) { return; }
    root.style.setProperty("--accent", color);
    root.style.setProperty("--focus", color);
    root.style.setProperty("--accent-fg", readableOn(color));
    options.set("color", color);
  }

  function applyScheme(scheme) {
    if (scheme === "light" || scheme === "dark") {
      root.setAttribute("data-theme", scheme);
      options.set("theme", scheme);
    } else if (scheme === "auto") {
      root.removeAttribute("data-theme");
      options.delete("theme");
    }
  }

  // The embed URL for a path of the main site: "/" is a new chat, "/c/<id>" that chat.
  function embedPath(path) {
    var params = new URLSearchParams(options);
    var match = /^\/c\/([A-Za-z0-9_-]+)(?:[?#]|$)/.exec(path || "");
    if (match) { params.set("c", match[1]); } else if (path === "/" || path === "") { params.set("new", "1"); }
    var query = params.toString();
    return "/embed" + (query ? "?" + query : "");
  }

  applyColor(hexColor(options.get("color")));

  document.addEventListener("DOMContentLoaded", function () {
    // This listener was added before htmx's own: htmx starts with history off. The
    // iframe's address follows the conversation through replaceState instead (below).
    if (window.htmx) { window.htmx.config.historyEnabled = false; }
  });

  document.addEventListener("htmx:beforeOnLoad", function (event) {
    var xhr = event.detail.xhr;
    var redirect = xhr.getResponseHeader("HX-Redirect");
    if (redirect !== null) {
      event.preventDefault();
      location.assign(embedPath(redirect));
      return;
    }
    var pushed = xhr.getResponseHeader("HX-Push-Url");
    if (pushed && pushed !== "false") { history.replaceState(null, "", embedPath(pushed)); }
  });

  // Links to the main site's pages open their /embed counterpart.
  document.addEventListener("click", function (event) {
    if (event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey ||
        event.shiftKey || event.altKey || !(event.target instanceof Element)) { return; }
    var link = event.target.closest("a[href]");
    if (!link || link.hasAttribute("download") || (link.target && link.target !== "_self")) { return; }
    var url = new URL(link.href, location.href);
    if (url.origin !== location.origin) { return; }
    if (url.pathname === "/" || /^\/c\/[A-Za-z0-9_-]+$/.test(url.pathname)) {
      event.preventDefault();
      location.assign(embedPath(url.pathname));
    }
  }, true);

  window.addEventListener("message", function (event) {
    if (event.source !== window.parent || event.source === window ||
        allowed.indexOf(event.origin) === -1) { return; }
    var data = event.data;
    if (!data || typeof data !== "object") { return; }
    if (data.type === "webchat:theme") {
      applyColor(hexColor(data.color));
      applyScheme(data.scheme);
    } else if (data.type === "webchat:focus") {
      var box = document.getElementById("composer-text");
      if (box) { box.focus(); }
    }
  });
})();
