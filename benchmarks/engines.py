"""The engines side by side (int-v2, int-v1, lockstep-v1), a small input, a busy
machine, and this machine's roofline.

Issue 7 asks the integer engine's pack >= 1.5x lockstep-v1 pack tokens/s, extract >=
lockstep-v1's, peak RSS <= 1.25x and bits/byte within +2 % on every text; issue 9 asks
for an 8 KB single-text row (pack and extract wall time and tokens/s), a pack under load
(a busy process on every core) and the fp32/int8 roofline, and B = 32 pack >= 450 and
extract >= 350 tokens/s.  Every stage runs in a fresh process (``benchmarks.stages``),
every archive is extracted and compared byte for byte.

    python -m benchmarks.engines                              # the texts of make bench
    python -m benchmarks.engines --text-bytes 16384 --texts 2 # a shorter run
    make bench                                                # includes these rows

On a shared machine compare the rows of one run with each other (ratios), not runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.inputs import (
    CORPUS,
    FULL,
    Input,
    Sizes,
    check_extracted,
    text_inputs,
    write_inputs,
)
from benchmarks.stages import run_stage, stamp

ENGINES = ("lockstep-v1", "int-v1", "int-v2")
DEFAULT = "int-v2"  # the engine of the loaded row and of the ratios
SMALL_BYTES = 8000  # issue 9's "8 KB single text"
SMALL_SOURCE = "lcet10.txt"  # not among the make-bench texts


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def small_input() -> Input:
    data = (CORPUS / SMALL_SOURCE).read_bytes()[:SMALL_BYTES]
    return Input("small.txt", data, "text", f"first {SMALL_BYTES:,} bytes of {SMALL_SOURCE}")


def _roundtrip(inputs: list[Input], work: Path, tag: str, engine: str, segment_length: int,
               threads: int | None = None) -> dict[str, Any]:
    """Pack ``inputs`` with ``engine`` in one fresh process, extract in another, compare."""
    src, archive, dest = work / f"{tag}-src", work / f"{tag}.llma", work / f"{tag}-out"
    write_inputs(src, inputs)
    pack = run_stage("pack", {"src": str(src), "archive": str(archive), "codec": "auto",
                              "segment_length": segment_length, "engine": engine,
                              "threads": threads}, work)
    extract = run_stage("extract", {"archive": str(archive), "dest": str(dest),
                                    "threads": threads}, work)
    check_extracted(dest, inputs)
    tokens = sum(entry["tokens"] for entry in pack["llm"].values())
    return {"engine": engine, "tokens": tokens, "bytes": sum(len(i.data) for i in inputs),
            "pack": pack, "extract": extract,
            "bits_per_byte": {m["name"]: 8 * m["packed_size"] / m["size"]
                              for m in pack["members"] if m["size"]}}


def _busy_cores() -> list[subprocess.Popen[bytes]]:
    """One process spinning on every core (the competing load of issue 9)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(os.cpu_count() or 1)]


def run(texts: list[Input], segment_length: int, work: Path,
        engines: tuple[str, ...] = ENGINES) -> dict[str, Any]:
    results: dict[str, Any] = {"texts": [i.name for i in texts],
                               "text_bytes": sum(len(i.data) for i in texts)}
    for engine in engines if texts else ():
        say(f"{engine}: pack and extract {len(texts)} texts")
        results[engine] = _roundtrip(texts, work, f"texts-{engine}", engine, segment_length)
        results[engine]["texts"] = [i.name for i in texts]
    small = small_input()
    for engine in engines:
        say(f"{engine}: pack and extract the {SMALL_BYTES:,}-byte text")
        results[f"small {engine}"] = _roundtrip([small], work, f"small-{engine}", engine,
                                                segment_length)
    say(f"{DEFAULT}: pack the {SMALL_BYTES:,}-byte text with a busy process on every core")
    busy = _busy_cores()
    try:
        time.sleep(1.0)
        results[f"small {DEFAULT} loaded"] = _roundtrip([small], work, "small-loaded", DEFAULT,
                                                        segment_length)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    say("roofline: fp32 GEMM rate and memory bandwidth")
    results["roofline"] = run_stage("roofline", {"threads": 2}, work)
    return results


def _rate(stage: dict[str, Any], tokens: int) -> str:
    seconds = stage["coding_seconds"]
    return f"{tokens / seconds:,.1f}" if seconds else "—"


