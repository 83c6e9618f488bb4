#!/usr/bin/env python3
"""An independent CONNECT-IP client (RFC 9484) on aioquic's HTTP/3.

aioquic implements QUIC and HTTP/3 on its own, with ls-qpack for QPACK, and
knows nothing of tether. This client opens a CONNECT-IP tunnel to a tether
broker with a site certificate, decodes the ADDRESS_ASSIGN and
ROUTE_ADVERTISEMENT capsules by the RFC's layout, sends one IP packet in an
HTTP Datagram (context ID 0) and reads the broker's answer. It prints a JSON
summary for the test to check.

usage: connect_ip_client.py HOST PORT CA CERT KEY
"""

import asyncio
import ipaddress
import json
import ssl
import struct
import sys

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, DatagramReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration


def read_varint(buf, pos):
    first = buf[pos]
    length = 1 << (first >> 6)
    value = first & 0x3F
    for b in buf[pos + 1 : pos + length]:
        value = (value << 8) | b
    return value, pos + length


def parse_capsules(buf):
    """Yields (type, value) for each complete capsule; returns leftovers."""
    capsules, pos = [], 0
    while pos < len(buf):
        try:
            ctype, p = read_varint(buf, pos)
            length, p = read_varint(buf, p)
        except IndexError:
            break
        if p + length > len(buf):
            break
        capsules.append((ctype, buf[p : p + length]))
        pos = p + length
    return capsules, buf[pos:]


def parse_addresses(value):
    out, pos = [], 0
    while pos < len(value):
        request_id, pos = read_varint(value, pos)
        version = value[pos]
        size = 4 if version == 4 else 16
        addr = ipaddress.ip_address(bytes(value[pos + 1 : pos + 1 + size]))
        prefix_len = value[pos + 1 + size]
        pos += 2 + size
        out.append({"request_id": request_id, "prefix": f"{addr}/{prefix_len}"})
    return out


def parse_ranges(value):
    out, pos = [], 0
    while pos < len(value):
        version = value[pos]
        size = 4 if version == 4 else 16
        start = ipaddress.ip_address(bytes(value[pos + 1 : pos + 1 + size]))
        end = ipaddress.ip_address(bytes(value[pos + 1 + size : pos + 1 + 2 * size]))
        proto = value[pos + 1 + 2 * size]
        pos += 2 + 2 * size
        out.append({"start": str(start), "end": str(end), "protocol": proto})
    return out


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return (~total) & 0xFFFF


def echo_request(src, dst):
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x4242, 1) + b"aioquic interop"
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0x4000, 64, 1, 0, src.packed, dst.packed)
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + icmp


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic, enable_webtransport=True)
        self.events = asyncio.Queue()

    def quic_event_received(self, event):
        for h3_event in self.h3.handle_event(event):
            self.events.put_nowait(h3_event)


async def main(host, port, ca, cert, key):
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, max_datagram_frame_size=65536)
    config.load_verify_locations(ca)
    config.load_cert_chain(cert, key)
    config.verify_mode = ssl.CERT_REQUIRED
    config.server_name = host
    result = {"capsules": []}
    async with connect(host, port, configuration=config, create_protocol=Client) as client:
        stream_id = client._quic.get_next_available_stream_id()
        client.h3.send_headers(
            stream_id,
            [
                (b":method", b"CONNECT"),
                (b":protocol", b"connect-ip"),
                (b":scheme", b"https"),
                (b":authority", f"{host}:{port}".encode()),
                (b":path", b"/.well-known/masque/ip/*/*/"),
                (b"capsule-protocol", b"?1"),
            ],
        )
        client.transmit()
        buf, assigned, sent = b"", None, False
        deadline = asyncio.get_event_loop().time() + 10
        while asyncio.get_event_loop().time() < deadline:
            try:
                event = await asyncio.wait_for(client.events.get(), 1)
            except asyncio.TimeoutError:
                continue
            if isinstance(event, HeadersReceived):
                result["status"] = int(dict(event.headers)[b":status"])
            elif isinstance(event, DataReceived):
                capsules, buf = parse_capsules(buf + event.data)
                for ctype, value in capsules:
                    if ctype == 1:
                        assigned = parse_addresses(value)
                        result["capsules"].append({"type": "ADDRESS_ASSIGN", "addresses": assigned})
                    elif ctype == 3:
                        result["capsules"].append({"type": "ROUTE_ADVERTISEMENT", "ranges": parse_ranges(value)})
            elif isinstance(event, DatagramReceived):
                context, pos = read_varint(event.data, 0)
                packet = event.data[pos:]
                result["reply"] = {"context": context, "protocol": packet[9], "icmp_type": packet[20], "icmp_code": packet[21], "dst": str(ipaddress.ip_address(packet[16:20]))}
                break
            if assigned and not sent:
                v4 = next(a for a in assigned if "." in a["prefix"])
                src = ipaddress.ip_address(v4["prefix"].split("/")[0])
                # An address with no route: the broker must answer with ICMP.
                client.h3.send_datagram(stream_id, b"\x00" + echo_request(src, ipaddress.ip_address("192.0.2.1")))
                client.transmit()
                sent = True
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:6]))
