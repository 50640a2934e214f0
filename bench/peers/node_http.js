// A plain Node `http` server streaming the same reply as the Python peers
// (bench/peers/reply.py: same tokens, pacing and HTML sizes).
//
//   node bench/peers/node_http.js PORT
//
// GET /stream?tokens=T&rate=R&coalesce_ms=C&sid=S as in flask_min.py.
"use strict";
const http = require("http");

const PARAGRAPH_TOKENS = 30;
const WORDS = ["stream", "token", "reply", "model", "server", "gevent", "worker", "socket",
  "event", "chunk", "render", "html", "bytes", "tail", "block", "greenlet"];
const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;" };
const escape = (s) => s.replace(/[&<>"']/g, (c) => ESCAPES[c]);

function token(index) {
  const word = WORDS[index % WORDS.length];
  if (index === 0) return word;
  return (index % PARAGRAPH_TOKENS === 0 ? "\n\n" : " ") + word;
}

function encode(event, data, id) {
  const lines = data.split("\n").map((line) => `data: ${line}\n`).join("");
  return `event: ${event}\nid: ${id}\n${lines}\n`;
}

function stream(req, res, params) {
  const tokens = parseInt(params.get("tokens") || "200", 10);
  const rate = parseFloat(params.get("rate") || "20");
  const coalesce = parseFloat(params.get("coalesce_ms") || "0");
  const sid = params.get("sid") || "0";
  res.writeHead(200, {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
  });
  res.write("retry: 2000\n\n");
  res.write(encode("snapshot",
    `<div class="blocks" id="b-${sid}"></div><div class="tail" id="t-${sid}"></div>`, "0"));
  const start = performance.now();
  let text = "", paragraph = "", finished = "", index = 0, lastSent = -Infinity, timer = null;
  req.on("close", () => clearTimeout(timer));

  function tick() {
    const now = performance.now();
    if (start + (index * 1000) / rate > now) {  // woke a little early: nothing is due yet
      schedule();
      return;
    }
    while (index < tokens && start + (index * 1000) / rate <= now) {
      const piece = token(index);
      if (piece.startsWith("\n\n")) {
        finished += `<p>${escape(paragraph)}</p>`;
        paragraph = piece.slice(2);
      } else {
        paragraph += piece;
      }
      text += piece;
      index += 1;
    }
    const oob = finished ? `<div hx-swap-oob="beforeend:#b-${sid}">${finished}</div>` : "";
    finished = "";
    res.write(encode("delta", `${oob}<p>${escape(paragraph)}</p>`, String(text.length)));
    lastSent = performance.now();
    if (index < tokens) {
      schedule();
      return;
    }
    const paragraphs = text.split("\n\n").map((p) => `<p>${escape(p)}</p>`).join("");
    res.end(encode("done",
      `<article class="msg assistant" id="m-${sid}" data-status="complete">` +
      `<div class="bubble"><div class="blocks">${paragraphs}</div>` +
      `<footer class="meta"><span>${tokens} tokens</span></footer>` +
      `<template class="source">${escape(text)}</template></div></article>`, String(text.length)));
  }

  function schedule() {
    const due = Math.max(start + (index * 1000) / rate, lastSent + coalesce);
    timer = setTimeout(tick, Math.max(0, due - performance.now()));
  }
  schedule();
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://localhost");
  if (url.pathname === "/stream") return stream(req, res, url.searchParams);
  if (url.pathname === "/healthz") {
    res.writeHead(200, { "Content-Type": "application/json" });
    return res.end('{"status":"ok"}');
  }
  res.writeHead(404);
  res.end();
});
server.listen(parseInt(process.argv[2] || "8000", 10), "127.0.0.1", 4096);
