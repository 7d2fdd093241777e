"""Run the llmarc benchmarks and write ``benchmarks/results/`` (see benchmarks/README.md).

    python -m benchmarks.run            # full run, about 17 minutes on 2 CPU cores
    python -m benchmarks.run --quick    # smoke run, under 3 minutes, writes results/quick/

Every figure is measured here; the only published numbers (LLMZip's) are labelled so.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import engines, report
from benchmarks.classic import Compressor, compressors, reference_compressors, run_classic
from benchmarks.inputs import (
    CORPUS,
    FULL,
    QUICK,
    Input,
    Sizes,
    binary_inputs,
    check_extracted,
    sweep_input,
    text_inputs,
    write_inputs,
)
from benchmarks.stages import run_stage, stamp

ROOT = Path(__file__).resolve().parents[1]


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def classic_rows(inputs: list[Input], chosen: list[Compressor]) -> list[dict[str, Any]]:
    rows = []
    for compressor in chosen:
        rows += [run_classic(item.name, item.data, compressor) for item in inputs]
        say(f"  {compressor.name}: done")
    return rows


def pack_binaries(inputs: list[Input], work: Path) -> dict[str, Any]:
    """The fallback path: binaries packed with --codec auto (no model runs for them)."""
    import llmarc

    src, archive, dest = work / "binaries", work / "binaries.llma", work / "binaries-out"
    write_inputs(src, inputs)
    members = llmarc.pack(src, archive, warn=lambda message: None)
    with llmarc.open(archive) as reader:
        reader.extract(dest)
    check_extracted(dest, inputs)
    return {"archive_bytes": archive.stat().st_size,
            "members": [{"name": m.name, "size": m.size, "packed_size": m.packed_size,
                         "codec": m.codec} for m in members]}


def run(sizes: Sizes, mode: str) -> dict[str, Any]:
    texts, binaries = text_inputs(sizes), binary_inputs(sizes)
    sweep = sweep_input(sizes)
    results: dict[str, Any] = {
        "mode": mode, "stamp": stamp(),
        "sizes": dict(vars(sizes)),
        "inputs": [{"name": i.name, "kind": i.kind, "bytes": len(i.data), "sha256": i.sha256,
                    "description": i.description} for i in [*texts, *binaries]],
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmarc-bench-") as tmp:
        work = Path(tmp)
        say("classic compressors (every output decompressed and compared)")
        results["classic"] = (classic_rows(texts, compressors())
                              + classic_rows(binaries, reference_compressors()))
        say("loading the default model twice (the first load may convert the GGUF)")
        results["load"] = [run_stage("load", {}, work) for _ in range(2)]
        say(f"packing {len(texts)} text inputs with llmarc (segment length "
            f"{sizes.segment_length})")
        write_inputs(work / "texts", texts)
        results["pack"] = run_stage("pack", {
            "src": str(work / "texts"), "archive": str(work / "texts.llma"), "codec": "auto",
            "segment_length": sizes.segment_length}, work)
        say("extracting them in a fresh process")
        results["extract"] = run_stage("extract", {
            "archive": str(work / "texts.llma"), "dest": str(work / "texts-out")}, work)
        check_extracted(work / "texts-out", texts)
        say("engines: int-v2, int-v1 and lockstep-v1, the 8 KB text, a busy machine, roofline")
        results["engines"] = engines.run(texts, sizes.segment_length, work)
        say("packing the binaries (fallback path)")
        results["binaries"] = pack_binaries(binaries, work)
        say(f"segment-length sweep {sizes.sweep_lengths} on {sweep.description}")
        sweep_path = work / "sweep-input"
        sweep_path.write_bytes(sweep.data)
        results["sweep"] = run_stage("sweep", {"input": str(sweep_path),
                                               "lengths": list(sizes.sweep_lengths)}, work)
        results["widths"] = []
        for width in sizes.batch_widths:
            say(f"batch width {width}: {width} rows x {sizes.batch_steps} tokens")
            results["widths"].append(run_stage("width", {
                "input": str(CORPUS / "lcet10.txt"), "width": width,
                "steps": sizes.batch_steps, "segment_length": FULL.segment_length}, work))
    results["total_seconds"] = time.perf_counter() - started
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small inputs, a few widths and lengths (under 3 minutes)")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results"
                        "[/quick])")
    options = parser.parse_args(argv)
    mode = "quick" if options.quick else "full"
    out = options.out or ROOT / "benchmarks" / "results" / ("quick" if options.quick else "")
    try:
        results = run(QUICK if options.quick else FULL, mode)
    except KeyboardInterrupt:
        say("interrupted; nothing written")
        raise SystemExit(130) from None
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    markdown = report.markdown(results)
    (out / "results.md").write_text(markdown)
    report.plots(results, out)
    print(markdown)
    say(f"done in {results['total_seconds']:.0f} s; wrote {out}/results.md, results.json, "
        "compression.png, speed.png")


if __name__ == "__main__":
    main()
