"""Model fingerprint and numerics profile: what must match for bit-identical probabilities.

Two different things are recorded in the archive's model table:

* the **fingerprint** (32 bytes): SHA-256 over everything that defines the probability
  function in exact arithmetic, as llmarc derives it from the model's files
  (:class:`~llmarc.model.derived.DerivedModel`): the weights' exact values, the
  token-to-bytes table, the canonical architecture and the start token (version 2,
  spec/model.md §6).  Archives of llmarc 0.1 carry version 1, which hashed the same
  things as transformers presented them; :func:`legacy_fingerprints` reproduces it from
  the same derivation, so those archives open without transformers too.  A different
  fingerprint is a different model: extraction refuses
  (:class:`~llmarc.errors.ModelMismatchError`), naming the component that differs where
  the archive recorded component digests (the profile's ``model`` key).
* the **numerics profile** (canonical JSON): how the arithmetic was carried out.  Its
  *settings* (batch width, segment length, dtype, threads, precision, engine) are adopted
  by the decoder, so they always match; its *environment* (device type and name, CPU
  kernel ISA, library versions) cannot be chosen, so a difference only warns, and the
  per-entry SHA-256 decides.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

from llmarc.model.architecture import legacy_forms
from llmarc.model.derived import DerivedModel
from llmarc.model.sources import remembered
from llmarc.model.tokenbytes import table_digest

FINGERPRINT_V1_DOMAIN = b"llmarc-model-fingerprint-v1\n"
FINGERPRINT_V2_DOMAIN = b"llmarc-model-fingerprint-v2\n"
WEIGHTS_V2_DOMAIN = b"llmarc-weights-v2\x00"
#: Bytes of each component digest recorded in a profile's ``model`` key (diagnostics only).
SHORT_DIGEST = 4

# Profile keys the decoder adopts from the archive (it can always set them itself).
PROFILE_SETTINGS = ("engine", "batch_width", "segment_length", "dtype", "threads", "precision")
#: The profile key holding the short component digests (spec/llm-codec.md §2.2).
COMPONENTS_KEY = "model"


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, ASCII only: the byte form stored and hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def weights_digest(derived: DerivedModel) -> bytes:
    """Fingerprint v2's weights digest: SHA-256 over the domain tag, then for each weight
    in canonical order its name, shape and float32 values (spec/model.md §6).  Remembered
    per model-file digest: the values are a function of the files' bytes."""
    def compute() -> str:
        sha = hashlib.sha256(WEIGHTS_V2_DOMAIN)
        shapes = derived.shapes
        sha.update(struct.pack("<I", len(shapes)))
        for name, values in derived.tensors():
            encoded = name.encode()
            sha.update(struct.pack("<I", len(encoded)) + encoded)
            sha.update(struct.pack(f"<I{values.ndim}Q", values.ndim, *values.shape))
            sha.update(values.astype("<f4", copy=False).tobytes())
        return sha.hexdigest()

    return bytes.fromhex(remembered(f"weights-v2|{derived.source_digest}", compute))


@dataclass(frozen=True)
class Components:
    """The four things a fingerprint covers, each digested on its own."""

    weights: bytes
    table: bytes
    architecture: str  # canonical JSON
    start_token: int

    @classmethod
    def of(cls, derived: DerivedModel) -> Components:
        return cls(weights_digest(derived), table_digest(derived.table),
                   canonical_json(derived.architecture.canonical()), derived.start_token)

    @property
    def fingerprint(self) -> bytes:
        """Fingerprint v2."""
        return _fingerprint(FINGERPRINT_V2_DOMAIN, self.weights, self.table,
                            self.architecture, self.start_token)

    def short(self) -> dict[str, Any]:
        """What a writer records beside the fingerprint so that a reader with another
        model can say which component differs."""
        architecture = hashlib.sha256(self.architecture.encode()).digest()
        return {"arch": architecture[:SHORT_DIGEST].hex(), "start": self.start_token,
                "table": self.table[:SHORT_DIGEST].hex(),
                "weights": self.weights[:SHORT_DIGEST].hex()}


def _fingerprint(domain: bytes, weights: bytes, table: bytes, architecture: str,
                 start_token: int) -> bytes:
    sha = hashlib.sha256(domain)
    sha.update(weights)
    sha.update(table)
    sha.update(architecture.encode())
    sha.update(start_token.to_bytes(4, "little"))
    return sha.digest()


def legacy_fingerprints(derived: DerivedModel) -> list[bytes]:
    """Every version-1 fingerprint llmarc 0.1 could have recorded for this model (one
    per transformers spelling of its config: spec/model.md §6.2)."""
    weights = bytes.fromhex(remembered(f"weights-v1|{derived.source_digest}",
                                       derived.legacy_weights_digest))
    table = table_digest(derived.table)
    return [_fingerprint(FINGERPRINT_V1_DOMAIN, weights, table, canonical_json(form),
                         derived.start_token)
            for form in legacy_forms(derived.legacy_config)]


def differing_components(recorded: Any, ours: Components) -> list[str]:
    """The components whose recorded short digests differ from ``ours`` (empty when the
    archive recorded none, or recorded them malformed: they are diagnostics only)."""
    if not isinstance(recorded, dict):
        return []
    mine = ours.short()
    labels = {"weights": "weights", "table": "token table", "arch": "architecture",
              "start": "start token"}
    return [label for key, label in labels.items()
            if key in recorded and recorded[key] != mine[key]]


def profile_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable ``key: recorded != current`` lines for every differing key."""
    keys = sorted(set(recorded) | set(current))
    return [
        f"{key}: archive {recorded.get(key)!r}, here {current.get(key)!r}"
        for key in keys
        if recorded.get(key) != current.get(key)
    ]
