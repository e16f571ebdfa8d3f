"""Memory held for clients that stop reading a long answer.

    python -m benchmarks.stalled            # 40 clients, 30,000-token streams
    python -m benchmarks.stalled --clients 100

Starts the mock upstream and ``chatmem serve`` (a fresh SQLite file) as processes, then
opens ``--clients`` connections that each ask for a streamed answer of ``--tokens``
tokens and never read it (a receive buffer of 4 KiB asked for, which Linux makes 8).
The gateway relays until the client's socket is full, then stops reading the upstream
(back-pressure); what it holds meanwhile is its RSS growth, printed each second and
after the clients have gone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import tempfile
import time

from .procs import free_port, start

__all__ = ["main"]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=30_000)
    parser.add_argument("--seconds", type=int, default=6, help="how long they stall")
    args = parser.parse_args()
    body = json.dumps(
        {"model": "bench", "stream": True, "messages": [{"role": "user", "content": "q"}]}
    ).encode()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:
        up, gw = free_port(), free_port()
        mock = start(["mock-upstream", "--port", str(up)], f"http://127.0.0.1:{up}/v1/models")
        running.callback(mock.stop)
        gateway = start(
            [
                *("serve", "--port", str(gw), "--upstream", f"http://127.0.0.1:{up}/v1"),
                *("--db", f"sqlite+aiosqlite:///{tmp}/stalled.db"),
            ],
            f"http://127.0.0.1:{gw}/v1/health",
        )
        running.callback(gateway.stop)
        before = rss_mb(gateway.pid)
        print(f"gateway RSS before: {before:.1f} MB")
        with contextlib.ExitStack() as clients:
            for number in range(args.clients):
                client = clients.enter_context(socket.create_connection(("127.0.0.1", gw)))
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                head = (
                    "POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\n"
                    "Content-Type: application/json\r\n"
                    f"X-Mock-Tokens: {args.tokens}\r\nX-Conversation-Id: stalled-{number}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                )
                client.sendall(head.encode() + body)
            for second in range(1, args.seconds + 1):
                time.sleep(1)
                print(f"  {second} s: {rss_mb(gateway.pid):.1f} MB")
            held = rss_mb(gateway.pid) - before
            print(
                f"held for {args.clients} stalled clients: {held:.1f} MB "
                f"({held / args.clients:.2f} MB each)"
            )
        time.sleep(2)
        print(f"2 s after they left: {rss_mb(gateway.pid):.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
