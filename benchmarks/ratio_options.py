"""Bits/byte that context carry, longer segments and an integer n-gram mixer would save.

    python -m benchmarks.ratio_options             # four texts x three settings: ~17 min, 2 cores
    python -m benchmarks.ratio_options --quick     # the two held-out 8 KB texts, L = 1024: ~10 s
    python -m benchmarks.ratio_options --texts alice29 --groups 0 1 4 16
    python -m benchmarks.ratio_options --texts alice29 --settings 8192:0 4096:4096
    python -m benchmarks.ratio_options --settings 1024:0 --bias-rate 0.2 [--bias-restarts]

For each text and setting, the embedded SmolLM2 with int-v2 codes the text's tokens in
segments as the encoder does (``split_segments``, the start token first), optionally with
the ``carry`` tokens before each segment fed as context but not coded.  The frequency of
the actual token at every position comes from the real engine's integer table
(``final_rows`` / ``lm_head_logits``, then ``frequency_tables`` at P = 24), so "LLM alone"
is the model cost Σ -log2(f / 2^24) of the archive's LLM payload (no container, no coder
overhead).  "+ n-gram" mixes each table with order-0..3 token n-gram counts by one
adaptive weight, all in integers (``mix_bits``; the formulation is written out in
results/ratio_options.md).  The n-gram state runs over the whole text, across segments,
unless ``--groups`` is given: then segment s of group s // W sees the counts of every
earlier group and of its own segment so far (W = 0: its own segment only), contexts do
not cross a segment boundary and the weight restarts per segment, which is what
segments decoded W at a time, in lockstep, could use.  ``--bias-rate`` adds a float
estimate of an adaptive log-space bias head (``biased``), alone and under the n-gram.
Results: results/ratio_options.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

import numpy as np

from benchmarks.inputs import CORPUS
from llmarc.codecs.llm import split_segments
from llmarc.entropy.fast import frequency_tables
from llmarc.model.loader import LoadedModel, load_model
from llmarc.model.tokenize import LosslessTokenizer

PRECISION = 24
TOTAL = 1 << PRECISION
VOCAB = 49152  # SmolLM2's table width: every token keeps at least one unit
SPARE = TOTAL - VOCAB  # the units a table distributes by probability
ROWS = 128  # logits computed this many positions at a time
ORDER = 3  # the n-gram's highest order (tokens of context)
U_START = -4 << 16  # the weight's state: stretch(w) in 1/65,536 units (w ≈ 0.018)
U_LIMIT = 2047 << 8
# squash(x) = 4096 / (1 + e^(-x/256)) for x in -2047..2047, in 1/4096, clamped to 1..4095
SQUASH = [min(max(round(4096 / (1 + math.exp(-x / 256))), 1), 4095) for x in range(-2047, 2048)]


@dataclass(frozen=True)
class Text:
    """A slice of a corpus file."""

    name: str
    file: str
    offset: int
    size: int | None  # None: to the end

    def read(self) -> bytes:
        data = (CORPUS / self.file).read_bytes()[self.offset:]
        return data if self.size is None else data[:self.size]


TEXTS = {t.name: t for t in (
    Text("alice29", "alice29.txt", 0, None),
    Text("enwik8_256k", "enwik8_first1MB", 0, 262144),
    Text("lcet10_8k", "lcet10.txt", 100000, 8192),  # held out from the tuning (on alice29)
    Text("asyoulik_8k", "asyoulik.txt", 40000, 8192),  # held out likewise
)}
QUICK_TEXTS = ("lcet10_8k", "asyoulik_8k")
SETTINGS = ((1024, 0), (1024, 512), (2048, 0))  # (segment length L, carried tokens)


def llm_frequencies(loaded: LoadedModel, tokens: list[int], length: int, carry: int,
                    bias_rate: float = 0.0, bias_restarts: bool = False
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """int64 [N]: the engine's frequency (of 2^24) of each actual token, segments of
    ``length`` each preceded by the start token and up to ``carry`` earlier tokens; and,
    with ``bias_rate``, the same logits with an adaptive bias head (:func:`biased`),
    whose state restarts at every segment when ``bias_restarts``."""
    model = loaded.integer_model(length + carry, "int-v2")
    freq = np.zeros(len(tokens), dtype=np.int64)
    biased_freq = np.zeros(len(tokens), dtype=np.int64) if bias_rate else None
    bias = np.zeros(loaded.vocab_size)
    pos = 0
    # one chain of them all: every segment but the first carries the tokens before it
    for part in split_segments(tokens, length, carry, chain=len(tokens) + 1):
        segment, context = part.tokens, part.context
        if bias_restarts:
            bias[:] = 0
        sequence = [loaded.start_token, *context, *segment]
        final, scales = model.final_rows(np.array([sequence[:-1]], dtype=np.int64))
        skip = len(context)
        for begin in range(0, len(segment), ROWS):
            end = min(len(segment), begin + ROWS)
            rows = slice(skip + begin, skip + end)
            logits = model.lm_head_logits(final[0, rows], scales[0, rows])
            table = frequency_tables(logits, PRECISION)
            freq[pos + begin:pos + end] = table[np.arange(end - begin), segment[begin:end]]
            if biased_freq is not None:
                biased_freq[pos + begin:pos + end] = biased(logits, segment[begin:end], bias,
                                                            bias_rate)
        pos += len(segment)
    return freq, biased_freq


def biased(logits: np.ndarray, tokens: list[int], bias: np.ndarray, rate: float) -> np.ndarray:
    """Frequencies (of 2^24, float64 estimates) of ``tokens`` under an adaptive log-space
    bias head, as Nacrith's: softmax(logits + bias), then one SGD step of the log loss,
    bias += rate * (onehot(x) - p), updated in place.  The state runs over the whole text,
    across segments, like ``mix_bits`` without groups.  Float, so a measurement of what
    such a head could save, not a codec."""
    out = np.empty(len(tokens), dtype=np.int64)
    for r, x in enumerate(tokens):
        z = logits[r].astype(np.float64) + bias
        p = np.exp(z - z.max())
        p /= p.sum()
        out[r] = 1 + int(p[x] * SPARE)
        bias -= rate * p
        bias[x] += rate
    return out


def llm_bits(freq: np.ndarray) -> float:
    return float(-np.log2(freq / TOTAL).sum())


def mix_bits(tokens: list[int], freq: np.ndarray, segment: int | None = None,
             group: int = 0) -> float:
    """Bits of the tokens coded with the LLM's table mixed with order-0..3 n-gram counts.

    ``segment`` None: one state over the whole text (contexts cross segment boundaries,
    one weight throughout).  Otherwise segments of ``segment`` tokens, each seeing the
    counts of every complete earlier group of ``group`` segments (0: none) plus its own."""
    segment = segment or max(1, len(tokens))
    shared: dict[tuple[int, ...], dict[int, int]] = {}  # context -> {token: count}
    shared_n: dict[tuple[int, ...], int] = {}
    pending: list[dict[tuple[int, ...], dict[int, int]]] = []
    bits = 0.0
    for s0 in range(0, len(tokens), segment):
        seg = tokens[s0:s0 + segment]
        own: dict[tuple[int, ...], dict[int, int]] = {}
        own_n: dict[tuple[int, ...], int] = {}
        own_new: dict[tuple[int, ...], int] = {}  # tokens of own[ctx] not in shared[ctx]
        u = U_START
        for j, x in enumerate(seg):
            f = int(freq[s0 + j])
            contexts = [(o, *seg[j - o:j]) for o in range(min(ORDER, j), -1, -1)]
            rem, levels = 65536, []  # escape mass left (1/65,536); (e_o, n_o, c_o(x))
            for ctx in contexts:
                g, c = shared.get(ctx, {}), own.get(ctx, {})
                n = shared_n.get(ctx, 0) + own_n.get(ctx, 0)
                if n:
                    e = rem * n // (n + len(g) + own_new.get(ctx, 0))
                    rem -= e
                    levels.append((e, n, g.get(x, 0) + c.get(x, 0)))
            w = SQUASH[max(-2047, min(2047, u >> 8)) + 2047]  # n-gram weight, 1/4096
            a = 4096 - w + ((w * rem) >> 16)  # the LLM's weight (+ the escaped mass)
            wx = wsum = q = 0
            for e, n, cx in levels:
                b = (w * e * SPARE) // (n << 16)
                wsum += b * n
                wx += b * cx
                q += (e * cx << 8) // n  # the n-gram's probability of x, in 1/2^24
            fq = 1 + ((a * (f - 1) + wx) * SPARE) // (a * SPARE + wsum)
            bits -= math.log2(fq / TOTAL)
            step = ((q - f) * w * (4096 - w)) // fq  # d log p / d u, scaled
            u = max(-U_LIMIT, min(U_LIMIT, u + ((step + 128) >> 8)))
            for ctx in contexts:
                c = own.setdefault(ctx, {})
                if x not in c and x not in shared.get(ctx, {}):
                    own_new[ctx] = own_new.get(ctx, 0) + 1
                c[x] = c.get(x, 0) + 1
                own_n[ctx] = own_n.get(ctx, 0) + 1
        if group:
            pending.append(own)
            if (s0 // segment + 1) % group == 0:
                merge(shared, shared_n, pending)
    return bits


def merge(shared: dict[tuple[int, ...], dict[int, int]], shared_n: dict[tuple[int, ...], int],
          pending: list[dict[tuple[int, ...], dict[int, int]]]) -> None:
    """Add a finished group's segment counts to the shared counts."""
    for counts in pending:
        for ctx, c in counts.items():
            dst = shared.setdefault(ctx, {})
            for token, k in c.items():
                dst[token] = dst.get(token, 0) + k
            shared_n[ctx] = shared_n.get(ctx, 0) + sum(c.values())
    pending.clear()


