#!/usr/bin/env python3
"""The machine's loopback TCP ceiling: one sender writes 64 KiB chunks to one receiver (two
processes) for a few seconds; prints the bytes per second received. This bounds any fan-out on
the same machine: N subscribers of R items/s of B bytes need N x R x B bytes/s written by the
server and read by the clients, on the same cores."""
import os
import socket
import sys
import time

SECONDS = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
CHUNK = 64 * 1024

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
port = listener.getsockname()[1]
if os.fork() == 0:
    out = socket.create_connection(("127.0.0.1", port))
    data = b"x" * CHUNK
    end = time.time() + SECONDS
    while time.time() < end:
        out.sendall(data)
    out.close()
    os._exit(0)
conn, _ = listener.accept()
buf = bytearray(CHUNK * 4)
view = memoryview(buf)
got, start = 0, time.time()
while n := conn.recv_into(view):
    got += n
elapsed = time.time() - start
os.wait()
print(f"loopback TCP, one stream: {got / elapsed / 1e9:.2f} GB/s ({got / 1e9:.1f} GB in {elapsed:.1f} s)")
