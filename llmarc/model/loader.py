"""Load a located model for the LLM codec: derived model, fingerprint, engines, tokenizer.

The path is straight: :func:`~llmarc.model.sources.resolve` finds the files, a reader
(:func:`~llmarc.model.hf_folder.read_hf_folder` or :func:`~llmarc.model.gguf_model.read_gguf`)
derives the model as spec/model.md defines it, :class:`~llmarc.model.fingerprint.Components`
identify it, and the engines are built from it on demand: the integer model from its
weights one tensor at a time, the lockstep-v1 float network (the one use of transformers)
only for that engine, the encoder's tokenizer only when something is encoded.

Device and dtype policy: ``auto`` is CUDA when torch sees a GPU, else CPU; the default
dtype is float32 on CPU and bfloat16 on CUDA (lockstep-v1 only).  The integer engines on
the CPU need NumPy and numba only: torch is imported for ``--device cuda`` (and by
``auto`` only where an NVIDIA driver is present) and for lockstep-v1, never to find out
that there is nothing for it to do.  On CUDA we switch off TF32 and reduced-precision
reductions and ask for deterministic algorithms, because cuBLAS may otherwise pick
differently-accumulating kernels from run to run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmarc.errors import ModelError
from llmarc.inference.threads import set_openmp_waiting
from llmarc.model.architecture import Architecture
from llmarc.model.derived import DerivedModel
from llmarc.model.fingerprint import Components, legacy_fingerprints
from llmarc.model.sources import ModelSource, resolve

DTYPES = ("float32", "bfloat16", "float16")
INTEGER_ENGINES = ("int-v1", "int-v2")
#: ``LLMARC_CPU_ENGINE=torch`` runs the integer engines' torch operations (a GPU's path)
#: on the CPU: how ``make portability`` shows that both paths give the same archive.
CPU_ENGINE_SWITCH = "LLMARC_CPU_ENGINE"
#: Where Linux shows a loaded NVIDIA driver: without it ``auto`` is the CPU, found out
#: without importing torch (seconds).
NVIDIA_DRIVER = "/proc/driver/nvidia/version"


@dataclass(frozen=True)
class Device:
    """Where a model runs: ``cpu`` or ``cuda`` with an optional index (what torch.device
    means by the same string, without needing torch to say it)."""

    type: str
    index: int | None = None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"


@dataclass
class LoadedModel:
    """Everything the LLM codec needs from a model, ready to run."""

    source: ModelSource
    derived: DerivedModel
    components: Components
    device: Device
    dtype_name: str
    threads: int
    environment: dict[str, Any] = field(default_factory=dict)
    _integer: Any = field(default=None, repr=False)
    _network: Any = field(default=None, repr=False)
    _tokenizer: Any = field(default=None, repr=False)
    _legacy: list[bytes] | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> bytes:
        """Fingerprint v2, what new archives record."""
        return self.components.fingerprint

    @property
    def table(self) -> list[bytes | None]:
        return self.derived.table

    @property
    def start_token(self) -> int:
        return self.derived.start_token

    @property
    def config(self) -> Architecture:
        """The canonical architecture (read like a transformers config)."""
        return self.derived.architecture

    @property
    def vocab_size(self) -> int:
        return len(self.table)

    @property
    def context_window(self) -> int:
        """The most positions the model was made for (``max_position_embeddings``): no
        segment, and no decoder cache, may be longer."""
        return self.config.max_position_embeddings

    def accepts(self, fingerprint: bytes) -> bool:
        """Whether an archive's recorded ``fingerprint`` names this model: version 2, or
        one of the version-1 forms llmarc 0.1 wrote (computed only when needed)."""
        if fingerprint == self.fingerprint:
            return True
        if self._legacy is None:
            self._legacy = legacy_fingerprints(self.derived)
        return fingerprint in self._legacy

    @property
    def tokenizer(self) -> Any:
        """The encoder's tokenizer (a ``tokenizers.Tokenizer`` or a SentencePiece
        processor), built on first use: decoding never needs one."""
        if self._tokenizer is None:
            self._tokenizer = self.derived.make_tokenizer()
        return self._tokenizer

    @property
    def model(self) -> Any:
        """The float network for lockstep-v1 (transformers' LlamaForCausalLM holding the
        derived weights), built on first use."""
        if self._network is None:
            self._network = float_network(self.derived, self.dtype_name, self.device)
        return self._network

    def integer_model(self, length: int, engine: str = "int-v2") -> Any:
        """The integer form of this model for ``engine`` (int-v1 or int-v2) and segments
        up to ``length`` positions, derived once from the float32 weights (the rotary
        tables grow with ``length``; the engines share the weights)."""
        from llmarc.inference.integer import ATTENTION_LEVELS, IntegerModel

        if self._integer is None:
            if self.device.type == "cpu" and os.environ.get(CPU_ENGINE_SWITCH) != "torch":
                self._integer = IntegerModel(self.derived, length)
            else:
                from llmarc.inference.integer_torch import TorchIntegerModel

                self._integer = TorchIntegerModel(self.derived, length, self.device)
            return_freed_memory()
        elif self._integer.max_length < length:
            self._integer.extend(length)
        return self._integer.with_attention_levels(ATTENTION_LEVELS[engine])


def float_network(derived: DerivedModel, dtype_name: str, device: Any) -> Any:
    """transformers' LlamaForCausalLM with ``derived``'s weights (lockstep-v1 only)."""
    torch = _import_torch()
    transformers = _import_transformers()
    LlamaConfig, LlamaForCausalLM = transformers.LlamaConfig, transformers.LlamaForCausalLM
    arch = derived.architecture
    config = LlamaConfig(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size, num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads, head_dim=arch.head_dim,
        hidden_act=arch.hidden_act, rms_norm_eps=arch.rms_norm_eps,
        rope_theta=arch.rope_theta, rope_scaling=arch.rope_scaling,
        max_position_embeddings=arch.max_position_embeddings,
        attention_bias=arch.attention_bias, mlp_bias=arch.mlp_bias,
        tie_word_embeddings=arch.tie_word_embeddings)
    dtype = getattr(torch, dtype_name)
    network = LlamaForCausalLM(config).to(dtype)  # its own buffers (rotary) made here
    state = {name: torch.from_numpy(values).to(dtype) for name, values in derived.tensors()}
    missing = {name for name in network.load_state_dict(state, strict=False).missing_keys
               if not (name == "lm_head.weight" and arch.tie_word_embeddings)}
    if missing:
        raise ModelError(f"{derived.source.display_name}: the float network lacks "
                         f"{sorted(missing)[:3]}")
    if arch.tie_word_embeddings:
        network.tie_weights()
    return network.to(str(device)).eval()


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


def _import_torch(needed_by: str = "the lockstep-v1 engine",
                  extra: str = "llmarc[lockstep]") -> Any:
    """torch, for what ``needed_by`` names; a one-line ModelError where it is missing.
    Never reach for a hub, and keep the libraries' own progress bars and advice off
    llmarc's stderr (ours show the work)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    set_openmp_waiting()  # before torch loads its OpenMP runtime
    try:
        import torch
    except ImportError as exc:  # the lean install has no torch
        raise ModelError(f"{needed_by} needs PyTorch: pip install '{extra}'") from exc
    return torch


