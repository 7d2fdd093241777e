"""Load a located model for the LLM codec: derived model, fingerprint, engines, tokenizer.

The path is straight: :func:`~llmarc.model.sources.resolve` finds the files, a reader
(:func:`~llmarc.model.hf_folder.read_hf_folder` or :func:`~llmarc.model.gguf_model.read_gguf`)
derives the model as spec/model.md defines it, :class:`~llmarc.model.fingerprint.Components`
identify it, and the engines are built from it on demand: the integer model from its
weights one tensor at a time, the lockstep-v1 float network (the one use of transformers)
only for that engine, the encoder's tokenizer only when something is encoded.

Device and dtype policy: ``auto`` is CUDA when present, else CPU; the default dtype is
float32 on CPU and bfloat16 on CUDA (lockstep-v1 only).  On CUDA we switch off TF32 and
reduced-precision reductions and ask for deterministic algorithms, because cuBLAS may
otherwise pick differently-accumulating kernels from run to run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmarc.errors import ModelError
from llmarc.model.architecture import Architecture
from llmarc.model.derived import DerivedModel
from llmarc.model.fingerprint import Components, legacy_fingerprints
from llmarc.model.sources import ModelSource, resolve

DTYPES = ("float32", "bfloat16", "float16")
INTEGER_ENGINES = ("int-v1", "int-v2")


@dataclass
class LoadedModel:
    """Everything the LLM codec needs from a model, ready to run."""

    source: ModelSource
    derived: DerivedModel
    components: Components
    device: Any  # torch.device
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
            self._integer = IntegerModel(self.derived, length, device=self.device)
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
    return network.to(device).eval()


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
    set_openmp_waiting()
    try:
        import torch
    except ImportError as exc:  # the base install has no ML stack
        raise ModelError(
            "the LLM codec needs PyTorch: pip install torch==2.13.0 'llmarc[llm]'"
        ) from exc
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
    from llmarc.inference.kernels import start_threading_layer

    torch = _import_torch()
    start_threading_layer()  # first: starting it later would reset the count set here
    torch.set_num_threads(threads)
    if device.type == "cuda":
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


def environment_profile(device: Any) -> dict[str, Any]:
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
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


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
    torch = _import_torch()
    torch_device = pick_device(device)
    if engine in INTEGER_ENGINES:
        if dtype not in (None, "float32"):
            raise ModelError(f"--dtype {dtype} applies to the lockstep-v1 engine only "
                             f"({engine} computes in integers)")
        dtype = "float32"
    dtype_name = dtype or ("bfloat16" if torch_device.type == "cuda" else "float32")
    if dtype_name not in DTYPES:
        raise ModelError(f"unsupported dtype {dtype_name!r} (use {', '.join(DTYPES)})")
    thread_count = threads or torch.get_num_threads()
    configure_determinism(torch_device, thread_count)
    derived = derive(source, status)  # after every refusal that needs no model file
    if status is not None:
        what = engine if engine in INTEGER_ENGINES else f"{engine}, {dtype_name}"
        status(f"loading {source.display_name} ({what} on {torch_device})")
    return LoadedModel(
        source=source,
        derived=derived,
        components=Components.of(derived),
        device=torch_device,
        dtype_name=dtype_name,
        threads=thread_count,
        environment=environment_profile(torch_device) if engine not in INTEGER_ENGINES
        else {},
    )
