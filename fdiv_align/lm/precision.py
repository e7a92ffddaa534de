"""Hardware-chosen compute plan: the precision of the transformer body and output head, and
whether ``torch.compile`` is used — decided once per run, with the reason.

``trainer.precision``:

* ``auto`` (default): bf16 autocast for the body and bf16 head GEMMs with fp32 logits (the "fast
  path", :mod:`fdiv_align.kernels.low_precision_head`) only where the device runs bf16 products
  natively — CUDA GPUs that support bf16, CPUs with AVX-512 BF16 or AMX *and* a measured bf16 GEMM
  faster than fp32 — fp32 everywhere else. On a CPU with only AVX2 torch runs bf16 products in a
  generic fallback 3–60× slower than fp32, so bf16 there would be a slow path, not a fast one.
* ``fp32``: fp32 everywhere. ``bf16``: the bf16 path, whatever the hardware.

The CPU measurement (:func:`bf16_speedup`) times one GEMM of a decoding/scoring shape in fp32 and
bf16 (≤ 1 s) and is cached per machine (CPU model, flags, torch version, threads) in
``$FDIV_ALIGN_CACHE/probes/``. Log-space math, the estimators and the master weights are fp32/fp64
on every path.

``trainer.compile`` (null = auto): the fused log-prob kernels' elementwise passes are compiled with
``torch.compile`` only where inductor can build them — a working C++ compiler on the CPU, triton on
CUDA; otherwise they run eagerly (same values), and the plan says why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import Precision
from ..files import atomic_write_text

__all__ = ["ComputePlan", "PLAIN", "compute_plan", "choose_precision", "choose_compile", "cpu_name",
           "cpu_bf16_features", "bf16_speedup", "BF16_MIN_SPEEDUP"]

#: auto picks bf16 on a CPU only when its bf16 GEMM is at least this much faster than fp32
BF16_MIN_SPEEDUP = 1.3
#: the probe's GEMM: [M, K] @ [K, N], SmolLM2's MLP up-projection over a scoring batch
PROBE_SHAPE = (256, 576, 1536)
PROBE_BUDGET_S = 1.0


@dataclass(frozen=True)
class ComputePlan:
    """How log-probabilities are computed — the one object every path follows (sampling, scoring, the
    surrogate's fused kernel, the LoRA fast path, the TRL integration), decided once per run.

    ``precision``: the transformer body's compute (``bf16``: autocast, :attr:`autocast_dtype`); the output
    head's GEMMs follow it unless ``fp32_head`` (:attr:`head_dtype`; the logits are fp32 either way, see
    :func:`fdiv_align.lm.logprobs.head_logits`); ``fused``: the fused lm_head → log-prob kernel for scoring
    and the surrogate (:mod:`fdiv_align.kernels`), else the plain head + log-softmax; ``kernel``: which fused
    kernel — ``torch`` (:mod:`fdiv_align.kernels.token_logprobs`: BLAS matmuls and compiled chunk math, tuned for
    a CPU's caches) or ``triton`` (:mod:`fdiv_align.kernels.triton_logprobs`: on CUDA, when triton imports);
    ``compile``: the torch kernel's elementwise passes through torch.compile (False: eager, same values)."""

    precision: str  # "fp32" | "bf16" (resolved)
    precision_reason: str
    compile: bool
    compile_reason: str
    device: str
    fp32_head: bool = False
    fused: bool = True
    kernel: str = "torch"  # "torch" | "triton": see choose_kernel
    #: the sampler's decoding (fdiv_align/lm/sampling.py, _decode_loop): "dynamic" (a KV cache grown each step),
    #: "static" (preallocated; same shapes every step) or "captured" (static, each step replayed as a CUDA graph)
    decode: str = "dynamic"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """Compute dtype of the transformer body (None = fp32, no autocast)."""
        return torch.bfloat16 if self.precision == "bf16" else None

    @property
    def head_dtype(self) -> torch.dtype | None:
        """GEMM dtype of the output head (None = fp32); fp32 logits either way."""
        return None if self.fp32_head else self.autocast_dtype

    def autocast(self, device_type: str):
        """The body's autocast context on ``device_type`` (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        return (f"precision {self.precision} on {self.device} ({self.precision_reason}); "
                f"torch.compile {'on' if self.compile else 'off'} ({self.compile_reason})"
                + (f"; fused log-prob kernel: {self.kernel}" if self.fused else ""))

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_flags() -> set[str] | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_bf16_features() -> list[str] | None:
    """Native bf16 instruction sets of this CPU (``avx512_bf16``, ``amx_bf16``); None when the flags
    cannot be read (not Linux) — then only the measurement decides."""
    flags = _cpu_flags()
    if flags is None:
        return None
    return sorted(flags & {"avx512_bf16", "amx_bf16"})


def _probe_path() -> Path:
    from .models import cache_dir

    flags = _cpu_flags()
    key = json.dumps([cpu_name(), sorted(flags or []), torch.__version__, torch.get_num_threads(), PROBE_SHAPE])
    return cache_dir() / "probes" / f"bf16-gemm-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _time_gemm(a: torch.Tensor, b: torch.Tensor, deadline: float) -> float:
    """Median seconds of a @ b over up to 5 timed calls (after one warm-up), stopping at ``deadline``."""
    torch.mm(a, b)
    times = []
    while len(times) < 5 and (not times or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bf16_speedup(use_cache: bool = True) -> float:
    """fp32 time / bf16 time of one CPU GEMM of :data:`PROBE_SHAPE` (> 1: bf16 faster). Measured in
    ≤ ~1 s and cached per machine; a fallback bf16 kernel (AVX2) measures ≪ 1."""
    path = _probe_path()
    if use_cache and path.exists():
        try:
            return float(json.loads(path.read_text())["speedup"])
        except (OSError, ValueError, KeyError):
            pass
    M, K, N = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)
    start = time.perf_counter()
    t32 = _time_gemm(a, b, start + PROBE_BUDGET_S / 4)
    t16 = _time_gemm(a.bfloat16(), b.bfloat16(), start + PROBE_BUDGET_S)
    speedup = t32 / t16
    if use_cache:
        atomic_write_text(path, json.dumps({"speedup": speedup, "fp32_s": t32, "bf16_s": t16, "cpu": cpu_name(),
                                            "torch": torch.__version__, "threads": torch.get_num_threads()}))
    return speedup


def choose_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """(``fp32`` | ``bf16``, reason) for ``trainer.precision`` = ``requested`` on ``device``."""
    if requested not in set(Precision):
        raise ValueError(f"trainer.precision must be one of {', '.join(Precision)}, got {requested!r}")
    if requested != "auto":
        return requested, f"trainer.precision={requested}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16"
        return "fp32", f"auto: {torch.cuda.get_device_name(device)} has no bf16 support"
    if device.type != "cpu":
        return "fp32", f"auto: {device.type} is not a device with a known fast bf16 path"
    name = cpu_name()
    features = cpu_bf16_features()
    if features == []:
        return "fp32", f"auto: {name} has no AVX-512 BF16/AMX, bf16 products would run in a slow fallback"
    speedup = bf16_speedup()
    has = ", ".join(features) if features else "flags unknown"
    if speedup >= BF16_MIN_SPEEDUP:
        return "bf16", f"auto: {name} ({has}) measured bf16 GEMM {speedup:.2f}x fp32"
    return "fp32", f"auto: {name} ({has}) measured bf16 GEMM only {speedup:.2f}x fp32 (< {BF16_MIN_SPEEDUP}x)"


def _cxx_compiler() -> str | None:
    """The C++ compiler inductor would use on the CPU, or None when there is none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # noqa: BLE001 - InvalidCxxCompiler and friends: no usable compiler
        return None


def choose_compile(requested: bool | None, device: torch.device) -> tuple[bool, str]:
    """(compile the kernels?, reason) for ``trainer.compile`` = ``requested`` (None = auto)."""
    if requested is not None and not isinstance(requested, bool):
        raise ValueError(f"trainer.compile must be true, false or null (auto), got {requested!r}")
    if requested is False:
        return False, "trainer.compile=false"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        ok, why = has_triton(), "triton is available" if has_triton() else "triton is not installed"
    else:
        cxx = _cxx_compiler()
        ok, why = cxx is not None, (f"C++ compiler {cxx}" if cxx else "no working C++ compiler (install g++ or set CXX)")
    if requested is True and not ok:
        raise RuntimeError(f"trainer.compile=true but torch.compile cannot build kernels here: {why}; "
                           "set trainer.compile=null (auto) or false to run the kernels eagerly")
    return ok, ("trainer.compile=true; " if requested else "auto: ") + why


def choose_kernel(device: torch.device) -> str:
    """The fused log-prob kernel for ``device``: ``triton`` on CUDA (where CUDA builds of torch bring triton), the
    torch kernel elsewhere — the CPU's, tuned for its caches. On CUDA without triton the torch kernel runs there
    too (its matmuls are cuBLAS)."""
    if device.type != "cuda":
        return "torch"
    from torch.utils._triton import has_triton

    return "triton" if has_triton() else "torch"


def choose_decode(requested: str | None, device: torch.device, compile: bool) -> str:
    """The sampler's decoding for ``trainer.decode`` = ``requested`` (None = auto: ``static`` on CUDA, ``dynamic``
    on the CPU, where a static cache's full-length attention costs more than it saves)."""
    if requested is None:
        return "static" if device.type == "cuda" else "dynamic"
    if requested == "captured" and not (device.type == "cuda" and compile):
        raise ValueError(f"trainer.decode=captured replays decoding steps as CUDA graphs: it needs a CUDA device and "
                         f"torch.compile (here: device {device}, compile {'on' if compile else 'off'}); use static or dynamic")
    return str(requested)


def compute_plan(precision: str, compile: bool | None, device: torch.device, fp32_head: bool = False,
                 fused: bool = True, decode: str | None = None) -> ComputePlan:
    """The run's :class:`ComputePlan` for ``trainer.precision``, ``trainer.compile``, ``trainer.fp32_head``,
    ``trainer.fused_logprobs`` and ``trainer.decode`` on ``device``."""
    chosen, why = choose_precision(precision, device)
    do_compile, compile_why = choose_compile(compile, device)
    where = cpu_name() if device.type == "cpu" else str(device)
    return ComputePlan(chosen, why, do_compile, compile_why, where, fp32_head, fused, choose_kernel(device),
                       choose_decode(decode, device, do_compile))


#: the plain fp32 path: no autocast, fp32 head GEMMs, unfused scoring — the default of sample/score
PLAIN = ComputePlan("fp32", "the plain path", False, "unfused: nothing to compile", "any", fp32_head=True, fused=False)
