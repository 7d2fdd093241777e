"""Benchmark stages that load the model, each run in a fresh process by :func:`run_stage`
(from ``run.py`` and ``engines.py``), and :func:`stamp`: the machine, date and versions
the figures were measured on.

A fresh process per stage makes "extract in a fresh process" literal and lets the parent
read each stage's own peak resident memory (``os.wait4``).  Usage (internal)::

    python -m benchmarks.stages STAGE ARGS.json RESULT.json
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
import zlib
from importlib import metadata
from pathlib import Path
from typing import Any

import zstandard

from llmarc.codecs.llm import write_varint
from llmarc.progress import NullProgress


class _Clock(NullProgress):
    """A silent progress sink that times the LLM coding alone (its token bar's lifetime)."""

    def __init__(self) -> None:
        self.coding_seconds = 0.0

    def token_task(self, total: int, description: str) -> _TokenTimer:  # type: ignore[override]
        return _TokenTimer(self)


class _TokenTimer(NullProgress):
    def __init__(self, clock: _Clock) -> None:
        self.clock = clock
        self.started = time.perf_counter()

    def close(self) -> None:
        self.clock.coding_seconds += time.perf_counter() - self.started


def _model_and_tokens(path: str) -> tuple[Any, list[int]]:
    """The default model on the CPU, and the lossless tokens of the file at ``path``."""
    from llmarc.model.loader import load_model
    from llmarc.model.tokenize import LosslessTokenizer

    loaded = load_model(None, device="cpu")
    return loaded, LosslessTokenizer(loaded.tokenizer, loaded.table).encode(
        Path(path).read_bytes())


def stage_pack(args: dict[str, Any]) -> dict[str, Any]:
    """Pack a folder with the default model, keeping the codec's per-entry statistics."""
    import llmarc

    stats: dict[str, Any] = {}
    clock = _Clock()
    # Independent segments (--carry 0): the setting the model-derived columns (the
    # paper's H_ub, ranks + zlib, token by token) and the engine comparison assume;
    # mixing would code below the model's own bound, and lockstep-v1 cannot carry.
    # The defaults' figures: python -m benchmarks.pareto --input bench-texts.
    options = llmarc.LLMOptions(segment_length=args["segment_length"], on_encoded=stats.update,
                                engine=args.get("engine", llmarc.LLMOptions.engine),
                                threads=args.get("threads"), carry=0)
    started = time.perf_counter()
    members = llmarc.pack(args["src"], args["archive"], codec=args["codec"], llm=options,
                          progress=clock, warn=lambda message: None)
    wall = time.perf_counter() - started
    per_entry = {}
    for name, s in stats.items():
        ranks = b"".join(map(write_varint, s.ranks))  # unsigned LEB128, as in payloads
        per_entry[name] = {
            "tokens": s.tokens, "model_bits": s.model_bits, "coded_bits": s.coded_bits,
            "tbyt_bits": s.tbyt_bits, "payload_bytes": s.payload_bytes,
            "ranks_zlib_bytes": len(zlib.compress(ranks, 9)),
            "ranks_zstd_bytes": len(zstandard.ZstdCompressor(level=19).compress(ranks)),
            "rank0_share": s.ranks.count(0) / max(1, len(s.ranks)),
        }
    with llmarc.open(args["archive"]) as archive:
        profile = json.loads(archive.models[0].profile) if archive.models else {}
    return {
        "wall_seconds": wall, "coding_seconds": clock.coding_seconds,
        "archive_bytes": Path(args["archive"]).stat().st_size, "profile": profile,
        "members": [{"name": m.name, "size": m.size, "packed_size": m.packed_size,
                     "codec": m.codec} for m in members],
        "llm": per_entry,
    }


def stage_extract(args: dict[str, Any]) -> dict[str, Any]:
    """Extract an archive in this fresh process; the parent compares the bytes."""
    import llmarc

    clock = _Clock()
    started = time.perf_counter()
    with llmarc.open(args["archive"], warn=lambda message: None,
                     threads=args.get("threads")) as archive:
        archive.extract(args["dest"], progress=clock)
    return {"wall_seconds": time.perf_counter() - started,
            "coding_seconds": clock.coding_seconds}


def stage_sweep(args: dict[str, Any]) -> dict[str, Any]:
    """Ideal code length of one text at several segment lengths (the paper's memory M).

    Full forward passes, not the lockstep engine: this measures the model's cross-
    entropy for each context budget, which is what the sweep is about; at the pack's
    segment length it can be compared with the real run's ideal (same model, logits
    that differ only in the last bits)."""
    import torch

    loaded, tokens = _model_and_tokens(args["input"])
    rows = []
    for length in args["lengths"]:
        started = time.perf_counter()
        bits = 0.0
        for begin in range(0, len(tokens), length):
            segment = tokens[begin : begin + length]
            ids = torch.tensor([[loaded.start_token, *segment[:-1]]])
            with torch.inference_mode():
                logits = loaded.model(ids).logits[0].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            true = log_probs.gather(1, torch.tensor(segment)[:, None])
            bits -= float(true.double().sum()) / math.log(2)
        rows.append({"segment_length": length, "model_bits": bits,
                     "seconds": time.perf_counter() - started})
    return {"bytes": Path(args["input"]).stat().st_size, "tokens": len(tokens), "rows": rows}


def stage_width(args: dict[str, Any]) -> dict[str, Any]:
    """Encode B rows of ``steps`` tokens each at batch width B through the real codec."""
    from llmarc.codecs.llm import CodingSettings, LLMCodec

    width, steps = args["width"], args["steps"]
    loaded, tokens = _model_and_tokens(args["input"])
    rows = [tokens[i * steps : (i + 1) * steps] for i in range(width)]
    if any(len(row) < steps for row in rows):
        raise SystemExit(f"width sweep input too short for {width} rows of {steps} tokens")
    codec = LLMCodec(loaded, CodingSettings(batch_width=width,
                                            segment_length=args["segment_length"]))
    started = time.perf_counter()
    codec.encode_many(rows)
    seconds = time.perf_counter() - started
    return {"width": width, "tokens": width * steps, "seconds": seconds}


def _parameters(loaded: Any) -> int:
    """The model's parameter count, from the derived model's weight shapes."""
    return sum(math.prod(shape) for shape in loaded.derived.shapes.values())


def stage_load(args: dict[str, Any]) -> dict[str, Any]:
    """Time loading the default model (the first ever load also converts the GGUF)."""
    from llmarc.model.loader import load_model

    started = time.perf_counter()
    loaded = load_model(None, device="cpu")
    return {"seconds": time.perf_counter() - started,
            "model": loaded.source.display_name, "fingerprint": loaded.fingerprint.hex(),
            "parameters": _parameters(loaded)}


def stage_roofline(args: dict[str, Any]) -> dict[str, Any]:
    """This machine's fp32 GEMM rate and memory bandwidth, and the token-rate bounds they
    put on SmolLM2 (2 FLOP per parameter per token; at B = 1 every weight byte is read once
    per token: 4 bytes as float32, 1 as int8)."""
    import torch

    from llmarc.model.loader import load_model

    torch.set_num_threads(args["threads"])
    loaded = load_model(None, device="cpu")
    params = _parameters(loaded)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.matmul(a, b)
    best = math.inf
    for _ in range(5):
        started = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - started)
    gflops = 2 * 1024**3 / best / 1e9
    big = torch.ones(64 << 20)  # 256 MiB
    out = torch.empty_like(big)
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        out.copy_(big)
        best = min(best, time.perf_counter() - started)
    bandwidth = 2 * big.numel() * 4 / best / 1e9  # read + write
    return {"threads": args["threads"], "parameters": params, "sgemm_gflops": gflops,
            "copy_gbytes_per_s": bandwidth,
            "batched_tokens_per_s_bound": gflops * 1e9 / (2 * params),
            "b1_fp32_tokens_per_s_bound": bandwidth * 1e9 / (4 * params),
            "b1_int8_tokens_per_s_bound": bandwidth * 1e9 / params}


