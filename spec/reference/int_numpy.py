"""A second implementation of the int-v1 and int-v2 engines (spec/llm-codec.md §5),
NumPy only.

Written from the spec, not from llmarc's engine, and deliberately different in every
place the spec leaves free: integer products are int64 ``matmul`` (no BLAS, no float),
the model is read straight from ``model.safetensors`` + ``config.json`` with
``safetensors.numpy`` (no torch, no transformers), positions are computed one query at a
time.  It is slow and small on purpose: its job is to prove that the spec is
implementable and that llmarc's logits follow it bit for bit (tests/test_int_reference.py
compares the two on the fixture models and on SmolLM2).

Usage: ``logits = IntReference(folder, engine="int-v2").logits(tokens)`` -> float32
[T, V].
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

RESIDUAL_BITS = 24
NORM_BITS = 20
LINEAR_LEVELS = 127
#: §5.6: N of the attention's quantizers, the one difference between the two engines.
ATTENTION_LEVELS = {"int-v1": 32767, "int-v2": 127}
LOG2E_SCALED = float.fromhex("0x1.71547652b82fep+8")  # entropy.md §2: 256 * log2(e)


def exp2_table() -> np.ndarray:
    """entropy.md §2.1: T[r] = round(2^(31 - r/256)), decided in exact integers."""
    table = []
    for r in range(256):
        guess = round(2.0 ** (31 - r / 256))
        for candidate in (guess - 1, guess, guess + 1):
            if (2 * candidate - 1) ** 256 <= 1 << (8192 - r) < (2 * candidate + 1) ** 256:
                table.append(candidate)
                break
    return np.array(table, dtype=np.int64)


EXP2 = exp2_table()


def exp_weight(e: np.ndarray) -> np.ndarray:
    """W(e) = T[e mod 256] >> floor(e / 256) for integer e >= 0, 0 from e >= 10240."""
    e = np.minimum(e, 10240).astype(np.int64)
    return EXP2[e & 255] >> (e >> 8)


def quantize(v: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """§5.2 Q(v, N): a = max|v|; q = rne(v * (N / a)); s = a / N (per last axis)."""
    a = np.max(np.abs(v), axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        c = np.where(a > 0, np.float64(levels) / np.where(a > 0, a, 1.0), 0.0)
    return np.rint(v * c).astype(np.int64), a / np.float64(levels)


def power_of_two(k: np.ndarray) -> np.ndarray:
    return np.ldexp(np.float64(1.0), k)  # exact: a power of two is representable


def rope_tables(base: float, head_dim: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    import mpmath

    half = head_dim // 2
    cos = np.empty((length, half))
    sin = np.empty((length, half))
    with mpmath.workprec(192):
        for i in range(half):
            theta = mpmath.mpf(base) ** (mpmath.mpf(-2 * i) / head_dim)
            for p in range(length):
                cos[p, i] = float(mpmath.cos(p * theta))
                sin[p, i] = float(mpmath.sin(p * theta))
    return cos, sin


class IntReference:
    """The int-v1 or int-v2 forward pass of a LLaMA model folder (float32/16
    safetensors)."""

    def __init__(self, folder: str | Path | None, max_length: int = 64,
                 engine: str = "int-v2", *, config: dict | None = None,
                 tensors: dict[str, np.ndarray] | None = None) -> None:
        """From a folder's config.json and model.safetensors, or from ``config`` and
        ``tensors`` given (e.g. a GGUF model's weights as spec/model.md derives them)."""
        self.attention_levels = ATTENTION_LEVELS[engine]
        if folder is not None:
            from safetensors.numpy import load_file

            folder = Path(folder)
            config = json.loads((folder / "config.json").read_text())
            tensors = load_file(str(folder / "model.safetensors"))
        assert config is not None and tensors is not None
        f32 = {k: v.astype(np.float32) for k, v in tensors.items()}
        self.d = config["hidden_size"]
        self.heads = config["num_attention_heads"]
        self.kv_heads = config["num_key_value_heads"]
        self.dh = config.get("head_dim") or self.d // self.heads
        self.eps = float(config["rms_norm_eps"])
        self.layers = config["num_hidden_layers"]
        rope = config.get("rope_parameters") or {}
        base = rope.get("rope_theta") or config.get("rope_theta") or 10000.0
        self.cos, self.sin = rope_tables(float(base), self.dh, max_length)
        self.w = f32
        self.embed = f32["model.embed_tokens.weight"]
        head = f32.get("lm_head.weight", self.embed)
        self.linear = {}
        names = [f"model.layers.{i}.{part}.weight" for i in range(self.layers) for part in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
        for name in names:
            self.linear[name] = quantize(f32[name].astype(np.float64), LINEAR_LEVELS)
        self.linear["lm_head"] = quantize(head.astype(np.float64), LINEAR_LEVELS)

    def apply(self, name: str, q: np.ndarray, s: np.ndarray) -> np.ndarray:
        """§5.3 linear: acc = q . Wq (exact int64), y = acc * (s * omega)."""
        wq, omega = self.linear[name]
        acc = q @ wq.T
        return acc.astype(np.float64) * (s * omega[:, 0])

    def norm(self, h: np.ndarray, weight_name: str) -> tuple[np.ndarray, np.ndarray]:
        """§5.4 RMSNorm fused with the quantizer of the following linear layer."""
        g = self.w[weight_name].astype(np.float64)
        m = np.max(np.abs(h), axis=-1, keepdims=True)
        e = np.frexp(m)[1].astype(np.int64)
        shift = np.maximum(e - NORM_BITS, 0)
        r = np.floor(h * power_of_two(-shift)).astype(np.int64)
        ss = np.sum(r * r, axis=-1, keepdims=True).astype(np.float64)
        mean = ss * power_of_two(2 * shift - 2 * RESIDUAL_BITS) / np.float64(h.shape[-1])
        root = np.sqrt(mean + self.eps)
        q, a = quantize(h * g, LINEAR_LEVELS)
        return q, (a * 2.0**-RESIDUAL_BITS) / root

    def logits(self, tokens: list[int]) -> np.ndarray:
        n = len(tokens)
        h = np.rint(self.embed[tokens].astype(np.float64) * 2.0**RESIDUAL_BITS)
        g = self.heads // self.kv_heads
        scale = np.float64(1.0) / np.sqrt(np.float64(self.dh))
        half = self.dh // 2
        for i in range(self.layers):
            p = f"model.layers.{i}."
            q, s = self.norm(h, p + "input_layernorm.weight")
            qs = self.apply(p + "self_attn.q_proj.weight", q, s).reshape(n, self.heads, self.dh)
            ks = self.apply(p + "self_attn.k_proj.weight", q, s).reshape(n, self.kv_heads, self.dh)
            vs = self.apply(p + "self_attn.v_proj.weight", q, s).reshape(n, self.kv_heads, self.dh)

            def rot(x: np.ndarray) -> np.ndarray:
                c = self.cos[:n, None, :]
                si = self.sin[:n, None, :]
                a, b = x[..., :half], x[..., half:]
                return np.concatenate((a * c - b * si, b * c + a * si), axis=-1)

            levels = self.attention_levels
            qq, sq = quantize(rot(qs), levels)
            kq, sk = quantize(rot(ks), levels)
            vq, sv = quantize(vs, levels)
            sq = sq * scale
            context = np.zeros((n, self.heads, self.dh))
            for t in range(n):  # one query position at a time
                for head in range(self.heads):
                    kv = head // g
                    scores = kq[: t + 1, kv] @ qq[t, head]  # exact int64
                    z = scores.astype(np.float64) * (sq[t, head, 0] * sk[: t + 1, kv, 0])
                    x = np.floor((z - np.max(z)) * LOG2E_SCALED)
                    w = exp_weight(-x)
                    pw = w.astype(np.float64) * sv[: t + 1, kv, 0]
                    u, su = quantize(pw, levels)
                    c = u @ vq[: t + 1, kv]  # exact int64
                    context[t, head] = (c.astype(np.float64) * su) / np.float64(np.sum(w))
            q, s = quantize(context.reshape(n, -1), LINEAR_LEVELS)
            h = h + np.rint(self.apply(p + "self_attn.o_proj.weight", q, s) * 2.0**RESIDUAL_BITS)
            q, s = self.norm(h, p + "post_attention_layernorm.weight")
            gate = self.apply(p + "mlp.gate_proj.weight", q, s)
            up = self.apply(p + "mlp.up_proj.weight", q, s)
            w = exp_weight(np.floor(np.abs(gate) * LOG2E_SCALED)).astype(np.float64)
            one = np.float64(2.0**31)
            sigmoid = np.where(gate >= 0, one, w) / (w + one)
            q, s = quantize((gate * sigmoid) * up, LINEAR_LEVELS)
            h = h + np.rint(self.apply(p + "mlp.down_proj.weight", q, s) * 2.0**RESIDUAL_BITS)
        q, s = self.norm(h, "model.norm.weight")
        return self.apply("lm_head", q, s).astype(np.float32)