def pick_device(device: str) -> Device:
    """Parse ``auto|cpu|cuda[:N]`` into a :class:`Device`, with a clear error if
    unavailable.  torch is asked only about CUDA: for ``cuda``, and for ``auto`` where a
    GPU can be there at all (an NVIDIA driver on Linux; any torch elsewhere)."""
    if device == "auto":
        return Device("cuda") if _cuda_present() else Device("cpu")
    match = re.fullmatch(r"(cpu|cuda)(?::(\d{1,4}))?", device)
    if match is None or (match.group(1) == "cpu" and match.group(2) is not None):
        raise ModelError(f"invalid device {device!r} (use auto, cpu or cuda[:N])")
    if match.group(1) == "cpu":
        return Device("cpu")
    index = None if match.group(2) is None else int(match.group(2))
    torch = _import_torch("--device cuda", "llmarc[cuda]")
    if not torch.cuda.is_available():
        raise ModelError("device cuda requested but no CUDA GPU is available")
    if index is not None and index >= torch.cuda.device_count():
        raise ModelError(f"device {device} requested but there are "
                         f"{torch.cuda.device_count()} CUDA GPUs")
    return Device("cuda", index)


def _cuda_present() -> bool:
    """Whether ``auto`` finds a CUDA GPU: torch installed, a driver that can serve it,
    and torch seeing a device."""
    try:
        if importlib.util.find_spec("torch") is None:
            return False
    except (ImportError, ValueError):  # a finder that refuses it, a broken entry
        return False
    if sys.platform.startswith("linux") and not os.path.exists(NVIDIA_DRIVER):
        return False
    torch = _import_torch("--device cuda", "llmarc[cuda]")
    return bool(torch.cuda.is_available())


