#!/usr/bin/env python3
"""Cuts a CUDA shared library's embedded GPU code to one architecture, for moving it to a
machine whose transfer size is capped (e.g. onnxruntime-gpu's CUDA provider, 284 MB with code
for sm_75/80/86/89/90/120, to the sm_90 of an H100/H200: 52 MB under ``xz -9`` instead of 185).

The library's ``.nv_fatbin`` section holds fatbins (magic 0xBA55ED50), each a list of entries
(a header, then the payload: PTX text or an ELF cubin for one SM architecture). Every entry
of another architecture, in a fatbin that has one for ``--arch``, gets its payload zeroed;
the headers stay, so offsets and sizes are unchanged, and the CUDA runtime, which loads the
entry of the device's own architecture, never reads the zeros. A fatbin with no entry for
``--arch`` is kept whole. Only uncompressed fatbin entries are handled (the flag 0x2000 marks a
compressed one; the library is then left unchanged and the script says so).

Usage: prune_fatbin.py LIB OUT [--arch 90]
"""

import argparse
import struct
import sys

MAGIC = 0xBA55ED50
COMPRESSED = 0x2000


def section(data: bytes, name: str):
    """(offset, size) of the ELF64 section `name`."""
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]
    for h in headers:
        start = strtab + h[0]
        if data[start:data.index(b"\0", start)].decode() == name:
            return h[4], h[5]
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("lib")
    p.add_argument("out")
    p.add_argument("--arch", type=int, default=90)
    args = p.parse_args()
    data = bytearray(open(args.lib, "rb").read())
    if data[:4] != b"\x7fELF" or data[4] != 2:
        sys.exit(f"{args.lib}: not a 64-bit ELF file")
    found = section(data, ".nv_fatbin")
    if found is None:
        sys.exit(f"{args.lib}: no .nv_fatbin section")
    off, end = found[0], found[0] + found[1]
    fatbins = zeroed = kept_whole = 0
    while off < end:
        magic, _, header, size = struct.unpack_from("<IHHQ", data, off)
        if magic != MAGIC:
            off += 8  # fatbins are 8-byte aligned; padding between them
            continue
        fatbins += 1
        entries, p_, q = [], off + header, off + header + size
        while p_ < q:
            kind, _, eheader, esize = struct.unpack_from("<HHIQ", data, p_)
            arch = struct.unpack_from("<I", data, p_ + 28)[0]
            flags = struct.unpack_from("<Q", data, p_ + 40)[0] if eheader >= 48 else 0
            if flags & COMPRESSED:
                sys.exit(f"{args.lib}: compressed fatbin entries; nothing written")
            entries.append((kind, arch, p_ + eheader, esize))
            p_ += eheader + esize
        if any(kind == 2 and arch == args.arch for kind, arch, _, _ in entries):
            for kind, arch, start, n in entries:
                if not (kind == 2 and arch == args.arch):
                    data[start:start + n] = bytes(n)
                    zeroed += n
        else:
            kept_whole += 1
        off = q
    open(args.out, "wb").write(data)
    print(f"{fatbins} fatbins, {zeroed / 1e6:.1f} MB of other architectures zeroed, "
          f"{kept_whole} kept whole (no sm_{args.arch} code)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
