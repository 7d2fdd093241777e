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
32, and the independent decoder (spec/reference/decoder.py: the container, entropy
coding, model derivation and engine written from spec/ in NumPy, nothing from llmarc,
no torch).  Prints a table; exits 1 if any row differs.

Each extract also reports which code actually ran (``OBSERVE``: PyTorch's kernel
capability, MKL's reproducibility mode and dispatch level, the int8 GEMM probe's
verdict, numba's target CPU and features, the VNNI GEMM calls, the worker threads and
rows per group), and each row states what its switch must change against the baseline
(``EXPECT``): a row whose switch did not take effect fails like a row that decodes
differently, so "exact under AVX2 kernels" cannot mean "ran the default kernels again".
A switch this host cannot show (e.g. MKL's instruction limit on a CPU where MKL already
runs its lowest code path, oneDNN's ISA limit on a CPU without VNNI) is printed as
unproven, never as proven.
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
]


#: Runs ``llmarc ARGS`` in this process with spies on the code paths, then writes what ran
#: as JSON to $LLMARC_PORTABILITY_REPORT.
OBSERVE = r"""
import ctypes, glob, json, os, sys
import torch
from llmarc import cli
from llmarc.inference import int8_gemm, integer, threads, vnni

seen = {"int8_gemm": [], "vnni_gemm_calls": 0, "workers": [], "group_rows": []}
probe = int8_gemm.int8_gemm_is_exact
def spy_probe(*args, **kwargs):
    verdict = probe(*args, **kwargs)
    seen["int8_gemm"].append(verdict)
    return verdict
int8_gemm.int8_gemm_is_exact = spy_probe
integer.int8_gemm_is_exact = spy_probe  # imported there by name
make_kernel = vnni.kernel
def spy_kernel(*args, **kwargs):
    seen["vnni_gemm_calls"] += 1
    return make_kernel(*args, **kwargs)
vnni.kernel = spy_kernel
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
lib = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib",
                                         "libtorch_cpu.so"))[0])
def mkl(name):
    try:
        function = getattr(lib, name)
    except AttributeError:
        return None
    function.restype = ctypes.c_int
    return function(1) if name.endswith("cbwr_get") else function()
report = {
    "aten_capability": torch.backends.cpu.get_cpu_capability(),
    "mkl_cbwr": mkl("mkl_serv_cbwr_get"), "mkl_cpu_level": mkl("mkl_serv_cpu_detect"),
    "int8_gemm": None if not seen["int8_gemm"] else all(seen["int8_gemm"]),
    "numba_cpu": codegen._get_host_cpu_name(),
    "numba_avx2": "+avx2" in features, "numba_avx512": "+avx512f" in features,
    "vnni_available": vnni.available(), "vnni_gemm_calls": seen["vnni_gemm_calls"],
    "max_workers": max(seen["workers"], default=0),
    "max_group_rows": max(seen["group_rows"], default=0),
    "torch_threads": torch.get_num_threads(),
}
with open(os.environ["LLMARC_PORTABILITY_REPORT"], "w") as f:
    json.dump(report, f)
sys.exit(code)
"""


def expectation(label: str, got: dict, base: dict) -> tuple[bool | None, str]:
    """Did this row's switch take effect?  (True: shown; False: it did not; None: this
    host cannot show it), with the evidence in words."""
    def show(*keys: str) -> str:
        return ", ".join(f"{k}={got.get(k)!r} (baseline {base.get(k)!r})" for k in keys)

    if label.endswith(" kernels") and label.split()[0] in ("default", "avx2", "avx512"):
        want = label.split()[0].upper()
        return got["aten_capability"] == want, show("aten_capability")
    if label == "MKL_CBWR=COMPATIBLE":
        return got["mkl_cbwr"] is not None and got["mkl_cbwr"] != base["mkl_cbwr"], \
            show("mkl_cbwr")
    if label == "MKL SSE4_2 only":
        if not base.get("mkl_cpu_level"):  # MKL already runs its lowest path here
            return None, show("mkl_cpu_level")
        return got["mkl_cpu_level"] < base["mkl_cpu_level"], show("mkl_cpu_level")
    if label in ("oneDNN AVX2 (no VNNI)", "fp32 GEMMs forced"):
        if label.startswith("oneDNN") and base["int8_gemm"] is not True:
            return None, show("int8_gemm")  # no exact int8 GEMM to take away here
        return got["int8_gemm"] is False, show("int8_gemm")
    if label == "VNNI kernel off":
        if not base["vnni_gemm_calls"]:
            return None, show("vnni_gemm_calls")
        return got["vnni_gemm_calls"] == 0, show("vnni_gemm_calls")
    if label == "kernels for generic x86-64":
        return (got["numba_cpu"] == "generic" and not got["numba_avx2"]
                and not got["vnni_available"]), show("numba_cpu", "numba_avx2", "vnni_available")
    if label == "kernels for AVX2 (haswell)":
        return (got["numba_cpu"] == "haswell" and got["numba_avx2"]
                and not got["numba_avx512"]), show("numba_cpu", "numba_avx2", "numba_avx512")
    if label.endswith(" thread") or label.endswith(" threads"):
        n = int(label.split()[0])
        ok = got["torch_threads"] == n and 1 <= got["max_workers"] <= n
        return ok and (n == 1 or got["max_workers"] == n), show("torch_threads", "max_workers")
    if label.startswith("batch width"):
        width = int(label.split()[-1])
        if base["max_group_rows"] <= width:  # the baseline stepped no more rows than that
            return (None if got["max_group_rows"] <= width else False), show("max_group_rows")
        return got["max_group_rows"] <= width, show("max_group_rows")
    return None, "no observable"


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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmarc-portability-") as tmp:
        return run(args.smollm2, Path(tmp), args.engine)


if __name__ == "__main__":
    sys.exit(main())
