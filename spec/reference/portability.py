"""The portability matrix: pack once, extract bit-exactly under every numerics environment.

    python spec/reference/portability.py                  # tiny fixture models (CI, ~2 min)
    python spec/reference/portability.py --smollm2        # SmolLM2 on alice29.txt's first 16 KB
    python spec/reference/portability.py --engine int-v1  # the other integer engine
    python spec/reference/portability.py --carry 16:3     # context carry C:G (§3.4)
    python spec/reference/portability.py --carry 16:3:3   # ... and mixing of orders 0..K (§3.6)

One pack (int-v2 unless ``--engine``) in this process's default environment, then the same
pack through the torch operations a GPU runs (``LLMARC_CPU_ENGINE=torch``), which must be
the same archive byte for byte; then one fresh process per environment extracts the
archive and compares every byte: the CPU engine's exact products without the VNNI
kernel (``LLMARC_VNNI=off``: float32 GEMMs through NumPy's BLAS), that BLAS limited to
SSE3 code and to one thread, the compiled (numba) kernels generated for a generic x86-64
CPU and for AVX2 (``NUMBA_CPU_NAME``), 1 and 2 threads, decoding batch widths 1, 3 and
32; the torch path with PyTorch's default (non-vector) kernels; and the independent decoder
(spec/reference/decoder.py: the container, entropy coding, model derivation and engine
written from spec/ in NumPy, nothing from llmarc, no torch).  Prints a table; exits 1 if
any row differs.

Each extract also reports which code actually ran (``OBSERVE``: which engine, whether
torch was imported, the VNNI kernel's and the BLAS path's calls, OpenBLAS's core and
threads, numba's target CPU and features, the worker threads and rows per group), and
each row states what its switch must change against the baseline (``EXPECT``): a row
whose switch did not take effect fails like a row that decodes differently, so "exact
under AVX2 kernels" cannot mean "ran the default kernels again".  A switch this host
cannot show (e.g. the VNNI kernel off on a CPU without VNNI) is printed as unproven,
never as proven.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT.parent / "shared" / "corpus"

#: LLVM's feature string of a Haswell CPU (AVX2, FMA, BMI2; no AVX-512, no VNNI).
HASWELL_FEATURES = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+cx8,+f16c,+fma,+fsgsbase,"
                    "+fxsr,+invpcid,+lzcnt,+mmx,+movbe,+pclmul,+popcnt,+rdrnd,+sahf,+sse,"
                    "+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,+xsaveopt")

#: The torch path on the CPU (``llmarc.model.loader.CPU_ENGINE_SWITCH``).
TORCH_PATH = {"LLMARC_CPU_ENGINE": "torch"}

#: (label, extra environment, extra extract options)
MATRIX: list[tuple[str, dict[str, str], list[str]]] = [
    # the exact products by float32 BLAS chunks instead of the VNNI kernel
    ("VNNI kernel off (BLAS)", {"LLMARC_VNNI": "off"}, []),
    ("BLAS for SSE3 (Prescott)", {"LLMARC_VNNI": "off", "OPENBLAS_CORETYPE": "Prescott"}, []),
    ("BLAS on 1 thread", {"LLMARC_VNNI": "off", "OPENBLAS_NUM_THREADS": "1"}, []),
    # the compiled kernels generated for other CPUs: baseline x86-64 (SSE2, no vector
    # int64 multiply, no gathers) and AVX2 without AVX-512.  NUMBA_CPU_NAME alone keeps
    # the host's features (numba sets NUMBA_CPU_FEATURES to "" only for "generic"): the
    # haswell row once compiled AVX-512 code; it names Haswell's features itself.
    ("kernels for generic x86-64", {"NUMBA_CPU_NAME": "generic"}, []),
    ("kernels for AVX2 (haswell)", {"NUMBA_CPU_NAME": "haswell",
                                    "NUMBA_CPU_FEATURES": HASWELL_FEATURES}, []),
    ("1 thread", {}, ["--threads", "1"]),
    ("2 threads", {}, ["--threads", "2"]),
    ("batch width 1", {}, ["--batch-width", "1"]),
    ("batch width 3", {}, ["--batch-width", "3"]),
    ("batch width 32", {}, ["--batch-width", "32"]),
    # the GPU's path (torch operations) on this CPU, under PyTorch's switches
    ("torch path", TORCH_PATH, []),
    ("torch path, default kernels", {**TORCH_PATH, "ATEN_CPU_CAPABILITY": "default"}, []),
]


#: Runs ``llmarc ARGS`` in this process with spies on the code paths, then writes what ran
#: as JSON to $LLMARC_PORTABILITY_REPORT.
OBSERVE = r"""
import json, os, sys
from llmarc import cli
from llmarc.inference import exact_product, threads, vnni