def row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", nargs="+", choices=sorted(TEXTS), default=list(TEXTS))
    parser.add_argument("--settings", nargs="+", default=[f"{n}:{c}" for n, c in SETTINGS],
                        help="L:CARRY pairs (default: 1024:0 1024:512 2048:0)")
    parser.add_argument("--groups", nargs="*", type=int, default=[],
                        help="also the n-gram with segment-grouped state, W segments a group")
    parser.add_argument("--quick", action="store_true",
                        help="the two held-out 8 KB texts at L = 1024 only")
    parser.add_argument("--bias-rate", type=float, default=0.0,
                        help="also an adaptive log-space bias head of this learning rate "
                             "(float estimate; 0.2 measured best), alone and under the n-gram")
    parser.add_argument("--bias-restarts", action="store_true",
                        help="the bias head (and the n-gram under it) restart at every "
                             "segment, as a stateless segment could have them")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    texts = list(QUICK_TEXTS) if args.quick else args.texts
    settings = ["1024:0"] if args.quick else args.settings
    loaded = load_model(None, threads=args.threads, engine="int-v2")
    if loaded.vocab_size != VOCAB:
        raise SystemExit(f"the mixer is stated for a {VOCAB}-token table (SmolLM2)")
    tokenizer = LosslessTokenizer(loaded.tokenizer, loaded.table)
    extra = [f"+ n-gram, W = {w}" for w in args.groups]
    if args.bias_rate:
        per = " per segment" if args.bias_restarts else ""
        extra += [f"+ bias {args.bias_rate}{per}", f"+ bias {args.bias_rate} + n-gram{per}"]
    print(row(["text", "bytes", "tokens", "L", "carry", "LLM alone", "+ n-gram", "Δ", "Δ %",
               *extra]))
    print(row(["---"] * 3 + ["---:"] * (6 + len(extra))))
    for name in texts:
        data = TEXTS[name].read()
        tokens = tokenizer.encode(data)
        for setting in settings:
            length, carry = (int(v) for v in setting.split(":"))
            started = time.perf_counter()
            freq, biased_freq = llm_frequencies(loaded, tokens, length, carry, args.bias_rate,
                                                args.bias_restarts)
            base = llm_bits(freq) / len(data)
            mixed = mix_bits(tokens, freq) / len(data)
            grouped = [mix_bits(tokens, freq, length, w) / len(data) - base for w in args.groups]
            # the n-gram under the head: with the same reach as the head's state
            reach = (length, 0) if args.bias_restarts else (None, 0)
            bias = [] if biased_freq is None else [
                f"{llm_bits(biased_freq) / len(data):.4f}",
                f"{mix_bits(tokens, biased_freq, *reach) / len(data):.4f}"]
            print(row([name, len(data), len(tokens), length, carry, f"{base:.4f}",
                       f"{mixed:.4f}", f"{mixed - base:+.4f}",
                       f"{100 * (mixed - base) / base:+.2f}",
                       *(f"{d:+.4f}" for d in grouped), *bias]), flush=True)
            print(f"bench: {name} L={length} carry={carry}: "
                  f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
