"""Load a located model for the LLM codec: weights, tokenizer, token table, fingerprint.

Device and dtype policy: ``auto`` is CUDA when present, else CPU; the default dtype is
float32 on CPU and bfloat16 on CUDA.  On CUDA we switch off TF32 and reduced-precision
reductions and ask for deterministic algorithms, because cuBLAS may otherwise pick
differently-accumulating kernels from run to run.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmarc.errors import ModelError, ModelNotFoundError
from llmarc.model.fingerprint import architecture_of, model_fingerprint
from llmarc.model.sources import ModelSource, converted_gguf_folder, file_digest, resolve

DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class LoadedModel:
    """Everything the LLM codec needs from a model, ready to run."""

    source: ModelSource
    model: Any  # a transformers LlamaForCausalLM on its device, eval mode
    tokenizer: Any
    table: list[bytes | None]  # token id -> bytes, padded to the logits width
    start_token: int
    fingerprint: bytes
    device: Any  # torch.device
    dtype_name: str
    threads: int
    environment: dict[str, Any] = field(default_factory=dict)
    _integer: Any = field(default=None, repr=False)

    @property
    def vocab_size(self) -> int:
        return len(self.table)

    @property
    def context_window(self) -> int:
        """The most positions the model was made for (``max_position_embeddings``): no
        segment, and no decoder cache, may be longer."""
        return int(self.model.config.max_position_embeddings)

    def integer_model(self, length: int, engine: str = "int-v2") -> Any:
        """The integer form of this model for ``engine`` (int-v1 or int-v2) and segments
        up to ``length`` positions, derived once from the float32 weights (the rotary
        tables grow with ``length``; the engines share the weights)."""
        from llmarc.inference.integer import ATTENTION_LEVELS, IntegerModel

        if self._integer is None:
            self._integer = IntegerModel(self.model, length, device=self.device)
            # The float weights are not needed again (the integer model keeps copies of
            # what it reads, e.g. the embedding table): free them, keep the config.
            self.model.to("meta")
            return_freed_memory()
        elif self._integer.max_length < length:
            self._integer.extend(length)
        return self._integer.with_attention_levels(ATTENTION_LEVELS[engine])


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere
    nothing), once, after the integer model's derivation.

    Its temporaries (float64 blocks of tens of MB) are served from the heap and freed
    in an order that can leave hundreds of MB free but resident (measured: 264 MB);
    the decoder's caches, made next on other threads and so in other heaps, cannot
    reuse them, and a peak RSS adds both."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # not glibc
        return
    trim(0)


#: Spin iterations before an idle OpenMP thread sleeps (libgomp; numba's pool reads it too).
OPENMP_SPIN = "10000"


def set_openmp_waiting() -> None:
    """Short spinning for OpenMP threads, set before torch (or numba) loads its runtime.

    Endless spinning collapses a busy machine (issue 9: 862 s of CPU and no result where
    one thread took 219 s); no spinning at all (``OMP_WAIT_POLICY=PASSIVE``) makes each
    of a decoding step's ~150 small parallel regions wake sleeping threads: 0.43 s a step
    at batch width 32 against 0.30 s with a short spin, and 0.19 s against 0.12 s at width
    2 with a busy process on every core (benchmarks/README.md).  A short spin serves both."""
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN)


def _import_torch() -> Any:
    # Never reach for a hub, and keep the libraries' own progress bars and advice off
    # llmarc's stderr (ours show the work).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantizer's own bar
    set_openmp_waiting()
    try:
        import torch
        import transformers
    except ImportError as exc:  # the base install has no ML stack
        raise ModelError(
            "the LLM codec needs PyTorch and transformers: pip install torch==2.13.0 "
            "'llmarc[llm]'"
        ) from exc
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return torch


def pick_device(device: str) -> Any:
    """Parse ``auto|cpu|cuda[:N]`` into a torch.device, with a clear error if unavailable."""
    torch = _import_torch()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"invalid device {device!r} (use auto, cpu or cuda[:N])") from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("device cuda requested but no CUDA GPU is available")
    if parsed.type not in ("cpu", "cuda"):
        raise ModelError(f"unsupported device type {parsed.type!r} (use cpu or cuda)")
    return parsed


def configure_determinism(device: Any, threads: int) -> None:
    """Pin the knobs that select kernels: thread count on CPU, TF32/reductions on CUDA."""
    torch = _import_torch()
    torch.set_num_threads(threads)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def environment_profile(device: Any) -> dict[str, Any]:
    """The parts of the numerics profile this machine imposes (they cannot be adopted)."""
    torch = _import_torch()
    import transformers

    env: dict[str, Any] = {
        "device_type": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if device.type == "cpu":
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    else:
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def weights_digest(folder: Path) -> str:
    """SHA-256 over the folder's weight files (sorted names) — the bytes the weights come from."""
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not files:
        raise ModelNotFoundError(f"no weight files (*.safetensors, *.bin) in {folder}")
    sha = hashlib.sha256()
    for path in files:
        sha.update(path.name.encode() + b"\0" + bytes.fromhex(file_digest(path)))
    return sha.hexdigest()