def configure_determinism(device: Device, threads: int) -> None:
    """Pin the knobs that select kernels: the thread count (the compiled kernels', and
    torch's where torch is loaded), TF32/reductions on CUDA."""
    from llmarc.inference.kernels import start_threading_layer
    from llmarc.inference.threads import set_thread_count

    start_threading_layer()  # first: starting it later would reset the count set here
    set_thread_count(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    if device.type == "cuda":
        torch = _import_torch("--device cuda", "llmarc[cuda]")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def _import_transformers() -> Any:
    """transformers, which lockstep-v1 alone needs (its float network, its recorded
    environment): a clear error where it is not installed."""
    try:
        import transformers
    except ImportError as exc:
        raise ModelError("the lockstep-v1 engine needs transformers: "
                         "pip install 'llmarc[lockstep]'") from exc
    return transformers


def environment_profile(device: Device) -> dict[str, Any]:
    """The parts of the numerics profile this machine imposes (they cannot be adopted)."""
    torch = _import_torch()
    transformers = _import_transformers()
    env: dict[str, Any] = {
        "device_type": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if device.type == "cpu":
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    else:
        env["device_name"] = torch.cuda.get_device_name(str(device))
        env["cuda"] = torch.version.cuda
    return env


def default_threads() -> int:
    """The thread count without ``--threads``: the CPUs this process may run on."""
    from llmarc.inference.threads import thread_count

    return thread_count()


def derive(source: ModelSource, status: Callable[[str], None] | None = None) -> DerivedModel:
    """The model ``source`` names, derived from its files by spec/model.md."""
    from llmarc.model.gguf_model import read_gguf
    from llmarc.model.hf_folder import read_hf_folder

    if status is not None:
        status(f"reading {source.display_name}")
    return read_gguf(source) if source.kind == "gguf" else read_hf_folder(source)


def load_model(
    model: str | os.PathLike[str] | None = None,
    *,
    device: str = "auto",
    dtype: str | None = None,
    threads: int | None = None,
    status: Callable[[str], None] | None = None,
    engine: str = "int-v2",
) -> LoadedModel:
    """Resolve, derive and fingerprint a model; never downloads anything.

    For int-v1/v2 the weights are read as float32 values and the integer model is
    derived from them on ``device``; ``dtype`` applies to lockstep-v1 only."""
    source = resolve(model)
    run_on = pick_device(device)
    if engine in INTEGER_ENGINES:
        if dtype not in (None, "float32"):
            raise ModelError(f"--dtype {dtype} applies to the lockstep-v1 engine only "
                             f"({engine} computes in integers)")
        dtype = "float32"
    dtype_name = dtype or ("bfloat16" if run_on.type == "cuda" else "float32")
    if dtype_name not in DTYPES:
        raise ModelError(f"unsupported dtype {dtype_name!r} (use {', '.join(DTYPES)})")
    if engine not in INTEGER_ENGINES:
        _import_torch()  # lockstep-v1: before the thread count is set (torch's too)
    thread_count = threads or default_threads()
    configure_determinism(run_on, thread_count)
    derived = derive(source, status)  # after every refusal that needs no model file
    if status is not None:
        what = engine if engine in INTEGER_ENGINES else f"{engine}, {dtype_name}"
        status(f"loading {source.display_name} ({what} on {run_on})")
    return LoadedModel(
        source=source,
        derived=derived,
        components=Components.of(derived),
        device=run_on,
        dtype_name=dtype_name,
        threads=thread_count,
        environment=environment_profile(run_on) if engine not in INTEGER_ENGINES
        else {},
    )
