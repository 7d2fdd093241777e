"""The rotary tables' digests printed in spec/llm-codec.md §5.5 are the engine's tables.

An implementer checks their correctly rounded cos/sin tables against those digests before
any logits, so a digest in the spec that drifted from what llmarc computes would send them
hunting for a bug they do not have. The table is read from the spec itself, so the two
cannot disagree silently.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from llmarc.inference.rope import rope_tables

SPEC = Path(__file__).resolve().parent.parent / "spec" / "llm-codec.md"
ROW = re.compile(r"^\| (\d+) \| (\d+) \| (\d+) \| `([0-9a-f]{64})` \| `([0-9a-f]{64})` \|", re.M)


def _digest(table: np.ndarray) -> str:
    """SHA-256 of a table as the spec serializes it: rows of little-endian binary64."""
    return hashlib.sha256(np.ascontiguousarray(table, dtype="<f8").tobytes()).hexdigest()


def test_spec_rotary_digests_are_the_engines_tables() -> None:
    rows = ROW.findall(SPEC.read_text(encoding="utf-8"))
    assert {(int(dh), int(base)) for dh, base, *_ in rows} == {(16, 10000), (64, 100000)}
    for head_dim, base, length, cos_digest, sin_digest in rows:
        cos, sin = rope_tables(float(base), int(head_dim), int(length))
        assert cos.shape == (int(length), int(head_dim) // 2)
        assert (_digest(cos), _digest(sin)) == (cos_digest, sin_digest), (head_dim, base, length)


def test_first_row_is_one_and_positive_zero() -> None:
    """§5.5 states C[0] = 1.0 and S[0] = +0.0: a -0.0 would change the digest."""
    cos, sin = rope_tables(10000.0, 16, 2)
    assert np.all(cos[0] == 1.0)
    assert not np.any(sin[0].view(np.uint64))
