"""Turn a benchmark run's measurements into the markdown table and the two plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import engines

#: LLMZip (arXiv 2306.04050), LLaMA-7B on the first 1 MB of text8, bits per character.
#: Shown beside our figures, labelled as published; nothing of ours is derived from them.
PUBLISHED_TEXT8 = {"LLaMA-7B + AC (LLMZip)": 0.7101, "entropy upper bound H_ub (LLMZip)": 0.709}


def _stamp_line(results: dict[str, Any]) -> str:
    s = results["stamp"]
    versions = ", ".join(f"{k} {v}" for k, v in s["versions"].items())
    return f"{s['date']}; {s['machine']}; Python {s['python']}; {versions}"


def _bpb(bits: float, size: int) -> str:
    return f"{bits / size:.3f}"


Cell = float | str  # bits per byte, or why there is no figure


def compression_rows(results: dict[str, Any]) -> tuple[list[str], list[tuple[str, list[Cell]]]]:
    """(input names, [(method, bits per byte per input)]) for the text inputs."""
    texts = [i for i in results["inputs"] if i["kind"] == "text"]
    names = [i["name"] for i in texts]
    size = {i["name"]: i["bytes"] for i in texts}
    llm, members = results["pack"]["llm"], {m["name"]: m for m in results["pack"]["members"]}

    def model(key: str, scale: int = 1) -> list[Cell]:
        return [scale * llm[n][key] / size[n] if n in llm else "not LLM-coded" for n in names]

    rows: list[tuple[str, list[Cell]]] = [
        ("llmarc archive entry (real, default model)",
         [8 * members[n]["packed_size"] / size[n] for n in names]),
        ("ideal cross-entropy H_ub (same run)", model("model_bits")),
        ("model ranks + zlib -9 (LLMZip's LLaMA+zlib)", model("ranks_zlib_bytes", 8)),
        ("model ranks + zstd -19", model("ranks_zstd_bytes", 8)),
        ("token-by-token, ceil(-log2 p) bits (LLMZip's TbyT)", model("tbyt_bits")),
    ]
    classic: dict[str, dict[str, int | None]] = {}
    for row in results["classic"]:
        if row["input"] in size:
            classic.setdefault(row["compressor"], {})[row["input"]] = row["compressed"]
    for compressor, sizes in classic.items():
        rows.append((compressor, ["roundtrip failed" if sizes[n] is None
                                  else 8 * sizes[n] / size[n] for n in names]))  # type: ignore[operator]
    return names, rows


def _cell(value: Cell) -> str:
    return value if isinstance(value, str) else f"{value:.3f}"


def markdown(results: dict[str, Any]) -> str:
    names, rows = compression_rows(results)
    inputs = {i["name"]: i for i in results["inputs"]}
    pack, extract = results["pack"], results["extract"]
    llm = pack["llm"]
    profile = pack["profile"]
    out = [f"# llmarc benchmarks ({results['mode']} run)", "",
           f"Measured {_stamp_line(results)}.", "",
           "Reproduce: `make bench` (full) or `make bench-quick`. Model: "
           f"{results['load'][0]['model']}, engine {profile.get('engine', 'lockstep-v1')}, "
           f"segment length {profile['segment_length']} tokens"
           + (f", batch width {profile['batch_width']}, {profile['dtype']} on "
              f"{profile['device_type']} ({profile.get('cpu_capability', '-')}), "
              f"{profile['threads']} threads" if "batch_width" in profile else
              " (an integer engine: the same logits on any machine, width and thread count)")
           + ".", "",
           "## Compression, bits per byte (= bits per character for the text8 inputs)", "",
           "| method | " + " | ".join(names) + " |",
           "|---|" + "---:|" * len(names)]
    for method, values in rows:
        out.append(f"| {method} | " + " | ".join(_cell(v) for v in values) + " |")
    coded = [n for n in names if n in llm]
    out += ["", "Inputs: " + "; ".join(f"**{n}**: {inputs[n]['description']} "
                                         f"({inputs[n]['bytes']:,} B"
                                         + (f", {llm[n]['tokens']:,} tokens)" if n in llm else ")")
                                         for n in names) + ".", ""]
    total_text = sum(inputs[n]["bytes"] for n in names)
    ideal_total = sum(llm[n]["model_bits"] for n in coded)
    packed = {m["name"]: m["packed_size"] for m in pack["members"]}
    overheads = ", ".join(f"{n} {100 * (8 * packed[n] / llm[n]['model_bits'] - 1):+.2f}%"
                          for n in coded)
    published = ", ".join(f"{k} {v}" for k, v in PUBLISHED_TEXT8.items())
    container = pack["archive_bytes"] - sum(packed.values())
    whole = (f"The whole archive of the {len(names)} text inputs is {pack['archive_bytes']:,} B "
             f"= {8 * pack['archive_bytes'] / total_text:.3f} bits/byte with every byte "
             f"counted; {container:,} B of it are the container (header, index, model table "
             "with its numerics profile, footer).")
    if len(coded) == len(names):
        whole += (f" Ideal {ideal_total / total_text:.3f} bits/byte, so "
                  f"{100 * (8 * pack['archive_bytes'] / ideal_total - 1):+.2f}% in all.")
    out += [f"Coder overhead over the ideal, per entry (payload with its token count and "
            f"segment lengths): {overheads}.", whole,
            "Published for comparison (LLMZip, LLaMA-7B, first 1 MB of text8, bits/char, not "
            f"measured here): {published}.", ""]
    out += ["## Fallback path: binaries (`--codec auto`, no model runs)", "",
            "| file | bytes | llmarc codec | llmarc bits/byte | zstd -19 | xz -9e |",
            "|---|---:|---|---:|---:|---:|"]
    classic = {(r["compressor"], r["input"]): r["compressed"] for r in results["classic"]}
    for m in results["binaries"]["members"]:
        n, size = m["name"], m["size"]
        out.append(f"| {n} | {size:,} | {m['codec']} | {8 * m['packed_size'] / size:.3f} | "
                   f"{8 * classic[('zstd -19', n)] / size:.3f} | "
                   f"{8 * classic[('xz -9e', n)] / size:.3f} |")
    tokens = sum(llm[n]["tokens"] for n in coded)
    coded_bytes = sum(inputs[n]["bytes"] for n in coded)
    load_first, load_cached = results["load"]
    out += ["", "## Speed and memory", "",
            "| stage | tokens | LLM coding s | tokens/s | KB/s | process wall s | peak RSS |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for label, stage in (("pack (encode)", pack), ("extract (decode, fresh process)", extract)):
        out.append(f"| {label} | {tokens:,} | {stage['coding_seconds']:.1f} | "
                   f"{tokens / stage['coding_seconds']:.0f} | "
                   f"{coded_bytes / 1000 / stage['coding_seconds']:.2f} | "
                   f"{stage['process_seconds']:.1f} | {stage['peak_rss_bytes'] / 2**30:.2f} GiB |")
    out += ["", f"Model load: {load_first['seconds']:.1f} s the first time (the weights' "
            f"digest computed and remembered), then {load_cached['seconds']:.1f} s; "
            f"{load_first['parameters']:,} parameters.", "",
            f"Batch-width sweep (real encoder, {results['sizes']['batch_steps']} tokens per row, "
            "KV cache sized for 1024 positions, one process per width):", "",
            "| batch width | tokens/s | peak RSS |", "|---:|---:|---:|"]
    for w in results["widths"]:
        out.append(f"| {w['width']} | {w['tokens'] / w['seconds']:.1f} | "
                   f"{w['peak_rss_bytes'] / 2**30:.2f} GiB |")
    sweep = results["sweep"]
    out += ["", f"## Segment length (the paper's memory M), text8, {sweep['bytes']:,} B, "
            f"{sweep['tokens']:,} tokens", "",
            "Ideal cross-entropy from full forward passes, each segment starting from BOS.", "",
            "| segment length | bits/char | forward tokens/s |", "|---:|---:|---:|"]
    for row in sweep["rows"]:
        out.append(f"| {row['segment_length']} | {row['model_bits'] / sweep['bytes']:.4f} | "
                   f"{sweep['tokens'] / row['seconds']:.0f} |")
    if "engines" in results:
        out += ["", engines.markdown(results["engines"])]
    out += ["", f"Total benchmark time {results['total_seconds'] / 60:.1f} min.", ""]
    return "\n".join(out)


def _stamp(figure: Any, results: dict[str, Any]) -> None:
    import textwrap

    figure.text(0.01, 0.005, "\n".join(textwrap.wrap(_stamp_line(results), 170)), fontsize=6)


def plots(results: dict[str, Any], out: Path) -> None:
    """compression.png (bits/byte per method and input) and speed.png (batch width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, rows = compression_rows(results)
    figure, axes = plt.subplots(figsize=(11, 6.5))
    height = 0.8 / len(names)
    for k, name in enumerate(names):
        values = [r[1][k] for r in rows]
        axes.barh([i + k * height for i in range(len(rows))],
                  [v if isinstance(v, float) else 0.0 for v in values], height=height, label=name)
    axes.set_yticks([i + 0.4 - height / 2 for i in range(len(rows))],
                    [r[0] for r in rows], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("bits per byte (lower is better)")
    axes.set_title("llmarc vs classic compressors")
    axes.legend(fontsize=8)
    _stamp(figure, results)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.savefig(out / "compression.png", dpi=110)
    plt.close(figure)

    widths = results["widths"]
    figure, speed = plt.subplots(figsize=(8, 4.5))
    speed.plot([w["width"] for w in widths], [w["tokens"] / w["seconds"] for w in widths],
               "o-", label="tokens/s")
    speed.set_xscale("log", base=2)
    speed.set_xlabel("batch width B")
    speed.set_ylabel("encode tokens/s")
    memory = speed.twinx()
    memory.plot([w["width"] for w in widths], [w["peak_rss_bytes"] / 2**30 for w in widths],
                "s--", color="tab:red", label="peak RSS")
    memory.set_ylabel("peak RSS, GiB")
    speed.set_title("llmarc encoder speed and memory against batch width")
    figure.legend(loc="upper left", bbox_to_anchor=(0.1, 0.88), fontsize=8)
    _stamp(figure, results)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    figure.savefig(out / "speed.png", dpi=110)
    plt.close(figure)
