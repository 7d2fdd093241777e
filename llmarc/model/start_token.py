"""Which token starts every segment, from a model folder's files (spec/model.md §2.5).

The files may disagree (``tokenizer_config.json`` names a string, ``config.json`` an
id), so the spec fixes one order; transformers' choice of the day is not consulted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmarc.errors import ModelError


@dataclass
class StartTokenRule:
    """The sources the start token may come from, in the spec's order of precedence."""

    tokenizer_config: dict[str, Any] = field(default_factory=dict)
    special_tokens_map: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    token_ids: dict[str, int] = field(default_factory=dict)


def resolve_start_token(rule: StartTokenRule, width: int, what: str) -> int:
    """The BOS token, else the EOS token; for each, the first of: ``tokenizer_config.json``
    ``<role>_token`` (a string, or an object's ``content``, looked up in the vocabulary),
    ``special_tokens_map.json`` the same, ``config.json`` ``<role>_token_id`` (an integer,
    or the first of a list)."""
    for role in ("bos", "eos"):
        for source, name in ((rule.tokenizer_config, "tokenizer_config.json"),
                             (rule.special_tokens_map, "special_tokens_map.json")):
            token = source.get(f"{role}_token")
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str):
                if token not in rule.token_ids:
                    raise ModelError(f"{what}: {name} names {role}_token {token!r}, "
                                     "which is not in the vocabulary")
                return _checked(rule.token_ids[token], width, what)
        value = rule.config.get(f"{role}_token_id")
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool):
            return _checked(value, width, what)
    raise ModelError(f"{what}: no BOS or EOS token is named (tokenizer_config.json, "
                     "special_tokens_map.json, config.json)")


def _checked(token: int, width: int, what: str) -> int:
    if not 0 <= token < width:
        raise ModelError(f"{what}: start token {token} is outside the vocabulary 0..{width - 1}")
    return token
