#!/usr/bin/env python3
"""Resident memory of `eddy serve` against a fragmented WebSocket message over the limit.

Starts the given eddy binary on 127.0.0.1 (a free port, no queries, default limits: 16 MiB per
message), then on one raw socket (no WebSocket library) sends a 256 MiB binary message as
fragments of 1 MiB, reads the close code, and prints the server's VmRSS before and after and its
peak (VmHWM). Then the same with a message of 15 MiB, under the limit, for comparison.

    cargo build --release && python3 benches/ws_memory.py target/release/eddy
"""
import os
import socket
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20


def status(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024  # MiB
    return fields


def header(b0, n):
    if n < 126:
        h = bytes([b0, 0x80 | n])
    elif n < 65536:
        h = bytes([b0, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        h = bytes([b0, 0x80 | 127]) + n.to_bytes(8, "big")
    return h + b"\0\0\0\0"  # a zero mask: the payload goes as it is


def send_message(port, total, piece, ack=True):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(
        b"GET /ingest?ack=true HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    rest = head.split(b"\r\n\r\n", 1)[1]
    chunk = b"[" + b" " * (piece - 1)
    sent = 0
    try:
        while sent < total:
            n = min(piece, total - sent)
            last = sent + n == total
            b0 = (0x80 if last else 0) | (0x2 if sent == 0 else 0)
            payload = chunk[:n] if not last else chunk[: n - 1] + b"]"
            s.sendall(header(b0, n) + payload)
            sent += n
    except (BrokenPipeError, ConnectionResetError):
        pass
    s.settimeout(10)
    data = rest
    try:
        while len(data) < 4:
            more = s.recv(65536)
            if not more:
                break
            data += more
    except (ConnectionResetError, socket.timeout):
        pass
    s.close()
    if data[:1] == b"\x88":
        return sent, "close %d" % int.from_bytes(data[2:4], "big")
    if data[:1] == b"\x81":
        return sent, "message %s" % data[2:80].decode(errors="replace")
    return sent, "nothing (%r)" % data[:8]


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/eddy"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    queries = tempfile.mkdtemp()
    server = subprocess.Popen(
        [binary, "serve", "--ephemeral", "--listen", f"127.0.0.1:{port}", "--queries", queries, "--shards", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.05)
        print(f"started: {status(server.pid)}")
        for total, label in [(256 * MIB, "256 MiB in 1 MiB fragments"), (15 * MIB, "15 MiB in 1 MiB fragments")]:
            sent, answer = send_message(port, total, MIB)
            time.sleep(0.5)
            soon = status(server.pid)
            time.sleep(3)
            print(f"{label}: sent {sent / MIB:.0f} MiB before the answer: {answer[:40]}")
            print(f"  server 0.5 s after: {soon}, 3.5 s after: {status(server.pid)}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
