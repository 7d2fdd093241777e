"""The architecture of a LLaMA-family model in one canonical form (spec/model.md §4).

A model folder's ``config.json`` spells the same model in several ways (``rope_theta``
at the top level or inside ``rope_parameters``, ``rope_scaling`` with ``type`` or
``rope_type``, fields left to defaults), and a GGUF file spells it again in its own
metadata keys.  The archive must not care which: every spelling is normalized here,
with the defaults written down, into one :class:`Architecture` whose canonical JSON
enters fingerprint v2.  The forms that transformers 4.x and 5.x made of a config (which
fingerprint v1 hashed) are reproduced by :func:`legacy_forms`, so archives made by
llmarc 0.1 keep opening without transformers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from llmarc.errors import ModelError
from llmarc.model.gguf_file import Float32Value

SUPPORTED_MODEL_TYPES = ("llama",)

# LlamaConfig's defaults (transformers 4.x and 5.x alike) for fields a config omits.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "mlp_bias": False,
}


@dataclass(frozen=True)
class Architecture:
    """What defines a LLaMA-family network's computation, every field always present.

    The attribute names are transformers' config names, so code that sizes caches from
    a config reads this object the same way."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    attention_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool

    def canonical(self) -> dict[str, Any]:
        """The object fingerprint v2 hashes (as canonical JSON)."""
        return asdict(self)

    @classmethod
    def from_config(cls, config: dict[str, Any], what: str) -> Architecture:
        """Normalize a ``config.json`` object (spec/model.md §4.1)."""
        if not isinstance(config, dict):
            raise ModelError(f"{what}: config.json is not a JSON object")
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelError(f"{what}: model type {model_type!r} is not supported "
                             "(llmarc runs LLaMA-family models: model_type 'llama')")
        rope_parameters = _object(config, "rope_parameters", what)
        rope_scaling = _object(config, "rope_scaling", what)
        theta = rope_parameters.get("rope_theta", config.get("rope_theta"))
        scaling = {k: v for k, v in {**rope_scaling, **rope_parameters}.items()
                   if k != "rope_theta"}
        if "type" in scaling:
            scaling.setdefault("rope_type", scaling.pop("type"))
        if scaling.get("rope_type", "default") == "default" and set(scaling) <= {"rope_type"}:
            scaling = {}
        values = {**DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
        heads = _int(values, "num_attention_heads", what)
        hidden = _int(values, "hidden_size", what)
        values.setdefault("num_key_value_heads", heads)
        if values.get("head_dim") is None:
            if hidden % heads:
                raise ModelError(f"{what}: hidden_size {hidden} is not a multiple of "
                                 f"num_attention_heads {heads}; give head_dim")
            values["head_dim"] = hidden // heads
        values["rope_theta"] = DEFAULTS["rope_theta"] if theta is None else theta
        return cls.build(values, scaling or None, what)

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], vocab_size: int, tied: bool,
                  what: str) -> Architecture:
        """Normalize a GGUF file's ``llama.*`` metadata (spec/model.md §3.4)."""
        arch = metadata.get("general.architecture")
        if arch not in SUPPORTED_MODEL_TYPES:
            raise ModelError(f"{what}: GGUF architecture {arch!r} is not supported "
                             "(llmarc runs LLaMA-family models: 'llama')")

        def key(name: str, default: Any = None) -> Any:
            value = metadata.get(f"{arch}.{name}", default)
            if value is None:
                raise ModelError(f"{what}: GGUF metadata lacks {arch}.{name}")
            return value.value if isinstance(value, Float32Value) else value

        if metadata.get(f"{arch}.expert_count"):
            raise ModelError(f"{what}: mixture-of-experts models are not supported")
        scaling_type = key("rope.scaling.type", "none")
        if scaling_type not in ("none", "default"):
            raise ModelError(f"{what}: rope scaling {scaling_type!r} is not supported")
        heads = key("attention.head_count")
        hidden = key("embedding_length")
        values = {
            "model_type": arch,
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": key("feed_forward_length"),
            "num_hidden_layers": key("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": key("attention.head_count_kv", heads),
            "head_dim": key("attention.key_length",
                            key("rope.dimension_count",
                                hidden // heads if isinstance(heads, int) and heads else 0)),
            "hidden_act": "silu",
            "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
            "rope_theta": key("rope.freq_base", DEFAULTS["rope_theta"]),
            "max_position_embeddings": key("context_length"),
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": tied,
        }
        return cls.build(values, None, what)

    @classmethod
    def build(cls, values: dict[str, Any], scaling: dict[str, Any] | None,
              what: str) -> Architecture:
        """Check every field's type and range (a malformed config is a ModelError)."""
        ints = {name: _int(values, name, what) for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim",
            "max_position_embeddings")}
        if ints["num_attention_heads"] % ints["num_key_value_heads"]:
            raise ModelError(f"{what}: {ints['num_attention_heads']} attention heads are "
                             f"not a multiple of {ints['num_key_value_heads']} key/value heads")
        floats = {name: _positive_float(values, name, what)
                  for name in ("rms_norm_eps", "rope_theta")}
        flags = {name: values[name] for name in
                 ("attention_bias", "mlp_bias", "tie_word_embeddings")}
        for name, flag in flags.items():
            if not isinstance(flag, bool):
                raise ModelError(f"{what}: {name} must be true or false, not {flag!r}")
        if not isinstance(values["hidden_act"], str):
            raise ModelError(f"{what}: hidden_act must be a string")
        return cls(model_type=values["model_type"], hidden_act=values["hidden_act"],
                   rope_scaling=scaling, **ints, **floats, **flags)


def _object(config: dict[str, Any], name: str, what: str) -> dict[str, Any]:
    value = config.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ModelError(f"{what}: {name} must be a JSON object")
    return value


def _int(values: dict[str, Any], name: str, what: str) -> int:
    value = values.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{what}: {name} must be a positive integer, not {value!r}")
    return value


def _positive_float(values: dict[str, Any], name: str, what: str) -> float:
    value = values.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value <= 0:
        raise ModelError(f"{what}: {name} must be a positive number, not {value!r}")
    return float(value)


# ---------------------------------------------------------------- fingerprint v1 forms
#: The config keys fingerprint v1 hashed (spec/model.md §6), as transformers returned them.
V1_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "max_position_embeddings", "attention_bias", "mlp_bias", "tie_word_embeddings",
)


def legacy_forms(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The architecture objects fingerprint v1 may have hashed for ``config``.

    llmarc 0.1 hashed ``config.to_dict()`` of whatever transformers was installed:
    transformers 4.x keeps the file's keys and adds its defaults (``rope_theta`` 10000.0
    when absent, even beside a ``rope_parameters``); 5.x folds ``rope_theta`` and
    ``rope_scaling`` into ``rope_parameters``.  Both are reproduced from the file."""
    values = {**DEFAULTS, "rope_scaling": None,
              **{k: v for k, v in config.items() if k in V1_KEYS}}
    if values.get("num_key_value_heads") is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    if values.get("head_dim") is None:
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    scaling = values["rope_scaling"]
    if isinstance(scaling, dict) and "type" in scaling:
        scaling = values["rope_scaling"] = {**scaling, "rope_type": scaling["type"]}
    v4 = {k: v for k, v in values.items() if v is not None}
    parameters = values.get("rope_parameters")
    if not isinstance(parameters, dict):
        parameters = {"rope_theta": values["rope_theta"], "rope_type": "default",
                      **(scaling or {})}
    v5 = {k: v for k, v in values.items()
          if v is not None and k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = parameters
    return [v5, v4] if v5 != v4 else [v5]


def converted_config(architecture: Architecture) -> dict[str, Any]:
    """The config.json llmarc 0.1 wrote for a GGUF model (through transformers), as far
    as fingerprint v1 read it: the GGUF values under transformers' names."""
    config = {k: v for k, v in architecture.canonical().items() if k != "rope_scaling"}
    return config
