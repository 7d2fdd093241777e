"""One row of the library matrix: run inside a venv with some set of library versions.

    python .ci/library_matrix_check.py REFERENCE_DIR [--write]

Every LLM vector that must decode on any machine is extracted and checked member by
member (the SmolLM2 archives llmarc 0.1 made under transformers 5.25 and 4.57 among them),
every bad/unsupported one fails with its class, and a tree is packed with a fixture model
and with the embedded SmolLM2: those archives must be byte-identical to the ones packed
by the reference row (``--write`` makes them).  Nothing of this may import transformers:
what an archive means is derived by llmarc's own code (spec/model.md).
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
    if "transformers" in sys.modules:
        raise SystemExit("transformers was imported: the archive's meaning must not need it")
    print(f"library matrix row OK: {checked} vectors, {len(digests)} packs identical "
          f"({', '.join(sorted(digests))}), transformers never imported")


if __name__ == "__main__":
    main()