def load_model(
    model: str | os.PathLike[str] | None = None,
    *,
    device: str = "auto",
    dtype: str | None = None,
    threads: int | None = None,
    status: Callable[[str], None] | None = None,
    engine: str = "int-v2",
) -> LoadedModel:
    """Resolve, load and fingerprint a model; never downloads anything.

    For int-v1/v2 the float network is always loaded in float32 on the CPU (the integer
    model is derived from float32 weights, bit for bit, and then lives on ``device``);
    ``dtype`` applies to lockstep-v1 only."""
    torch = _import_torch()
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from llmarc.model.tokenbytes import build_token_bytes, table_digest

    source = resolve(model)
    torch_device = pick_device(device)
    integer = engine in ("int-v1", "int-v2")
    if integer:
        if dtype not in (None, "float32"):
            raise ModelError(f"--dtype {dtype} applies to the lockstep-v1 engine only "
                             f"({engine} computes in integers)")
        dtype = "float32"
    dtype_name = dtype or ("bfloat16" if torch_device.type == "cuda" else "float32")
    if dtype_name not in DTYPES:
        raise ModelError(f"unsupported dtype {dtype_name!r} (use {', '.join(DTYPES)})")
    thread_count = threads or torch.get_num_threads()
    configure_determinism(torch_device, thread_count)

    folder = converted_gguf_folder(source.path, status) if source.kind == "gguf" else source.path
    config = AutoConfig.from_pretrained(str(folder))
    if config.model_type != "llama":
        raise ModelError(
            f"{source.display_name}: model type {config.model_type!r} is not supported "
            "(llmarc runs LLaMA-family models)"
        )
    if status is not None:
        status(f"loading {source.display_name} ({dtype_name} on {torch_device})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        network = LlamaForCausalLM.from_pretrained(
            str(folder), dtype=getattr(torch, dtype_name), low_cpu_mem_usage=True
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load {source.display_name}: {exc}") from exc
    network = network.to(torch.device("cpu") if integer else torch_device).eval()

    logits_width = network.lm_head.out_features
    table = list(build_token_bytes(tokenizer))
    if len(table) > logits_width:
        raise ModelError(
            f"tokenizer has {len(table)} tokens but the model predicts only {logits_width}"
        )
    table += [None] * (logits_width - len(table))
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (
        tokenizer.eos_token_id
    )
    if start is None:
        raise ModelError(f"{source.display_name}: the tokenizer has no BOS or EOS token")
    fingerprint = model_fingerprint(
        weights_digest(folder), table_digest(table), architecture_of(config), int(start)
    )
    return LoadedModel(
        source=source,
        model=network,
        tokenizer=tokenizer,
        table=table,
        start_token=int(start),
        fingerprint=fingerprint,
        device=torch_device,
        dtype_name=dtype_name,
        threads=thread_count,
        environment=environment_profile(torch_device),
    )
