// The VWAP job written the way a Node.js developer would: the `ws` package, one process.
// Same protocol as eddy for what the benchmark uses: /ingest?stream=S&ack=true (JSON object,
// array or NDJSON per frame, answered with an ack), /subscribe ({"op":"subscribe","topic":"vwap"}
// → {"type":"subscribed"}, then one batch per ingested frame).
"use strict";
const http = require("http");
const { WebSocketServer } = require("ws");

const port = Number(process.argv[2] || 9001);
const state = new Map(); // symbol -> {notional, volume, trades}
const subscribers = new Set(); // {ws, seq}

function events(text) {
  const t = text.trim();
  if (t.startsWith("[")) return JSON.parse(t);
  const lines = t.split("\n").filter((l) => l.trim() !== "");
  return lines.map((l) => JSON.parse(l));
}

function ingest(ws, ack) {
  let frame = 0;
  ws.on("message", (data) => {
    let accepted = 0, rejected = 0;
    const items = [];
    let parsed = [];
    try { parsed = events(data.toString()); } catch (e) { rejected += 1; }
    for (const ev of parsed) {
      if (typeof ev.symbol !== "string" || typeof ev.price !== "number" || typeof ev.size !== "number") { rejected++; continue; }
      accepted++;
      let s = state.get(ev.symbol);
      if (!s) { s = { notional: 0, volume: 0, trades: 0 }; state.set(ev.symbol, s); }
      s.notional += ev.price * ev.size;
      s.volume += ev.size;
      s.trades += 1;
      const value = { last: ev.price, trades: s.trades, ts: ev.ts, volume: s.volume, vwap: s.notional / s.volume };
      if (ev.sent_us !== undefined) value.sent_us = ev.sent_us;
      items.push({ key: ev.symbol, value });
    }
    if (items.length > 0) {
      for (const sub of subscribers) {
        sub.ws.send(JSON.stringify({ type: "batch", topic: "vwap", seq: sub.seq++, n: items.length, items }));
      }
    }
    if (ack) ws.send(JSON.stringify({ type: "ack", frame: frame, accepted, rejected, errors: [] }));
    frame++;
  });
}

function subscribe(ws) {
  const sub = { ws, seq: 0 };
  ws.on("message", (data) => {
    const msg = JSON.parse(data.toString());
    if (msg.op === "subscribe" && msg.topic === "vwap") {
      subscribers.add(sub);
      ws.send(JSON.stringify({ type: "subscribed", topic: "vwap" }));
    }
  });
  ws.on("close", () => subscribers.delete(sub));
}

const server = http.createServer((req, res) => { res.writeHead(404); res.end(); });
const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false });
server.on("upgrade", (req, socket, head) => {
  const url = new URL(req.url, "http://localhost");
  wss.handleUpgrade(req, socket, head, (ws) => {
    if (url.pathname === "/ingest") ingest(ws, url.searchParams.get("ack") === "true");
    else if (url.pathname === "/subscribe") subscribe(ws);
    else ws.close(1008, "no such path");
  });
});
server.listen(port, "127.0.0.1", () => console.log(`node peer listening on ws://127.0.0.1:${port}`));
