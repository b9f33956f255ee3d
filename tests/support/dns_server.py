"""A small authoritative DNS server on a loopback UDP port, standing in for cluster DNS in tests.

It answers A queries for the names it was given (a headless Service's name -> one address per pod),
NODATA for their other record types, and NXDOMAIN for everything else. The records can change while it
runs (pods come and go). Answers carry a 1 s TTL. Only what a c-ares client sends is handled: one
question per query, no EDNS options kept, no TCP.
"""

from __future__ import annotations

import socket
import struct
import threading
from ipaddress import IPv4Address

_A, _IN = 1, 1
_NOERROR, _NXDOMAIN = 0, 3


class DnsServer:
    def __init__(self, records: dict[str, list[str]] | None = None) -> None:
        self._records = {self._key(name): list(addresses) for name, addresses in (records or {}).items()}
        self._lock = threading.Lock()
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.queries: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(self, name: str, addresses: list[str]) -> None:
        with self._lock:
            self._records[self._key(name)] = list(addresses)

    def close(self) -> None:
        self._socket.close()

    @staticmethod
    def _key(name: str) -> str:
        return name.rstrip(".").lower()

    def _serve(self) -> None:
        while True:
            try:
                query, client = self._socket.recvfrom(512)
            except OSError:
                return
            try:
                self._socket.sendto(self._answer(query), client)
            except (OSError, ValueError, struct.error):
                continue

    def _answer(self, query: bytes) -> bytes:
        (ident, flags, qdcount), offset = struct.unpack(">HHH", query[:6]), 12
        labels = []
        while query[offset]:
            length = query[offset]
            labels.append(query[offset + 1:offset + 1 + length].decode("ascii"))
            offset += 1 + length
        qtype, qclass = struct.unpack(">HH", query[offset + 1:offset + 5])
        question = query[12:offset + 5]
        name = self._key(".".join(labels))
        self.queries.append(name)
        with self._lock:
            addresses = self._records.get(name)
        rd = flags & 0x0100
        if addresses is None:
            return struct.pack(">HHHHHH", ident, 0x8400 | rd | _NXDOMAIN, 1, 0, 0, 0) + question
        answers = [address for address in addresses if qtype == _A and qclass == _IN]
        header = struct.pack(">HHHHHH", ident, 0x8400 | rd | _NOERROR, 1, len(answers), 0, 0)
        records = b"".join(struct.pack(">HHHIH", 0xC00C, _A, _IN, 1, 4) + IPv4Address(a).packed for a in answers)
        return header + question + records
