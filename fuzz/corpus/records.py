#!/usr/bin/env python3
"""Writes the `records` seed corpus (fuzz/corpus/records/): one valid record of each kind plus
edge cases. Layouts are enforcer-common's #[repr(C)] structs (little-endian, x86_64/bpfel);
rerun this after changing one of them: `python3 fuzz/corpus/records.py`."""
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "records")
FILENAME_LEN, ARGS_LEN = 256, 2048
FORK, EXEC, EXIT, CONNECT = 1, 2, 3, 4


def w(name, b):
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(b)


# ProcGrants: grants [u32; 4], start_ns u64, taint u64, flags u32, _pad u32 (40 bytes).
def proc_grants(grants=(0, 0, 0, 0), start_ns=0, taint=0, flags=0):
    return struct.pack("<4I2Q2I", *grants, start_ns, taint, flags, 0)


# ForkRecord: kind, parent_tgid, child_tgid, uid, gid, _pad (u32); cgroup_id, boot_ns (u64);
# grants [u32; 4] (56 bytes).
def fork(grants=(3, 0, 7, 0)):
    return struct.pack("<6I2Q4I", FORK, 100, 101, 1000, 1000, 0, 0x1234, 5_000_000_000, *grants)


# ExecRecord: kind, tgid, old_tid, uid, gid, args_len, args_truncated, filename_len (u32);
# cgroup_id, boot_ns (u64); filename [u8; 256]; args [u8; 2048] (2352 bytes).
def exec_(fname, args, flen=None, alen=None, trunc=0):
    flen = len(fname) if flen is None else flen
    alen = len(args) if alen is None else alen
    hdr = struct.pack("<8I2Q", EXEC, 4242, 4242, 0, 0, alen, trunc, flen, 0x99, 123456789)
    return hdr + fname.ljust(FILENAME_LEN, b"\0") + args.ljust(ARGS_LEN, b"\0")


# ExitRecord: kind, tgid (u32); boot_ns (u64); grants [u32; 4] (32 bytes).
def exit_(grants=(0, 5, 0, 6)):
    return struct.pack("<2IQ4I", EXIT, 4242, 99, *grants)


# ConnectRecord: kind, tgid, tid, uid (u32); family, port (u16); protocol, op, action, verdict
# (u8); addr [u8; 16]; cgroup_id, boot_ns (u64); grant_slot (u32); reason, taint_secret,
# revoked_now, _pad2 (u8); subject ProcGrants (104 bytes).
def connect(family, port, proto, op, addr, subject=proc_grants((3, 0, 0, 0), 77, 1, 1)):
    head = struct.pack("<4I2H4B16s2QI4B", CONNECT, 4242, 4243, 1000, family, port, proto, op,
                       1, 2, addr, 7, 8, 3, 1, 2, 1, 0)
    return head + subject


os.makedirs(OUT, exist_ok=True)
w("fork", fork())
w("fork_short", fork()[:40])
w("exec", exec_(b"/usr/bin/curl\0", b"curl\0-s\0https://example.com/\0"))
w("exec_clamped", exec_(b"/bin/ls\0", b"ls\0-l\0/x\0", flen=10000, alen=10000, trunc=1))
w("exec_non_utf8", exec_(b"/tmp/\xff\xfe\0", b"\xc3\x28\0\0\0a\0"))
w("exit", exit_())
w("connect4", connect(2, 443, 6, 1, bytes([93, 184, 216, 34]) + bytes(12)))
w("connect6", connect(10, 53, 17, 2, bytes(15) + b"\x01", proc_grants()))
w("connect6_mapped", connect(10, 80, 6, 1, bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1])))
w("connect_bad_family", connect(99, 1, 132, 1, bytes(16)))
w("connect_short", connect(2, 443, 6, 1, bytes(16))[:64])
w("unknown_kind", struct.pack("<2I", 99, 0))
w("short", b"\x01\x00")
