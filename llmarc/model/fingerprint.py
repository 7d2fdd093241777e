"""Model fingerprint and numerics profile: what must match for bit-identical probabilities.

Two different things are recorded in the archive's model table:

* the **fingerprint** (32 bytes): SHA-256 over everything that defines the probability
  function in exact arithmetic: the weights, the token-to-bytes table, the architecture
  fields of the config and the start token.  A different fingerprint is a different
  model: extraction refuses (:class:`~llmarc.errors.ModelMismatchError`).
* the **numerics profile** (canonical JSON): how the arithmetic was carried out.  Its
  *settings* (batch width, segment length, dtype, threads, precision, engine) are adopted
  by the decoder, so they always match; its *environment* (device type and name, CPU
  kernel ISA, library versions) cannot be chosen, so a difference only warns, and the
  per-entry SHA-256 decides.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

FINGERPRINT_DOMAIN = b"llmarc-model-fingerprint-v1\n"

# Config fields that change the function a LLaMA-family model computes.  A whitelist, so
# a transformers release that adds bookkeeping fields does not change fingerprints.
ARCHITECTURE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "max_position_embeddings",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
)

# Profile keys the decoder adopts from the archive (it can always set them itself).
PROFILE_SETTINGS = ("engine", "batch_width", "segment_length", "dtype", "threads", "precision")


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, ASCII only: the byte form stored and hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def architecture_of(config: Any) -> dict[str, Any]:
    """The architecture-defining subset of a transformers config."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {key: data[key] for key in ARCHITECTURE_FIELDS if data.get(key) is not None}


def model_fingerprint(
    weights_digest: str, table_digest: bytes, architecture: dict[str, Any], start_token: int
) -> bytes:
    """SHA-256 over the domain tag, weights digest, table digest, architecture, start token."""
    sha = hashlib.sha256(FINGERPRINT_DOMAIN)
    sha.update(bytes.fromhex(weights_digest))
    sha.update(table_digest)
    sha.update(canonical_json(architecture).encode())
    sha.update(start_token.to_bytes(4, "little"))
    return sha.digest()


def profile_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable ``key: recorded != current`` lines for every differing key."""
    keys = sorted(set(recorded) | set(current))
    return [
        f"{key}: archive {recorded.get(key)!r}, here {current.get(key)!r}"
        for key in keys
        if recorded.get(key) != current.get(key)
    ]
