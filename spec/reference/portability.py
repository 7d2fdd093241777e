"""The portability matrix: pack once, extract bit-exactly under every numerics environment.

    python spec/reference/portability.py                  # tiny fixture models (CI, ~2 min)
    python spec/reference/portability.py --smollm2        # SmolLM2 on alice29.txt's first 16 KB
    python spec/reference/portability.py --engine int-v1  # the other integer engine

One pack (int-v2 unless ``--engine``) in this process's default environment; then one
fresh process per environment extracts the archive and compares every byte: PyTorch's CPU
kernels (``ATEN_CPU_CAPABILITY`` default / avx2 / avx512 where the CPU has it), MKL's
conditional-numerical-reproducibility and instruction-set switches, oneDNN limited to
AVX2 (no VNNI: the int8 GEMM probe fails, fp32 GEMMs run) and the fp32 GEMMs forced
(``LLMARC_INT8_GEMM=off``), the decoding step's VNNI kernel off (``LLMARC_VNNI=off``:
oneDNN's GEMM instead), the compiled (numba) kernels generated for a generic x86-64
CPU and for AVX2 (``NUMBA_CPU_NAME``), 1 and 2 threads, decoding batch widths 1, 3 and
32, and the NumPy implementation of spec/llm-codec.md §5 (spec/reference/decode_numpy.py,
no torch).  Prints a table; exits 1 if any row differs.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT.parent / "shared" / "corpus"

#: (label, extra environment, extra extract options)
MATRIX: list[tuple[str, dict[str, str], list[str]]] = [
    ("default kernels", {"ATEN_CPU_CAPABILITY": "default"}, []),
    ("avx2 kernels", {"ATEN_CPU_CAPABILITY": "avx2"}, []),
    ("avx512 kernels", {"ATEN_CPU_CAPABILITY": "avx512"}, []),
    ("MKL_CBWR=COMPATIBLE", {"MKL_CBWR": "COMPATIBLE"}, []),
    ("MKL SSE4_2 only", {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}, []),
    # oneDNN without VNNI: its int8 GEMM saturates, the probe sees it, fp32 GEMMs run
    ("oneDNN AVX2 (no VNNI)", {"ONEDNN_MAX_CPU_ISA": "AVX2"}, []),
    ("fp32 GEMMs forced", {"LLMARC_INT8_GEMM": "off"}, []),
    # the step's few-row GEMMs by oneDNN instead of the VNNI kernel
    ("VNNI kernel off", {"LLMARC_VNNI": "off"}, []),
    # the compiled kernels generated for other CPUs: baseline x86-64 (SSE2, no vector
    # int64 multiply, no gathers) and AVX2 without AVX-512
    ("kernels for generic x86-64", {"NUMBA_CPU_NAME": "generic"}, []),
    ("kernels for AVX2 (haswell)", {"NUMBA_CPU_NAME": "haswell"}, []),
    ("1 thread", {}, ["--threads", "1"]),
    ("2 threads", {}, ["--threads", "2"]),
    ("batch width 1", {}, ["--batch-width", "1"]),
    ("batch width 3", {}, ["--batch-width", "3"]),
    ("batch width 32", {}, ["--batch-width", "32"]),
]


def cpu_has_avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def make_source(folder: Path, smollm2: bool) -> None:
    folder.mkdir(parents=True)
    if smollm2:
        (folder / "alice.txt").write_bytes((CORPUS / "alice29.txt").read_bytes()[:16384])
        return
    text = (ROOT / "fixtures" / "tiny-training.txt").read_bytes()
    (folder / "a.txt").write_bytes(text[:1500])
    (folder / "b.txt").write_bytes(text[3000:3700] + "é ü 日本 😀\n".encode())
    (folder / "c" / "d.txt").parent.mkdir()
    (folder / "c" / "d.txt").write_bytes(b"short")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmarc.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, check=False)


def same_tree(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    got = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files == got and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def run(smollm2: bool, workdir: Path, engine: str) -> int:
    model = "smollm2" if smollm2 else str(ROOT / "fixtures" / "tiny-llama-bpe")
    length = "256" if smollm2 else "48"
    src = workdir / "src"
    make_source(src, smollm2)
    archive = workdir / "portable.llma"
    started = time.perf_counter()
    packed = cli("pack", str(src), str(archive), "--codec", "llm", "--model", model,
                 "--device", "cpu", "--segment-length", length, "--engine", engine, "--quiet")
    if packed.returncode:
        print(packed.stderr, file=sys.stderr)
        return 1
    print(f"packed {src} -> {archive.stat().st_size} B ({engine}) in "
          f"{time.perf_counter() - started:.1f} s")
    rows = [row for row in MATRIX if row[0] != "avx512 kernels" or cpu_has_avx512()]
    failures = 0
    for label, env, options in rows:
        dest = workdir / f"out-{label.replace(' ', '-').replace('=', '-')}"
        started = time.perf_counter()
        result = cli("extract", str(archive), "-C", str(dest), "--model", model,
                     "--device", "cpu", "--quiet", *options, env=env)
        ok = result.returncode == 0 and same_tree(src, dest)
        failures += not ok
        detail = "" if ok else " " + " ".join(result.stderr.split())[:200]
        print(f"{label:<27} {'exact' if ok else 'DIFFERS'}  {time.perf_counter() - started:6.1f} s"
              f"{detail}")
    if not smollm2:  # the NumPy engine recomputes every prefix: tiny models only
        dest = workdir / "out-numpy"
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, str(ROOT / "spec" / "reference" / "decode_numpy.py"),
             str(archive), model, str(dest)], capture_output=True, text=True, check=False)
        ok = result.returncode == 0 and same_tree(src, dest)
        failures += not ok
        print(f"{'NumPy engine (no torch)':<27} {'exact' if ok else 'DIFFERS'}  "
              f"{time.perf_counter() - started:6.1f} s"
              f"{'' if ok else ' ' + ' '.join(result.stderr.split())[-200:]}")
    print("portability: " + ("every environment decoded bit-exactly" if not failures
                             else f"{failures} environment(s) differ"))
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", action="store_true",
                        help="the embedded model on alice29.txt's first 16 KB")
    parser.add_argument("--engine", choices=("int-v2", "int-v1"), default="int-v2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmarc-portability-") as tmp:
        return run(args.smollm2, Path(tmp), args.engine)


if __name__ == "__main__":
    sys.exit(main())
