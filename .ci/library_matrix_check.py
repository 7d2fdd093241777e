"""One row of the library matrix: run inside a venv with some set of library versions.

    python .ci/library_matrix_check.py REFERENCE_DIR [--write]

Every LLM vector that must decode on any machine is extracted and checked member by
member (the SmolLM2 archives llmarc 0.1 made under transformers 5.25 and 4.57 among them),
every bad/unsupported one fails with its class, and a tree is packed with a fixture model
and with the embedded SmolLM2: those archives must be byte-identical to the ones packed
by the reference row (``--write`` makes them; the dev venv, torch installed).  Nothing of
this may import transformers or torch: what an archive means is derived by llmarc's own
code (spec/model.md), and the CPU engine runs on NumPy and numba.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors" / "llm"
MTIME_NS = 1_700_000_000_000_000_000


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "transformers", "tokenizers", "sentencepiece", "numba", "numpy"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} -")
    return ", ".join(found)


def check_vectors() -> int:
    import llmarc
    import llmarc.errors

    manifest = json.loads((VECTORS / "manifest.json").read_text())
    checked = 0
    for name, spec in sorted(manifest.items()):
        if "environment" in spec:  # lockstep-v1: bound to its environment by design
            continue
        model = spec["model"] if spec["model"] == "smollm2" else str(ROOT / spec["model"])
        if "members" in spec:
            with llmarc.open(VECTORS / name, model=model, device="cpu") as archive:
                for member, digest in spec["members"].items():
                    got = hashlib.sha256(archive.read(member)).hexdigest()
                    if got != digest:
                        raise SystemExit(f"{name}: {member} decoded to other bytes")
        else:
            error = getattr(llmarc.errors, spec["error"])
            try:
                with llmarc.open(VECTORS / name, model=model, device="cpu") as archive:
                    archive.test()
            except error:
                pass
            else:
                raise SystemExit(f"{name}: no {spec['error']}")
        checked += 1
    return checked


#: Configs whose transformers spelling fingerprint v1 hashed (spec/model.md §6.2).
LEGACY_CONFIGS = [
    {"hidden_size": 4096, "intermediate_size": 11008, "model_type": "llama",
     "num_attention_heads": 32, "num_hidden_layers": 32, "rms_norm_eps": 1e-06,
     "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False},
    {"hidden_size": 64, "intermediate_size": 128, "model_type": "llama",
     "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
     "rope_theta": 500000, "rope_scaling": None, "vocab_size": 300},
    {"hidden_size": 64, "intermediate_size": 128, "model_type": "llama",
     "num_attention_heads": 4, "num_hidden_layers": 2, "head_dim": 16,
     "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "vocab_size": 300},
    {"hidden_size": 64, "intermediate_size": 128, "model_type": "llama",
     "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": None,
     "head_dim": None, "rope_theta": 10000.0, "vocab_size": 300},
]


def check_legacy_forms() -> int:
    """Where transformers is installed: its ``config.to_dict()`` (what llmarc 0.1 hashed)
    is one of the forms llmarc reproduces without it."""
    try:
        from transformers import AutoConfig
    except ImportError:
        return 0
    from llmarc.model.architecture import V1_KEYS, legacy_forms
    from llmarc.model.fingerprint import canonical_json

    configs = [*LEGACY_CONFIGS,
               *(json.loads((ROOT / "fixtures" / f / "config.json").read_text())
                 for f in ("tiny-llama-bpe", "tiny-llama-sp"))]
    with tempfile.TemporaryDirectory() as tmp:
        for index, config in enumerate(configs):
            folder = Path(tmp) / str(index)
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(config))
            data = AutoConfig.from_pretrained(str(folder)).to_dict()
            real = canonical_json({k: data[k] for k in V1_KEYS if data.get(k) is not None})
            if real not in {canonical_json(form) for form in legacy_forms(config)}:
                raise SystemExit(f"config {index}: transformers gives {real}, not a v1 form")
    sys.modules.pop("transformers", None)  # checked on purpose; the codec must not import it
    return len(configs)


def pack_samples(out: Path) -> dict[str, str]:
    """Pack a fixed tree with a tiny fixture model and with SmolLM2; their SHA-256s."""
    import llmarc

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        text = (ROOT / "fixtures" / "tiny-training.txt").read_bytes()[:3000]
        (src / "a.txt").write_bytes(text + "Ünïcødé, 0xFC: \xfc.\n".encode("latin-1"))
        (src / "b.md").write_bytes((ROOT / "README.md").read_bytes()[:1500])
        for path in (*src.iterdir(), src):
            os.utime(path, ns=(MTIME_NS, MTIME_NS))
        digests = {}
        for label, model in (("tiny-sp", str(ROOT / "fixtures" / "tiny-llama-sp")),
                             ("tiny-bpe", str(ROOT / "fixtures" / "tiny-llama-bpe")),
                             ("smollm2", "smollm2")):
            archive = out / f"{label}.llma"
            llmarc.pack(src, archive, codec="llm", warn=lambda message: None,
                        llm=llmarc.LLMOptions(model=model, device="cpu", segment_length=256))
            digests[label] = hashlib.sha256(archive.read_bytes()).hexdigest()
    return digests


def main() -> None:
    reference, write = Path(sys.argv[1]), "--write" in sys.argv[2:]
    print(f"library matrix row: {versions()}", flush=True)
    checked = check_vectors()
    if "transformers" in sys.modules:
        raise SystemExit("transformers was imported: the archive's meaning must not need it")
    reference.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        digests = pack_samples(Path(tmp))
    expected_path = reference / "packs.json"
    if write:
        expected_path.write_text(json.dumps(digests, indent=1, sort_keys=True))
    else:
        expected = json.loads(expected_path.read_text())
        for label, digest in digests.items():
            if digest != expected[label]:
                raise SystemExit(f"the {label} archive differs from the reference row's")
    for module in ("transformers", "torch"):
        if module in sys.modules:
            raise SystemExit(f"{module} was imported: extracting and packing on the CPU "
                             "must not need it")
    forms = check_legacy_forms()
    print(f"library matrix row OK: {checked} vectors, {len(digests)} packs identical "
          f"({', '.join(sorted(digests))}), neither torch nor transformers imported; "
          f"{forms} configs spelled by transformers as a v1 form reproduces")


if __name__ == "__main__":
    main()