seen = {"vnni_gemm_calls": 0, "blas_calls": 0, "workers": [], "group_rows": []}
make_kernel = vnni.kernel
def spy_kernel(*args, **kwargs):
    seen["vnni_gemm_calls"] += 1
    return make_kernel(*args, **kwargs)
vnni.kernel = spy_kernel
blas = exact_product.blas_product
def spy_blas(*args, **kwargs):
    seen["blas_calls"] += 1
    return blas(*args, **kwargs)
exact_product.blas_product = spy_blas
split = threads.run_split
def spy_split(items, work, workers):
    seen["workers"].append(workers)
    seen["group_rows"].extend(len(group) for group in items)
    return split(items, work, workers)
threads.run_split = spy_split

code = cli.run(sys.argv[1:])

from numba.core.registry import cpu_target
codegen = cpu_target.target_context.codegen()
features = codegen._get_host_cpu_features()
report = {
    "torch_imported": "torch" in sys.modules,
    "numba_cpu": codegen._get_host_cpu_name(),
    "numba_avx2": "+avx2" in features, "numba_avx512": "+avx512f" in features,
    "vnni_available": vnni.available(), "vnni_gemm_calls": seen["vnni_gemm_calls"],
    "blas_calls": seen["blas_calls"],
    "max_workers": max(seen["workers"], default=0),
    "max_group_rows": max(seen["group_rows"], default=0),
    "threads": threads.thread_count(),
}
try:
    from threadpoolctl import threadpool_info
    blas_info = [i for i in threadpool_info() if i.get("internal_api") == "openblas"]
    report["openblas_core"] = blas_info[0].get("architecture") if blas_info else None
    report["openblas_threads"] = blas_info[0].get("num_threads") if blas_info else None
except ImportError:
    report["openblas_core"] = report["openblas_threads"] = None
if report["torch_imported"]:
    import torch
    report["aten_capability"] = torch.backends.cpu.get_cpu_capability()
with open(os.environ["LLMARC_PORTABILITY_REPORT"], "w") as f:
    json.dump(report, f)
