"""The VWAP job written the way a Python developer would: asyncio and the `websockets` package.

Same protocol as eddy for what the benchmark uses: /ingest?stream=S&ack=true (JSON object,
array or NDJSON per frame, answered with an ack), /subscribe ({"op":"subscribe","topic":"vwap"}
-> {"type":"subscribed"}, then one batch per ingested frame).
"""
import asyncio
import json
import sys
from urllib.parse import parse_qs, urlparse

from websockets.asyncio.server import broadcast, serve

state = {}  # symbol -> [notional, volume, trades]
subscribers = {}  # connection -> next seq


def events(text):
    text = text.strip()
    if text.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.split("\n") if line.strip()]


async def ingest(ws, ack):
    frame = 0
    async for data in ws:
        accepted = rejected = 0
        items = []
        try:
            parsed = events(data)
        except ValueError:
            parsed, rejected = [], 1
        for ev in parsed:
            symbol, price, size = ev.get("symbol"), ev.get("price"), ev.get("size")
            if not isinstance(symbol, str) or not isinstance(price, (int, float)) or not isinstance(size, (int, float)):
                rejected += 1
                continue
            accepted += 1
            s = state.setdefault(symbol, [0.0, 0, 0])
            s[0] += price * size
            s[1] += size
            s[2] += 1
            value = {"last": price, "trades": s[2], "ts": ev.get("ts"), "volume": s[1], "vwap": s[0] / s[1]}
            if "sent_us" in ev:
                value["sent_us"] = ev["sent_us"]
            items.append({"key": symbol, "value": value})
        if items:
            for sub in list(subscribers):
                seq = subscribers[sub]
                subscribers[sub] = seq + 1
                broadcast([sub], json.dumps({"type": "batch", "topic": "vwap", "seq": seq, "n": len(items), "items": items}))
        if ack:
            await ws.send(json.dumps({"type": "ack", "frame": frame, "accepted": accepted, "rejected": rejected, "errors": []}))
        frame += 1


async def subscribe(ws):
    try:
        async for data in ws:
            msg = json.loads(data)
            if msg.get("op") == "subscribe" and msg.get("topic") == "vwap":
                subscribers[ws] = 0
                await ws.send(json.dumps({"type": "subscribed", "topic": "vwap"}))
    finally:
        subscribers.pop(ws, None)


async def handler(ws):
    url = urlparse(ws.request.path)
    if url.path == "/ingest":
        await ingest(ws, parse_qs(url.query).get("ack") == ["true"])
    elif url.path == "/subscribe":
        await subscribe(ws)
    else:
        await ws.close(1008, "no such path")


async def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9002
    async with serve(handler, "127.0.0.1", port, compression=None, max_size=16 * 1024 * 1024, max_queue=None):
        print(f"python peer listening on ws://127.0.0.1:{port}", flush=True)
        await asyncio.get_running_loop().create_future()


if __name__ == "__main__":
    asyncio.run(main())