def markdown(results: dict[str, Any]) -> str:
    lines = [f"## {DEFAULT} against the other engines", "",
             f"Texts: {', '.join(results['texts']) or 'none'} ({results['text_bytes']:,} bytes); "
             f"small: {small_input().description}. "
             "Tokens/s count the LLM coding alone; wall times are whole processes, model load "
             "included; RSS is each process's peak. Same run, same machine: compare ratios.",
             "", "| engine | tokens | pack tokens/s | extract tokens/s | pack wall s | "
             "extract wall s | pack peak RSS MiB | extract peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    keys = [*ENGINES, *(f"small {e}" for e in ENGINES), f"small {DEFAULT} loaded"]
    for key in keys:
        row = results.get(key)
        if row is None:
            continue
        pack, extract = row["pack"], row["extract"]
        label = key + (f" ({len(row['texts'])} texts)" if "texts" in row else "")
        if row.get("from_run"):
            label += f" (run of {row['from_run']['date']})"
        lines.append(
            f"| {label} | {row['tokens']:,} | {_rate(pack, row['tokens'])} | "
            f"{_rate(extract, row['tokens'])} | {pack['process_seconds']:.1f} | "
            f"{extract['process_seconds']:.1f} | {pack['peak_rss_bytes'] / 2**20:,.0f} | "
            f"{extract['peak_rss_bytes'] / 2**20:,.0f} |")
    present = [e for e in ENGINES if results.get(e)]
    new = results.get(DEFAULT)
    if new and len(present) > 1:
        lines += ["", "| text | " + " | ".join(f"{e} bits/byte" for e in present)
                  + f" | {DEFAULT} against " + ", ".join(e for e in present if e != DEFAULT)
                  + " |", "|---|" + "---:|" * (len(present) + 1)]
        for name, after in new["bits_per_byte"].items():
            values = [results[e]["bits_per_byte"].get(name) for e in present]
            if None in values:
                continue
            changes = ", ".join(f"{100 * (after / v - 1):+.2f} %"
                                for e, v in zip(present, values, strict=True) if e != DEFAULT)
            lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values)
                         + f" | {changes} |")

        def rate(row: dict[str, Any], stage: str) -> float:
            return row["tokens"] / row[stage]["coding_seconds"]

        ratios = []
        for other in (e for e in present if e != DEFAULT):
            old = results[other]
            ratios += [
                (f"pack tokens/s, {DEFAULT} / {other}", rate(new, "pack") / rate(old, "pack")),
                (f"extract tokens/s, {DEFAULT} / {other}",
                 rate(new, "extract") / rate(old, "extract")),
                (f"peak RSS, {DEFAULT} / {other}, pack",
                 new["pack"]["peak_rss_bytes"] / old["pack"]["peak_rss_bytes"]),
                (f"peak RSS, {DEFAULT} / {other}, extract",
                 new["extract"]["peak_rss_bytes"] / old["extract"]["peak_rss_bytes"]),
            ]
        loaded, small = results.get(f"small {DEFAULT} loaded"), results.get(f"small {DEFAULT}")
        if loaded and small:
            ratios.append(("8 KB pack wall under load / unloaded (issue 9: <= 2.5)",
                           loaded["pack"]["process_seconds"] / small["pack"]["process_seconds"]))
        lines += ["", "| ratio | value |", "|---|---:|"]
        lines += [f"| {label} | {value:.2f} |" for label, value in ratios]
    roof = results.get("roofline")
    if roof:
        lines += ["", f"Roofline ({roof['threads']} threads, measured here): fp32 GEMM "
                  f"{roof['sgemm_gflops']:.0f} GFLOP/s, copy bandwidth "
                  f"{roof['copy_gbytes_per_s']:.1f} GB/s; for {roof['parameters'] / 1e6:.0f}M "
                  f"parameters: batched (compute-bound) <= "
                  f"{roof['batched_tokens_per_s_bound']:,.0f} tokens/s; B = 1 (weight-read "
                  f"bound) <= {roof['b1_fp32_tokens_per_s_bound']:,.0f} tokens/s from "
                  f"float32 weights, <= {roof['b1_int8_tokens_per_s_bound']:,.0f} from int8."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-bytes", type=int, default=FULL.text_bytes)
    parser.add_argument("--texts", type=int, default=-1,
                        help="only the first N texts (0: only the 8 KB, load and roofline rows)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help="run only these engines (comma-separated); rows of the others "
                             "are kept from the previous engines.json in --out")
    options = parser.parse_args(argv)
    engines = tuple(options.engines.split(","))
    sizes = Sizes(**{**vars(FULL), "text_bytes": options.text_bytes})
    texts = text_inputs(sizes)
    if options.texts >= 0:
        texts = texts[: options.texts]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmarc-engines-") as tmp:
        results = run(texts, FULL.segment_length, Path(tmp), engines)
    results["total_seconds"] = time.perf_counter() - started
    previous = options.out / "engines.json"
    if set(engines) != set(ENGINES) and previous.exists():
        kept = json.loads(previous.read_text())
        for engine in set(ENGINES) - set(engines):
            for key in (engine, f"small {engine}"):
                if key in kept:
                    results[key] = {**kept[key], "from_run": kept.get("stamp")}
    results["stamp"] = stamp()
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "engines.json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    (options.out / "engines.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
