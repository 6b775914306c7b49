#!/usr/bin/env python3
"""A small authoritative DNS server for tests/dns.rs (stdlib only), run inside a network
namespace the test created. UDP and TCP on ADDR:53; a TCP echo listener on 0.0.0.0:ECHO_PORT.

Zone (BASE = the first three octets of the namespace's network, e.g. 10.253.7):
  api.dns.test      A BASE.10                 TTL 60
  rot.dns.test      A BASE.11, BASE.12, ...   TTL 1, a different address on each query
  alias.dns.test    CNAME edge.cdn.test       TTL 60; edge.cdn.test A BASE.13 TTL 60
  *.wild.test       A BASE.14                 TTL 60
  short.dns.test    A BASE.15                 TTL 1
  outside.test      A BASE.16                 TTL 60
  api.dns.test      AAAA BASE6::10            TTL 60 (with BASE6 given)
  anything else     NXDOMAIN
Every query is appended to LOG as "name type proto".

usage: dns_server.py ADDR BASE ECHO_PORT LOG [BASE6]
"""
import socket
import struct
import sys
import threading

ADDR, BASE, ECHO_PORT, LOG = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
BASE6 = sys.argv[5] if len(sys.argv) > 5 else None
rot = [0]
lock = threading.Lock()


def encode_name(name):
    out = b""
    for label in name.rstrip(".").split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def read_name(data, off):
    labels = []
    while True:
        n = data[off]
        if n == 0:
            return ".".join(labels), off + 1
        labels.append(data[off + 1:off + 1 + n].decode())
        off += 1 + n


def rr_a(name, ip, ttl):
    return encode_name(name) + struct.pack(">HHIH", 1, 1, ttl, 4) + socket.inet_aton(ip)


def rr_aaaa(name, ip, ttl):
    return encode_name(name) + struct.pack(">HHIH", 28, 1, ttl, 16) + socket.inet_pton(socket.AF_INET6, ip)


def rr_cname(name, target, ttl):
    t = encode_name(target)
    return encode_name(name) + struct.pack(">HHIH", 5, 1, ttl, len(t)) + t


def answer(query, proto):
    qid, flags = struct.unpack(">HH", query[:4])
    name, off = read_name(query, 12)
    qtype, qclass = struct.unpack(">HH", query[off:off + 4])
    question = query[12:off + 4]
    name = name.lower()
    with lock:
        with open(LOG, "a") as f:
            f.write(f"{name} {qtype} {proto}\n")
    answers, rcode = [], 0
    if name == "api.dns.test":
        answers = [rr_a(name, BASE + ".10", 60)]
    elif name == "rot.dns.test":
        with lock:
            n = rot[0]
            rot[0] += 1
        answers = [rr_a(name, f"{BASE}.{11 + n % 2}", 1)]
    elif name == "alias.dns.test":
        answers = [rr_cname(name, "edge.cdn.test", 60), rr_a("edge.cdn.test", BASE + ".13", 60)]
    elif name.endswith(".wild.test"):
        answers = [rr_a(name, BASE + ".14", 60)]
    elif name == "short.dns.test":
        answers = [rr_a(name, BASE + ".15", 1)]
    elif name == "outside.test":
        answers = [rr_a(name, BASE + ".16", 60)]
    else:
        rcode = 3
    if qtype == 28 and name == "api.dns.test" and BASE6:
        answers = [rr_aaaa(name, BASE6 + "::10", 60)]
    elif qtype != 1:
        # Only A records here (and the one AAAA): other types get an empty answer.
        answers = [a for a in answers if a[len(encode_name(name)):][:2] == b"\x00\x05"]
    rd = flags & 0x0100
    header = struct.pack(">HHHHHH", qid, 0x8400 | rd | 0x0080 | rcode, 1, len(answers), 0, 0)
    return header + question + b"".join(answers)


def serve_udp(s):
    while True:
        data, peer = s.recvfrom(4096)
        try:
            s.sendto(answer(data, "udp"), peer)
        except Exception as e:  # a malformed query: no answer
            print("udp:", e, file=sys.stderr, flush=True)


def recvn(c, n):
    buf = b""
    while len(buf) < n:
        chunk = c.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def serve_tcp_conn(c):
    try:
        while True:
            n = struct.unpack(">H", recvn(c, 2))[0]
            r = answer(recvn(c, n), "tcp")
            c.sendall(struct.pack(">H", len(r)) + r)
    except Exception:
        c.close()


def serve_tcp(s):
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve_tcp_conn, args=(c,), daemon=True).start()


def echo_conn(c):
    try:
        while True:
            d = c.recv(4096)
            if not d:
                break
            c.sendall(d)
    except Exception:
        pass
    c.close()


def serve_echo(s):
    while True:
        c, _ = s.accept()
        threading.Thread(target=echo_conn, args=(c,), daemon=True).start()


def tcp_listener(addr, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(64)
    return s


udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((ADDR, 53))
threading.Thread(target=serve_tcp, args=(tcp_listener(ADDR, 53),), daemon=True).start()
threading.Thread(target=serve_echo, args=(tcp_listener("0.0.0.0", ECHO_PORT),), daemon=True).start()
if BASE6:
    s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s6.bind(("::", ECHO_PORT))
    s6.listen(64)
    threading.Thread(target=serve_echo, args=(s6,), daemon=True).start()
print("ready", flush=True)
serve_udp(udp)