# ------------------------------------------------- in the parent process (run.py, engines.py)
ROOT = Path(__file__).resolve().parents[1]


def run_stage(stage: str, args: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run one model stage in a fresh Python process; add its wall time and peak RSS."""
    tag = f"{stage}-{len(list(work.glob('*.args.json')))}"
    args_path, result_path = work / f"{tag}.args.json", work / f"{tag}.result.json"
    args_path.write_text(json.dumps(args))
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.stages", stage, str(args_path), str(result_path)],
        cwd=ROOT)
    _pid, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"bench: stage {stage} failed (exit {process.returncode})")
    result = json.loads(result_path.read_text())
    result["process_seconds"] = time.perf_counter() - started
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux reports KiB
    return result


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def stamp() -> dict[str, Any]:
    """Machine, date and the versions that decide the figures."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    packages = ("llmarc", "torch", "transformers", "numpy", "zstandard", "brotli", "pyppmd",
                "zpaq")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {cpu}, {os.cpu_count()} cores, "
                   f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in packages},
    }


STAGES = {"load": stage_load, "pack": stage_pack, "extract": stage_extract, "sweep": stage_sweep,
          "width": stage_width, "roofline": stage_roofline}


def main() -> None:
    stage, args_path, result_path = sys.argv[1:4]
    result = STAGES[stage](json.loads(Path(args_path).read_text()))
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
