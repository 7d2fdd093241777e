#!/usr/bin/env python3
"""Generate the .llma test vectors (spec/vectors/{good,bad,unsupported}) deterministically.

    python spec/vectors/make_vectors.py        # rewrites the vectors, manifest.json, README.md

Every vector is built from fixed bytes, names and mtimes; only the zstd frames depend on
the zstd library (any conforming decoder reads them). tests/test_vectors.py checks every
file against manifest.json.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

import zstandard  # noqa: E402

from llmarc.container.compact import encode_table, put_varint, solid_shares  # noqa: E402
from llmarc.container.index import assemble  # noqa: E402
from llmarc.container.layout import (  # noqa: E402
    EMPTY_SHA256,
    EXT_COMPACT_ENTRIES,
    HEADER_SIZE,
    SMALL_HEADER_SIZE,
    TYPE_DIR,
    TYPE_FILE,
    TYPE_SYMLINK,
    EntryRecord,
    Extension,
    Index,
    ModelRecord,
    canonical_json,
    crc32,
    encode_small_header,
    encode_trailer,
)
from llmarc.container.small import encode_small_index  # noqa: E402

MTIME = 1_700_000_000_000_000_000  # fixed: 2023-11-14T22:13:20Z
CREATOR = "llmarc test vectors"


def sha(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def frame(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=19, write_content_size=True).compress(data)


#: (name, CRC-32) -> SHA-256 of the content of every 1.1 solid member built, so the
#: manifest lists true SHA-256s even where the archive records only a CRC-32.
TRUTH: dict[tuple[str, int | bytes], bytes] = {}


class Builder:
    """Lay out entries in order; payload offsets are assigned as data is appended."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.entries: list[EntryRecord] = []

    def dir(self, name: str, mode: int = 0o755) -> Builder:
        self.entries.append(EntryRecord(name, TYPE_DIR, mode, MTIME, 0, 0, b"", 0, 0,
                                        EMPTY_SHA256, 0))
        return self

    def file(self, name: str, content: bytes, *, codec: int = 0, payload: bytes | None = None,
             params: bytes = b"", mode: int = 0o644, etype: int = TYPE_FILE,
             exts: tuple[Extension, ...] = (), sha256: bytes | None = None) -> Builder:
        if payload is None:
            payload = frame(content) if codec == 1 else content
        off = HEADER_SIZE + len(self.data)
        self.data += payload
        self.entries.append(EntryRecord(name, etype, mode, MTIME, len(content), codec, params,
                                        off, len(payload), sha256 or sha(content),
                                        crc32(payload), exts))
        return self

    def solid(self, files: list[tuple[str, bytes]]) -> Builder:
        cobj = zstandard.ZstdCompressor(level=19).compressobj()
        parts = []
        for _, content in files:
            parts.append(cobj.compress(content) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        parts[-1] += cobj.flush()
        block = b"".join(parts)
        off = HEADER_SIZE + len(self.data)
        self.data += block
        skip = 0
        for (name, content), part in zip(files, parts, strict=True):
            self.entries.append(EntryRecord(name, TYPE_FILE, 0o644, MTIME, len(content), 1,
                                            struct.pack("<QQ", skip, len(part)), off,
                                            len(block), sha(content), crc32(block)))
            skip += len(content)
        return self

    def solid11(self, files: list[tuple[str, bytes]]) -> Builder:
        """A format 1.1 solid block: one frame, no flush between members, members with a
        CRC-32 of their bytes instead of a SHA-256 (shares are not recorded)."""
        block = frame(b"".join(c for _, c in files))
        off = HEADER_SIZE + len(self.data)
        self.data += block
        skip = 0
        shares = solid_shares([len(c) for _, c in files], len(block))
        for (name, content), share in zip(files, shares, strict=True):
            TRUTH[(name, crc32(content))] = sha(content)
            self.entries.append(EntryRecord(name, TYPE_FILE, 0o644, MTIME + skip, len(content),
                                            1, struct.pack("<QQ", skip, share), off,
                                            len(block), b"", crc32(block), (), crc32(content)))
            skip += len(content)
        return self

    def build(self, *, models=(), exts=(), major=1, minor=0) -> bytes:
        idx = Index(CREATOR, list(models), self.entries, tuple(exts))
        return assemble(bytes(self.data), idx, major=major, minor=minor)

    def build11(self, *, models=(), table: bytes | None = None, level: int = 19) -> bytes:
        """Format 1.1: the compact entry table (``table`` overrides it, for bad vectors)."""
        if table is None:
            table = encode_table(self.entries, level)
        idx = Index(CREATOR, list(models), [], (Extension(EXT_COMPACT_ENTRIES, table),))
        return assemble(bytes(self.data), idx, minor=1)


def tree11() -> Builder:
    """The 1.1 sample: a directory, stored files, a single frame, a solid block, twins."""
    return (Builder().dir("docs").file("docs/readme.txt", TEXT).file("docs/empty", b"")
            .file("ünïcødé/名前.bin", BIN, mode=0o600, codec=1)
            .solid11([("src/README", TEXT[:300]), ("src/a.c", b"int main(void) { return 0; }\n"),
                      ("src/readme", TEXT[:200]), ("src/z", b"")]))


def raw_table(body: bytes, encoding: int = 1, size: int | None = None,
              packed: bytes | None = None) -> bytes:
    """A compact table value from raw body bytes (zstd-compressed unless encoding 0;
    ``packed``: the frame bytes to use instead of compressing ``body``)."""
    if packed is None:
        packed = frame(body) if encoding == 1 else body
    return bytes((encoding,)) + struct.pack("<I", len(body) if size is None else size) + packed


def body_dir(name: bytes, keep: int = 0, flags: int = 0, count: int = 1,
             etype: int = TYPE_DIR) -> bytes:
    """A table body of ``count`` identical directory records (for bad vectors); ``etype``
    puts another type byte in front of a directory's fields."""
    out = bytearray()
    put_varint(out, count)
    for _ in range(count):
        put_varint(out, keep)
        put_varint(out, len(name))
        out += name + bytes((etype, flags)) + b"\xed\x03" + b"\x00\x00\x00"
    return bytes(out)


def raw_frame(content: bytes, exponent: int, mantissa: int = 0) -> bytes:
    """A zstd frame (RFC 8878) of one raw block, no content size, whose Window_Descriptor
    declares Window_Size = 2^(10+exponent) * (1 + mantissa/8): written by hand because
    a compressor shrinks the window to fit a small input."""
    assert len(content) < 1 << 17 and 0 <= mantissa < 8
    return (b"\x28\xb5\x2f\xfd" + bytes((0x00, exponent << 3 | mantissa))
            + struct.pack("<I", len(content) << 3 | 1)[:3] + content)


TEXT = b"The quick brown fox jumps over the lazy dog.\n" * 40
BIN = bytes((i * 37 + 11) % 256 for i in range(3000))
MODEL = ModelRecord(bytes(range(32)), "example-model",
                    canonical_json({"batch_width": 8, "dtype": "float32", "segment_length": 64}))


def flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x01
    return bytes(b)


def header_with_flags(data: bytes) -> bytes:
    b = bytearray(data)
    b[12] = 1
    b[28:32] = struct.pack("<I", crc32(bytes(b[:28])))
    return bytes(b)


def vectors() -> dict[str, dict[str, tuple[bytes, str, str]]]:
    """{kind: {file name: (bytes, description, error class or '')}}"""
    good = {
        "empty.llma": (Builder().build(), "an archive with no members"),
        "store.llma": (Builder().dir("docs").file("docs/readme.txt", TEXT)
                       .file("docs/empty", b"").file("ünïcødé/名前.bin", BIN, mode=0o600)
                       .build(), "directory, stored files, an empty file, UTF-8 names, an "
                                 "implied parent directory"),
        "zstd.llma": (Builder().file("a.txt", TEXT, codec=1).file("b.bin", BIN, codec=1)
                      .build(), "two single-frame zstd members"),
        "solid.llma": (Builder().dir("d").solid([("d/1.txt", TEXT), ("d/2.txt", TEXT[:100]),
                                                 ("d/3.bin", BIN), ("d/4.empty", b"")])
                       .file("z.txt", b"after the block", codec=1).build(),
                       "a solid zstd block of four members followed by a single frame"),
        "models.llma": (Builder().file("a.txt", TEXT).build(models=[MODEL]),
                        "a one-model model table (no llm members)"),
        "minor.llma": (Builder().file("a.txt", TEXT, exts=(Extension(0x0042, b"ignore me"),))
                       .build(minor=9, exts=[Extension(0x7FFF, b"\x00" * 5)]),
                       "format 1.9 with non-critical archive and entry extensions: readable"),
        "twins-1.0.llma": (Builder().file("Stra\u00dfe", b"1").file("STRASSE", b"2")
                           .file("caf\u00e9", b"3").file("cafe\u0301", b"4").build(),
                           "format 1.0, names that are twins after NFC + casefold (legal "
                           "since 1.1; refused only when extracting onto a folding file "
                           "system)"),
        "compact.llma": (tree11().build11(),
                         "format 1.1: compact entry table (zstd) with a directory, stored "
                         "files, an empty file, a single zstd frame, a solid block whose "
                         "members carry CRC-32s, and case twins"),
        "compact-plain.llma": (tree11().build11(level=0),
                               "format 1.1: the same entries, table encoding 0 (plain)"),
    }
    t11 = tree11()
    base = Builder().file("a.txt", TEXT).build()
    idx_off = struct.unpack("<Q", base[-40:-32])[0]
    bad = {
        "bad-magic.llma": (b"PK" + base[2:], "wrong magic", "CorruptArchiveError"),
        "truncated.llma": (base[:-1], "last byte missing (footer cut)", "CorruptArchiveError"),
        "appended.llma": (base + b"\0", "a byte after the footer", "CorruptArchiveError"),
        "header-crc.llma": (flip(base, 20), "reserved header byte flipped: header CRC fails",
                            "CorruptArchiveError"),
        "header-flags.llma": (header_with_flags(base), "reserved header flags set (CRC valid)",
                              "CorruptArchiveError"),
        "footer-crc.llma": (flip(base, len(base) - 20), "footer byte flipped: footer CRC fails",
                            "CorruptArchiveError"),
        "index-crc.llma": (flip(base, idx_off + 3), "index byte flipped: index CRC fails",
                           "ChecksumMismatchError"),
        "data-crc.llma": (flip(base, HEADER_SIZE + 5), "stored byte flipped: CRC-32 fails",
                          "ChecksumMismatchError"),
        "sha-mismatch.llma": (Builder().file("a.txt", TEXT, sha256=bytes(32)).build(),
                              "stored bytes intact but the SHA-256 does not match",
                              "ChecksumMismatchError"),
        "traversal.llma": (Builder().file("../evil.txt", TEXT).build(), "name with '..'",
                           "UnsafeArchiveError"),
        "absolute.llma": (Builder().file("/tmp/evil.txt", TEXT).build(), "absolute name",
                          "UnsafeArchiveError"),
        "backslash.llma": (Builder().file("a\\..\\evil", TEXT).build(), "backslash in name",
                           "UnsafeArchiveError"),
        "drive.llma": (Builder().file("C:evil", TEXT).build(), "drive letter",
                       "UnsafeArchiveError"),
        "control-char.llma": (Builder().file("a\x1b[2Jb", TEXT).build(), "control character",
                              "UnsafeArchiveError"),
        "duplicate.llma": (Builder().file("a", b"1").file("a", b"2").build(), "duplicate name",
                           "UnsafeArchiveError"),
        "compact-bomb.llma": (t11.build11(table=raw_table(
                                  body_dir(b"d", count=1) + b"\0" * (1 << 20), size=11)),
                              "table frame decodes to more than its declared size",
                              "CorruptArchiveError"),
        "compact-short.llma": (t11.build11(table=raw_table(body_dir(b"d"), size=12)),
                               "table frame decodes to less than its declared size",
                               "CorruptArchiveError"),
        "compact-trailing.llma": (t11.build11(table=raw_table(body_dir(b"d")) + b"\0"),
                                  "a byte after the table's zstd frame", "CorruptArchiveError"),
        "compact-count.llma": (t11.build11(table=raw_table(b"\xff\xff\x03" + body_dir(b"d")[1:])),
                               "entry count larger than the table can hold",
                               "CorruptArchiveError"),
        "compact-keep.llma": (t11.build11(table=raw_table(body_dir(b"d", keep=1))),
                              "first name keeps a byte of a previous name that does not exist",
                              "CorruptArchiveError"),
        "compact-varint.llma": (t11.build11(table=raw_table(b"\x81\x00" + body_dir(b"d")[1:])),
                                "a varint in overlong form", "CorruptArchiveError"),
        "compact-flags.llma": (t11.build11(table=raw_table(body_dir(b"d", flags=0x08))),
                               "reserved record flag bit set", "CorruptArchiveError"),
        "compact-next.llma": (_compact_next(), "a record continues a solid block that was "
                              "never started", "CorruptArchiveError"),
        "compact-crc.llma": (_compact_crc(), "solid member whose bytes do not match its CRC-32",
                             "ChecksumMismatchError"),
        "compact-and-records.llma": (_compact_and_records(), "index with both entry records "
                                     "and a compact table", "CorruptArchiveError"),
        "file-as-dir.llma": (Builder().file("a", b"1").file("a/b", b"2").build(),
                             "a member inside a regular file", "UnsafeArchiveError"),
        "setuid.llma": (Builder().file("a", b"1", mode=0o4755).build(),
                        "mode with the setuid bit", "CorruptArchiveError"),
        "dir-with-data.llma": (_dir_with_data(), "directory entry with a size",
                               "CorruptArchiveError"),
        "out-of-range.llma": (_patched(lambda e: replace(e, stored_offset=2**40)),
                              "stored offset beyond the file", "CorruptArchiveError"),
        "gap.llma": (_patched(lambda e: replace(e, stored_offset=e.stored_offset + 1,
                                                   stored_size=e.stored_size - 1)),
                     "stored ranges leave a gap", "CorruptArchiveError"),
        "zstd-bomb.llma": (Builder().file("bomb", b"\0" * 10,
                                          payload=frame(b"\0" * (1 << 20)), codec=1).build(),
                           "zstd frame decodes to more than the declared size",
                           "CorruptArchiveError"),
        "zstd-short.llma": (Builder().file("a", TEXT + b"!", payload=frame(TEXT), codec=1)
                            .build(), "zstd frame decodes to less than the declared size",
                            "CorruptArchiveError"),
    }
    extra_good, extra_bad = hostile_vectors()
    good.update(extra_good)
    bad.update(extra_bad)
    extra_good, extra_bad, extra_unsupported = issue27_vectors()
    good.update(extra_good)
    bad.update(extra_bad)
    bad.update(bounds_vectors())
    small_good, small_bad, small_unsupported = small_vectors()
    good.update(small_good)
    bad.update(small_bad)
    extra_unsupported.update(small_unsupported)
    unsupported = {
        "major2.llma": (Builder().file("a.txt", TEXT).build(major=2), "format version 2.0"),
        "codec9.llma": (Builder().file("a.txt", TEXT, codec=9).build(), "unknown codec id 9"),
        "critical-entry-ext.llma": (Builder().file("a.txt", TEXT,
                                                   exts=(Extension(0x8001, b"x"),)).build(),
                                    "unknown critical entry extension 0x8001"),
        "critical-archive-ext.llma": (Builder().file("a.txt", TEXT)
                                      .build(exts=[Extension(0xC000, b"")]),
                                      "unknown critical archive extension 0xc000"),
        "symlink.llma": (Builder().file("link", b"target", etype=TYPE_SYMLINK).build(),
                         "entry of the reserved symlink type"),
        "type7.llma": (Builder().file("x", b"", etype=7).build(), "unknown entry type 7"),
        "compact-encoding9.llma": (t11.build11(table=raw_table(body_dir(b"d"), encoding=9)),
                                   "compact entry table with unknown encoding 9"),
        **extra_unsupported,
    }
    return {
        "good": {k: (v[0], v[1], "") for k, v in good.items()},
        "bad": bad,
        "unsupported": {k: (v[0], v[1], "UnsupportedFeatureError")
                        for k, v in unsupported.items()},
    }


def _compact_next() -> bytes:
    b = Builder().solid11([("a", TEXT), ("b", TEXT[:10])])
    table = encode_table(b.entries, 0)
    body = bytearray(table[5:])
    # first record: count(1) keep(1) add(1) "a" type flags -> flags at offset 5
    assert body[5] == 0x03  # CRC-32 digest + starts a solid block
    body[5] = 0x05  # CRC-32 digest + continues a block
    return b.build11(table=raw_table(bytes(body)))


def _compact_crc() -> bytes:
    b = Builder().solid11([("a", TEXT), ("b", TEXT[:10])])
    b.entries[1] = replace(b.entries[1], data_crc32=b.entries[1].data_crc32 ^ 1)
    return b.build11()


def _compact_and_records() -> bytes:
    b = Builder().file("a.txt", TEXT)
    idx = Index(CREATOR, [], b.entries, (Extension(EXT_COMPACT_ENTRIES, encode_table(b.entries)),))
    return assemble(bytes(b.data), idx, minor=1)


def _dir_with_data() -> bytes:
    b = Builder().dir("d")
    e = b.entries[0]
    b.entries[0] = EntryRecord(e.name, e.type, e.mode, e.mtime_ns, 5, 0, b"", 0, 0,
                               e.sha256, 0)
    return b.build()


def _patched(fn) -> bytes:
    b = Builder().file("a.txt", TEXT).file("b.txt", b"second")
    b.entries[0] = fn(b.entries[0])
    return b.build()


def _index_bytes_replaced(data: bytes, old: bytes, new: bytes) -> bytes:
    """``data`` with ``old`` replaced by ``new`` (same length) inside the index, the index
    and footer CRCs recomputed: for bytes the encoder refuses to write (invalid UTF-8)."""
    assert len(old) == len(new)
    off, size = struct.unpack("<QQ", data[-40:-24])
    index = data[off:off + size]
    assert index.count(old) == 1
    index = index.replace(old, new)
    footer = bytearray(data[-40:])
    footer[24:28] = struct.pack("<I", crc32(index))
    footer[36:40] = struct.pack("<I", crc32(bytes(footer[:36])))
    return data[:off] + index + bytes(footer)


def _with_model(profile: str) -> bytes:
    return Builder().file("a.txt", TEXT).build(
        models=[ModelRecord(bytes(range(32)), "hostile-profile", profile)])


def _resized(b: Builder, size: int) -> bytes:
    b.entries[0] = replace(b.entries[0], size=size)
    return b.build()


def _solid_apart() -> bytes:
    """A solid block whose two members have a directory entry between them."""
    b = Builder().solid([("s/1.txt", TEXT), ("s/2.txt", TEXT[:50])])
    b.entries.insert(1, EntryRecord("s", TYPE_DIR, 0o755, MTIME, 0, 0, b"", 0, 0,
                                    EMPTY_SHA256, 0))
    return b.build()


def hostile_vectors() -> tuple[dict, dict]:
    """Vectors for the hostile classes of issue 8: (good, bad)."""
    bomb = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(
        b"\0" * (1 << 22))
    longer = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(TEXT * 2)
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"skip" + frame(TEXT)
    good = {
        "markup-names.llma": (Builder().file("[/x]", b"1").file("[red]x[/red]", b"2")
                              .file("a]b[", b"3").build(),
                              "names that are rich markup ('[/x]', '[red]x[/red]'): literal "
                              "text"),
        "long-utf8-component.llma": (Builder().file("d/" + "\u00e9" * 127, TEXT).build(),
                                     "a 254-byte component of 127 two-byte characters"),
        "deep-name.llma": (Builder().file("d/" * 99 + "f", b"deep").build(),
                           "one name 100 components deep (199 bytes)"),
        "solid-one.llma": (Builder().solid([("only.txt", TEXT)]).build(),
                           "a one-member solid block (legal)"),
        "solid-apart.llma": (_solid_apart(),
                             "a solid block whose members are not adjacent in the index"),
        "modes-777.llma": (Builder().dir("d", mode=0o777).file("d/f", b"x", mode=0o777)
                           .build(), "mode 0o777 on a directory and a file: extracted as "
                                     "0o755 unless modes are kept"),
    }
    bad = {
        "profile-nan.llma": (_with_model('{"a":NaN}'), "numerics profile with NaN",
                             "CorruptArchiveError"),
        "profile-1e400.llma": (_with_model('{"a":1e400}'),
                               "numerics profile with 1e400 (not a finite binary64)",
                               "CorruptArchiveError"),
        "profile-deep.llma": (_with_model('{"a":' + "[" * 5000 + "]" * 5000 + "}"),
                              "numerics profile nested 5,001 deep", "CorruptArchiveError"),
        "profile-not-object.llma": (_with_model("[1]"), "numerics profile that is an array",
                                    "CorruptArchiveError"),
        "profile-not-canonical.llma": (_with_model('{"b":1, "a":2}'),
                                       "numerics profile not in canonical form",
                                       "CorruptArchiveError"),
        "profile-surrogate.llma": (_with_model('{"a":"\\ud800"}'),
                                   "numerics profile with a lone surrogate escape",
                                   "CorruptArchiveError"),
        "name-empty.llma": (Builder().file("", b"x").build(), "a name of 0 bytes",
                            "CorruptArchiveError"),
        "name-4097.llma": (Builder().file(("a" * 255 + "/") * 16 + "b", b"x").build(),
                           "a name of 4,097 bytes", "CorruptArchiveError"),
        "name-surrogate.llma": (_index_bytes_replaced(Builder().file("x-SUR", b"x").build(),
                                                      b"SUR", b"\xed\xa0\x80"),
                                "a name with the UTF-8 form of a lone surrogate (invalid "
                                "UTF-8)", "CorruptArchiveError"),
        "zstd-claim.llma": (_resized(Builder().file("z", b"", payload=bomb, codec=1),
                                     2**63 - 1),
                            "a small zstd frame recorded as 2^63 - 1 bytes: over 32,768 x "
                            "stored_size", "CorruptArchiveError"),
        "zstd-header-size.llma": (_resized(Builder().file("z", TEXT, payload=longer, codec=1),
                                           len(TEXT)),
                                  "zstd frame header declares more than the recorded size",
                                  "CorruptArchiveError"),
        "zstd-skippable.llma": (Builder().file("z", TEXT, payload=skippable, codec=1).build(),
                                "a skippable frame before the zstd frame",
                                "CorruptArchiveError"),
    }
    return good, bad


def issue27_vectors() -> tuple[dict, dict, dict]:
    """Vectors of the readings issue 27 made normative: the zstd window limit (a MUST,
    128 MiB allowed), the table frame's header checks, and the order of checks inside a
    compact record (flags' reserved bits before the type; solid flags and the fields
    after ``size`` only for a known type). (good, bad, unsupported)"""
    table_body = encode_table(tree11().entries, 0)[5:]  # valid: the frame is the only defect
    good = {
        "zstd-window-128.llma": (Builder().file("z", TEXT, payload=raw_frame(TEXT, 17), codec=1)
                                 .build(), "a zstd frame whose window is exactly 128 MiB "
                                           "(the limit is inclusive)"),
    }
    bad = {
        "zstd-window.llma": (Builder().file("z", TEXT, payload=raw_frame(TEXT, 17, 1), codec=1)
                             .build(), "a zstd frame whose header declares a 144 MiB window "
                                       "(over 128 MiB)", "CorruptArchiveError"),
        "compact-window.llma": (tree11().build11(table=raw_table(
                                    table_body, packed=raw_frame(table_body, 17, 1))),
                                "compact table frame with a 144 MiB window",
                                "CorruptArchiveError"),
        "compact-skippable.llma": (tree11().build11(table=raw_table(
                                       table_body, packed=struct.pack("<II", 0x184D2A50, 4)
                                       + b"skip" + frame(table_body))),
                                   "a skippable frame before the compact table's frame",
                                   "CorruptArchiveError"),
        "compact-type-flags.llma": (tree11().build11(table=raw_table(
                                        body_dir(b"d", flags=0x08, etype=7))),
                                    "a record of unknown type 7 with a reserved flag bit: "
                                    "the flags are checked before the type",
                                    "CorruptArchiveError"),
    }
    unsupported = {
        "compact-type7-next.llma": (tree11().build11(table=raw_table(
                                        body_dir(b"d", flags=0x04, etype=7))),
                                    "first record of unknown type 7 with SOLID_NEXT: the solid "
                                    "flags are checked only for files, after the type"),
        "compact-type7-short.llma": (tree11().build11(table=raw_table(
                                         body_dir(b"d", etype=7)[:-1])),
                                     "a record of unknown type 7 that ends after its size "
                                     "field: what follows the type is read only for known "
                                     "types"),
    }
    return good, bad, unsupported


def bounds_vectors() -> dict:
    """Issue 22: the compact table is exactly one zstd frame with nothing after it, and
    its decoding is bounded by its real bytes. (bad)"""
    table_body = encode_table(tree11().entries, 0)[5:]  # valid: the frame is the only defect
    zeros = zstandard.ZstdCompressor(level=19, write_content_size=False).compressobj()
    bomb = b"".join(zeros.compress(bytes(1 << 20)) for _ in range(256)) + zeros.flush()
    return {
        "compact-two-frames.llma": (tree11().build11(table=raw_table(
                                        table_body, packed=frame(table_body) + frame(b""))),
                                    "the compact table's frame followed by a second, empty "
                                    "frame (the body's size still matches)",
                                    "CorruptArchiveError"),
        "compact-skippable-after.llma": (tree11().build11(table=raw_table(
                                             table_body, packed=frame(table_body)
                                             + struct.pack("<II", 0x184D2A50, 4) + b"skip")),
                                         "a skippable frame after the compact table's frame",
                                         "CorruptArchiveError"),
        "compact-zeros.llma": (tree11().build11(table=raw_table(
                                   b"", size=1 << 28, packed=bomb)),
                               "a table frame of 8 KB that decodes to exactly its declared "
                               "256 MiB, all zeros (0 entries, then trailing bytes): fails "
                               "after its first piece, never holding 256 MiB",
                               "CorruptArchiveError"),
    }


def expected_members(data: bytes) -> dict[str, str]:
    """name -> "dir" or the SHA-256 of the member's bytes (for 1.1 solid members, which
    record a CRC-32, the SHA-256 of the bytes the vector was built from)."""
    from llmarc.container.index import disassemble
    entries = disassemble(data)[1].entries  # either major version
    return {e.name: ("dir" if e.type == TYPE_DIR else
                     sha_of(e).hex()) for e in entries}


def sha_of(e: EntryRecord) -> bytes:
    """The full SHA-256 of a member's bytes, also where the archive records less (a 1.1
    solid member's CRC-32, a 3.0 DIGEST128 prefix)."""
    if len(e.sha256) == 32:
        return e.sha256
    if e.sha256:
        return TRUTH[(e.name, e.sha256)]
    return TRUTH[(e.name, e.data_crc32)]


def small(b: Builder, *, creator: str = CREATOR, index_hook=None, minor: int = 0) -> bytes:
    """A format 3.0 archive (spec/format.md §12) of ``b``'s entries: offsets rebased to
    the 12-byte header. ``index_hook`` rewrites the index bytes (bad vectors); the
    trailer is then computed over the result, so its CRC matches."""
    shift = SMALL_HEADER_SIZE - HEADER_SIZE
    entries = [replace(e, stored_offset=e.stored_offset + shift) if e.type == TYPE_FILE
               else e for e in b.entries]
    raw = encode_small_index(Index(creator, [], entries, ()))
    if index_hook is not None:
        raw = index_hook(raw)
    return encode_small_header(minor) + bytes(b.data) + raw + encode_trailer(raw, minor)


def small_vectors() -> tuple[dict, dict, dict]:
    """Format 3.0 (issue 24): the small layout with every kind of entry; its trailer,
    header and index checks; DIGEST128 (and that a 1.1 table still refuses flag bit 3).
    (good, bad, unsupported)"""
    t = tree11()
    good_small = small(t)
    digest = Builder().file("a.txt", TEXT)
    digest.entries[0] = replace(digest.entries[0], sha256=sha(TEXT)[:16])
    TRUTH[("a.txt", sha(TEXT)[:16])] = sha(TEXT)
    digest_bad = Builder().file("a.txt", TEXT)
    digest_bad.entries[0] = replace(digest_bad.entries[0], sha256=bytes(16))
    flipped_minor = bytearray(good_small)
    flipped_minor[10] ^= 1  # the version bytes have no CRC of their own: the trailer's covers them
    bit3 = encode_table(Builder().file("a.txt", TEXT).entries, 0)
    body = bytearray(bit3[5:])
    i = 1 + 1 + 1 + 5 + 1  # count, keep, add_len, "a.txt", type: then flags
    assert body[i] == 0
    body[i] = 0x08  # DIGEST128 in a 1.1 table: still a reserved bit there
    table11 = bytes((0,)) + struct.pack("<I", len(body)) + bytes(body)
    b11 = Builder().file("a.txt", TEXT)
    idx11 = Index(CREATOR, [], [], (Extension(EXT_COMPACT_ENTRIES, table11),))
    good = {
        "small.llma": (good_small, "format 3.0 (§12): the 1.1 sample tree (directory, stored "
                       "files, a zstd frame, a solid block, twins) in the small layout"),
        "small-empty.llma": (small(Builder(), creator=""), "format 3.0, no members, no "
                             "creator: the smallest archive (25 bytes)"),
        "small-digest128.llma": (small(digest), "format 3.0, one stored member whose digest "
                                 "is the first 16 bytes of its SHA-256 (DIGEST128, §12.4)"),
        "small-zstd-index.llma": (_small_zstd_index(t), "format 3.0 with its index body as "
                                  "one zstd frame (index encoding 1)"),
    }
    bad = {
        "small-trailer-size.llma": (good_small[:-8] + struct.pack("<II", 1 << 20,
                                                                  0), "format 3.0 trailer "
                                    "index size larger than the file", "CorruptArchiveError"),
        "small-index-crc.llma": (good_small[:-1] + bytes((good_small[-1] ^ 1,)),
                                 "format 3.0 trailer CRC does not match",
                                 "ChecksumMismatchError"),
        "small-minor-flipped.llma": (bytes(flipped_minor), "format 3.0 header's minor "
                                     "version changed: the trailer CRC covers the header",
                                     "ChecksumMismatchError"),
        "small-short.llma": (encode_small_header() + b"\0" * 7, "format 3.0 header and 7 "
                             "bytes: no room for the trailer", "CorruptArchiveError"),
        "small-digest128-mismatch.llma": (small(digest_bad), "format 3.0 DIGEST128 member "
                                          "whose 16-byte digest does not match",
                                          "ChecksumMismatchError"),
        "small-digest128-crc32.llma": (small(digest, index_hook=lambda raw: raw.replace(
            b"a.txt\x00\x08", b"a.txt\x00\x09", 1)), "format 3.0 record with both CRC32 "
            "and DIGEST128 set", "CorruptArchiveError"),
        "compact-digest128-in-1.1.llma": (assemble(bytes(b11.data), idx11, minor=1),
                                          "format 1.1 compact record with flag bit 3 "
                                          "(DIGEST128 exists only in 3.0): reserved",
                                          "CorruptArchiveError"),
    }
    # a stored byte more than the table places: the data area is not tiled
    gap = bytearray(small(Builder().file("a.txt", TEXT)))
    raw_len = struct.unpack_from("<I", gap, len(gap) - 8)[0]
    index = bytes(gap[len(gap) - 8 - raw_len:len(gap) - 8])
    gap = encode_small_header() + bytes(Builder().file("a.txt", TEXT).data) + b"!" + index \
        + encode_trailer(index)
    bad["small-gap.llma"] = (gap, "format 3.0 data area one byte longer than its stored "
                             "ranges", "CorruptArchiveError")
    unsupported = {
        "major4.llma": (encode_small_header()[:8] + struct.pack("<HH", 4, 0)
                        + bytes(good_small[12:]), "format version 4.0"),
        "small-index-encoding9.llma": (small(t, index_hook=lambda raw: bytes((9,)) + raw[1:]),
                                       "format 3.0 index with unknown encoding 9"),
        "small-critical-ext.llma": (_small_critical_ext(), "format 3.0 archive extension "
                                    "area with unknown critical tag 0xc000"),
    }
    return good, bad, unsupported


def _small_zstd_index(t: Builder) -> bytes:
    shift = SMALL_HEADER_SIZE - HEADER_SIZE
    entries = [replace(e, stored_offset=e.stored_offset + shift) if e.type == TYPE_FILE
               else e for e in t.entries]
    body = encode_small_index(Index(CREATOR, [], entries, ()))[1:]
    head = bytearray((1,))
    put_varint(head, len(body))
    raw = bytes(head) + zstandard.ZstdCompressor(level=19, write_content_size=False) \
        .compress(body)
    return encode_small_header() + bytes(t.data) + raw + encode_trailer(raw)


def _small_critical_ext() -> bytes:
    b = Builder().file("a.txt", TEXT)
    entries = [replace(e, stored_offset=e.stored_offset + SMALL_HEADER_SIZE - HEADER_SIZE)
               for e in b.entries]
    raw = encode_small_index(Index(CREATOR, [], entries, (Extension(0xC000, b""),)))
    return encode_small_header() + bytes(b.data) + raw + encode_trailer(raw)


def main() -> None:
    manifest: dict[str, dict] = {"good": {}, "bad": {}, "unsupported": {}}
    lines = ["# .llma test vectors", "",
             "Generated by `python spec/vectors/make_vectors.py` (deterministic: fixed names, "
             "bytes and mtimes). `manifest.json` is the machine-readable form of this list; "
             "`tests/test_vectors.py` runs every file.", "",
             "* `good/` must open, `test()` and extract; every member's SHA-256 is listed in "
             "the manifest (`\"dir\"` for directories).",
             "* `bad/` must fail with the named exception class (or a subclass).",
             "* `unsupported/` are well formed but need a newer reader: they must fail with "
             "`UnsupportedFeatureError`.",
             "* `entropy/` (if present) holds the LLM codec's entropy-coding vectors; it is "
             "described by its own README and spec/llm-codec.md, not by this script.", ""]
    for kind, items in vectors().items():
        d = HERE / kind
        d.mkdir(exist_ok=True)
        for old in d.glob("*.llma"):
            old.unlink()
        lines.append(f"## {kind}/")
        lines.append("")
        for name, (data, why, error) in sorted(items.items()):
            (d / name).write_bytes(data)
            rec: dict = {"why": why}
            if kind == "good":
                rec["members"] = expected_members(data)
                lines.append(f"* `{name}` — {why}")
            else:
                rec["error"] = error
                lines.append(f"* `{name}` — {why} → `{error}`")
            manifest[kind][name] = rec
        lines.append("")
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False,
                                                   sort_keys=True) + "\n", encoding="utf-8")
    (HERE / "README.md").write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