sys.exit(code)
"""


def expectation(label: str, got: dict, base: dict) -> tuple[bool | None, str]:
    """Did this row's switch take effect?  (True: shown; False: it did not; None: this
    host cannot show it), with the evidence in words."""
    def show(*keys: str) -> str:
        return ", ".join(f"{k}={got.get(k)!r} (baseline {base.get(k)!r})" for k in keys)

    if label.startswith("torch path"):
        took = got.get("torch_imported") is True and not got.get("vnni_gemm_calls") \
            and not got.get("blas_calls")
        if label.endswith("default kernels"):
            took = took and got.get("aten_capability") == "DEFAULT"
        return took, show("torch_imported", "aten_capability", "vnni_gemm_calls")
    if label.startswith("VNNI kernel off") or label.startswith("BLAS"):
        if not base["vnni_gemm_calls"]:
            return None, show("vnni_gemm_calls")
        took = got["vnni_gemm_calls"] == 0 and got["blas_calls"] > 0
        if label == "BLAS for SSE3 (Prescott)":
            # OpenBLAS names its SSE3 kernels' core by its own table ('Katmai' here)
            took = took and got.get("openblas_core") not in (None, base.get("openblas_core"))
        if label == "BLAS on 1 thread":
            took = took and got.get("openblas_threads") == 1
        return took, show("vnni_gemm_calls", "blas_calls", "openblas_core", "openblas_threads")
    if label == "kernels for generic x86-64":
        return (got["numba_cpu"] == "generic" and not got["numba_avx2"]
                and not got["vnni_available"]), show("numba_cpu", "numba_avx2", "vnni_available")
    if label == "kernels for AVX2 (haswell)":
        return (got["numba_cpu"] == "haswell" and got["numba_avx2"]
                and not got["numba_avx512"]), show("numba_cpu", "numba_avx2", "numba_avx512")
    if label.endswith(" thread") or label.endswith(" threads"):
        n = int(label.split()[0])
        ok = got["threads"] == n and 1 <= got["max_workers"] <= n
        return ok and (n == 1 or got["max_workers"] == n), show("threads", "max_workers")
    if label.startswith("batch width"):
        width = int(label.split()[-1])
        if base["max_group_rows"] <= width:  # the baseline stepped no more rows than that
            return (None if got["max_group_rows"] <= width else False), show("max_group_rows")
        return got["max_group_rows"] <= width, show("max_group_rows")
    return None, "no observable"


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


def observed_extract(archive: Path, dest: Path, model: str, options: list[str],
                     env: dict[str, str], report: Path) -> subprocess.CompletedProcess:
    """``llmarc extract`` in a fresh process under ``env``, reporting what code ran."""
    args = ["extract", str(archive), "-C", str(dest), "--model", model, "--device", "cpu",
            "--quiet", *options]
    return subprocess.run([sys.executable, "-c", OBSERVE, *args], capture_output=True,
                          text=True, check=False, cwd=ROOT,
                          env={**os.environ, **env, "LLMARC_PORTABILITY_REPORT": str(report),
                               "PYTHONPATH": str(ROOT)})


def same_tree(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    got = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files == got and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def run(smollm2: bool, workdir: Path, engine: str, carry: str | None = None) -> int:
    model = "smollm2" if smollm2 else str(ROOT / "fixtures" / "tiny-llama-bpe")
    length = "256" if smollm2 else "48"
    src = workdir / "src"
    make_source(src, smollm2)
    archive = workdir / "portable.llma"
    settings = ["--segment-length", length, "--engine", engine]
    if carry:  # C:G[:K], context carry of C tokens in chains of G segments, mixing
        fields = carry.split(":")
        settings += ["--carry", fields[0], "--chain", fields[1]]
        settings += ["--mix", fields[2] if len(fields) > 2 else "0"]
    started = time.perf_counter()
    packed = cli("pack", str(src), str(archive), "--codec", "llm", "--model", model,
                 "--device", "cpu", *settings, "--quiet")
    if packed.returncode:
        print(packed.stderr, file=sys.stderr)
        return 1
    print(f"packed {src} -> {archive.stat().st_size} B ({' '.join(settings)}) in "
          f"{time.perf_counter() - started:.1f} s")
    # the same pack through the torch operations (a GPU's path): the same bytes
    failures = 0
    torch_archive = workdir / "portable-torch.llma"
    started = time.perf_counter()
    packed = cli("pack", str(src), str(torch_archive), "--codec", "llm", "--model", model,
                 "--device", "cpu", *settings, "--quiet", env=TORCH_PATH)
    same = packed.returncode == 0 and torch_archive.read_bytes() == archive.read_bytes()
    failures += not same
    print(f"{'pack by the torch path':<27} {'same archive' if same else 'DIFFERS'}  "
          f"{time.perf_counter() - started:6.1f} s"
          f"{'' if same else ' ' + ' '.join(packed.stderr.split())[-200:]}")
    rows = MATRIX
    base: dict = {}
    for label, env, options in [("baseline (no switch)", {}, []), *rows]:
        dest = workdir / f"out-{label.replace(' ', '-').replace('=', '-')}"
        report = workdir / f"report-{len(base)}-{label.replace(' ', '-')}.json"
        started = time.perf_counter()
        result = observed_extract(archive, dest, model, options, env, report)
        ok = result.returncode == 0 and same_tree(src, dest)
        failures += not ok
        detail = "" if ok else " " + " ".join(result.stderr.split())[:200]
        seconds = time.perf_counter() - started
        got = json.loads(report.read_text()) if report.exists() else {}
        if not base:
            base = got or {"missing": True}
            print(f"{label:<27} {'exact' if ok else 'DIFFERS'}  {seconds:6.1f} s  ran: "
                  + ", ".join(f"{k}={v!r}" for k, v in got.items()) + detail)
            continue
        took, evidence = expectation(label, got, base) if got else (False, "no report")
        failures += took is False
        verdict = {True: "switch taken", False: "SWITCH NOT TAKEN", None: "unproven here"}
        print(f"{label:<27} {'exact' if ok else 'DIFFERS'}  {seconds:6.1f} s  "
              f"{verdict[took]}: {evidence}{detail}")
    # The independent decoder (decoder.py: nothing from llmarc) steps in NumPy at a few
    # tokens per second: tiny models only.
    for label, script in ([("independent decoder", "decoder.py")] if not smollm2 else []):
        dest = workdir / f"out-{script}"
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, str(ROOT / "spec" / "reference" / script),
             str(archive), model, str(dest)], capture_output=True, text=True, check=False)
        ok = result.returncode == 0 and same_tree(src, dest)
        failures += not ok
        print(f"{label:<27} {'exact' if ok else 'DIFFERS'}  "
              f"{time.perf_counter() - started:6.1f} s"
              f"{'' if ok else ' ' + ' '.join(result.stderr.split())[-200:]}")
    print("portability: " + ("every environment decoded bit-exactly, every provable switch "
                             "taken" if not failures
                             else f"{failures} environment(s) differ or ignored their switch"))
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", action="store_true",
                        help="the embedded model on alice29.txt's first 16 KB")
    parser.add_argument("--engine", choices=("int-v2", "int-v1"), default="int-v2")
    parser.add_argument("--carry", metavar="C:G[:K]",
                        help="pack with context carry of C tokens in chains of G segments "
                             "(and n-gram mixing of orders 0..K)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmarc-portability-") as tmp:
        return run(args.smollm2, Path(tmp), args.engine, args.carry)


if __name__ == "__main__":
    sys.exit(main())
