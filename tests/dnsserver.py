"""A small authoritative DNS server on 127.0.0.1 (UDP) for tests, built on dnslib.

Usage::

    with DNSTestServer() as dns:
        dns.add_mx("example.test", 10, "mx1.example.test")
        dns.add_a("mx1.example.test", "127.0.0.1")
        dns.servfail("broken.test")
        dns.silent("slow.test")          # never answered: the client times out
        resolver = MXResolver(DNSSettings(["127.0.0.1"], port=dns.port, timeout=1))

A name with no record at all is NXDOMAIN; a name with records of other types gets an empty
NOERROR answer. Runs in a thread so any client (asyncio or not) can use it.
"""

from __future__ import annotations

import socket
import threading
from collections import defaultdict

from dnslib import AAAA, MX, QTYPE, RCODE, RR, A, DNSRecord

__all__ = ["DNSTestServer"]


def _key(name: str) -> str:
    return name.rstrip(".").lower()


class DNSTestServer:
    def __init__(self) -> None:
        self._records: dict[str, list[RR]] = defaultdict(list)
        self._servfail: set[str] = set()
        self._silent: set[str] = set()
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.port: int = self._sock.getsockname()[1]
        self.queries: list[tuple[str, str]] = []  # (name, type) in arrival order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dns-test-server", daemon=True)

    # ---- configuration

    def add_mx(self, domain: str, preference: int, exchange: str) -> None:
        self._add(domain, RR(_key(domain) + ".", QTYPE.MX, rdata=MX(exchange or ".", preference)))

    def add_null_mx(self, domain: str) -> None:
        self._add(domain, RR(_key(domain) + ".", QTYPE.MX, rdata=MX(".", 0)))

    def add_a(self, name: str, address: str) -> None:
        self._add(name, RR(_key(name) + ".", QTYPE.A, rdata=A(address), ttl=60))

    def add_aaaa(self, name: str, address: str) -> None:
        self._add(name, RR(_key(name) + ".", QTYPE.AAAA, rdata=AAAA(address), ttl=60))

    def servfail(self, name: str) -> None:
        with self._lock:
            self._servfail.add(_key(name))

    def silent(self, name: str) -> None:
        with self._lock:
            self._silent.add(_key(name))

    def _add(self, name: str, record: RR) -> None:
        with self._lock:
            self._records[_key(name)].append(record)

    # ---- running

    def __enter__(self) -> DNSTestServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = self._answer(data)
            if reply is not None:
                self._sock.sendto(reply, peer)

    def _answer(self, data: bytes) -> bytes | None:
        try:
            request = DNSRecord.parse(data)
        except Exception:  # garbage: a real server drops it too
            return None
        name = _key(str(request.q.qname))
        qtype = request.q.qtype
        with self._lock:
            self.queries.append((name, QTYPE[qtype]))
            if name in self._silent:
                return None
            reply = request.reply()
            if name in self._servfail:
                reply.header.rcode = RCODE.SERVFAIL
            elif name not in self._records:
                reply.header.rcode = RCODE.NXDOMAIN
            else:
                for record in self._records[name]:
                    if record.rtype == qtype:
                        reply.add_answer(record)
        packed: bytes = reply.pack()
        return packed
