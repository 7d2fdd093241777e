"""``--verify`` (README "Use"): the finished archive is decoded and every checksum checked
*before* it is renamed into place, so an encoder that wrote wrong bytes leaves nothing
under OUT.

The corruption is injected after encoding, at the packer's seam between the codecs and
the writer: the codec's output is damaged on its way to ``write_stored``, while the
entry keeps the SHA-256 of the true bytes and a CRC-32 of what was really written (so
only decoding can notice).  Without verification such a pack succeeds and leaves a
broken archive (checked here too, so the injection is known to reach the archive)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

import llmarc
from llmarc import cli, packer
from llmarc.codecs.llm_options import LLMOptions
from llmarc.errors import LlmarcError

from .conftest import TINY_BPE, make_tree

TEXT = (Path(__file__).resolve().parent.parent / "fixtures" / "tiny-training.txt"
        ).read_bytes()[:600]


def _flip(payload: bytes) -> bytes:
    """Damage a payload where a decoder must notice: a byte near its middle."""
    middle = len(payload) // 2
    return payload[:middle] + bytes([payload[middle] ^ 0x5A]) + payload[middle + 1 :]


@pytest.fixture
def corrupt_llm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every LLM payload reaches the writer with one byte flipped."""
    original = packer.encode_llm_batch

    def damaged(*args, **kwargs) -> Iterator[packer.Coded]:
        for coded in original(*args, **kwargs):
            yield dataclasses.replace(coded, payload=_flip(coded.payload))

    monkeypatch.setattr(packer, "encode_llm_batch", damaged)


@pytest.fixture
def corrupt_zstd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every zstd frame the packer writes decodes to other bytes of the same length (a
    valid frame: only the SHA-256 check can tell)."""
    original = packer.zstd_codec.encode

    def other_bytes(chunks: Iterable[bytes], level: int, size: int) -> Iterator[bytes]:
        data = bytearray(b"".join(chunks))
        data[0] ^= 0x01
        return original([bytes(data)], level, size)

    monkeypatch.setattr(packer.zstd_codec, "encode", other_bytes)


def _leftovers(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_verify_keeps_a_corrupt_llm_payload_from_out(tmp_path: Path, corrupt_llm) -> None:
    src = make_tree(tmp_path / "src", {"a.txt": TEXT})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    options = LLMOptions(model=str(TINY_BPE), device="cpu", segment_length=64)
    with pytest.raises(LlmarcError):
        llmarc.pack(src, out_dir / "a.llma", codec="llm", llm=options, verify=True,
                    warn=lambda m: None)
    assert _leftovers(out_dir) == []  # neither the archive nor its temporary file
    # The same injection without --verify gives an archive that does not decode: the
    # test above failed because of verification, not because the pack broke otherwise.
    llmarc.pack(src, out_dir / "b.llma", codec="llm", llm=options, warn=lambda m: None)
    with llmarc.open(out_dir / "b.llma", model=TINY_BPE, device="cpu") as archive, \
            pytest.raises(LlmarcError):
        archive.test()


def test_verify_through_the_cli_exits_1_and_writes_nothing(
    tmp_path: Path, corrupt_zstd, capsys: pytest.CaptureFixture[str]
) -> None:
    src = make_tree(tmp_path / "src", {"a.bin": bytes(range(256)) * 8,
                                       "b.bin": b"\x00\x01" * 3000})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = cli.run(["pack", str(src), str(out_dir / "a.llma"), "--codec", "zstd",
                    "--verify", "-q"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.strip().splitlines()[-1].startswith("llmarc: error:"), err
    assert "does not match" in err, err  # the members' digest (solid block: CRC-32)
    assert _leftovers(out_dir) == []
    code = cli.run(["pack", str(src), str(out_dir / "b.llma"), "--codec", "zstd", "-q"])
    assert code == 0  # unverified, the damage goes unnoticed until the archive is read
    assert cli.run(["test", str(out_dir / "b.llma")]) == 1
