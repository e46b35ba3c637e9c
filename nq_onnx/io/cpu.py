"""The CPU features that decide which integer kernel onnxruntime's CPU provider runs.

onnxruntime (MLAS) multiplies uint8 activations by int8 weights ("U8S8") with ``vpmaddubsw`` on x86 CPUs
that have AVX2 or AVX-512 but no VNNI: it adds two neighbouring ``u8 * s8`` products into a *saturating*
int16, so full-range codes can overflow (``255 * 127 * 2 = 64770 > 32767``). With AVX-VNNI, AVX-512 VNNI or
AMX the products accumulate in int32 (``vpdpbusd``, ``tdpbusd``), and uint8 x uint8 ("U8U8") widens to int16
before ``vpmaddwd`` on every x86 path: both exact. ARM64 kernels widen or use dot products into int32.

Figures are meaningless without the CPU they came from: benchmarks and ``nq-onnx inspect`` record
:func:`cpu_features`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
from collections.abc import Callable
from pathlib import Path

# OpenBLAS core names (``OPENBLAS_CORETYPE``) whose kernels use AVX-512
OPENBLAS_AVX512_CORES = ("skylakex", "cooperlake", "sapphirerapids")

# Linux /proc/cpuinfo flag names of the features that matter for the integer kernels
X86_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
ARM_FLAGS = ("asimd", "asimddp", "i8mm")


@dataclasses.dataclass(frozen=True)
class CpuFeatures:
    machine: str  # platform.machine(): x86_64, AMD64, aarch64, arm64 ...
    model: str  # the CPU's model name, where the OS tells it
    flags: tuple[str, ...]  # the integer-kernel features present, from X86_FLAGS / ARM_FLAGS
    source: str  # where the flags were read: "/proc/cpuinfo", "numpy", or "unknown"

    @property
    def x86(self) -> bool:
        return self.machine.lower() in ("x86_64", "amd64", "i686", "i386")

    @property
    def vnni(self) -> bool:
        """An int32-accumulating u8 x s8 instruction: AVX-VNNI, AVX-512 VNNI or AMX."""
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(self.flags))

    @property
    def u8s8_saturates(self) -> bool | None:
        """Whether onnxruntime's u8 x s8 kernels saturate 16-bit pair sums here (``None``: flags unknown)."""
        if not self.x86:
            return False
        if self.source == "unknown":
            return None
        return not self.vnni

    @property
    def kind(self) -> str:
        """A short label for tables: which integer-kernel path this CPU takes."""
        if not self.x86:
            return f"{self.machine} ({'+'.join(self.flags) or 'no dot product'})"
        if "amx_int8" in self.flags:
            return "x86 AMX"
        if "avx512_vnni" in self.flags:
            return "x86 AVX-512 VNNI"
        if "avx_vnni" in self.flags:
            return "x86 AVX-VNNI"
        if "avx512bw" in self.flags:
            return "x86 AVX-512 without VNNI"
        if "avx2" in self.flags:
            return "x86 AVX2 without VNNI"
        return "x86 (flags unknown)" if self.source == "unknown" else "x86 SSE"

    def to_dict(self) -> dict:
        return {"machine": self.machine, "model": self.model, "flags": list(self.flags), "source": self.source,
                "kind": self.kind, "vnni": self.vnni, "u8s8_saturates": self.u8s8_saturates}


def cpu_features(cpuinfo: str | Path = "/proc/cpuinfo") -> CpuFeatures:
    """The features of the CPU this process runs on (Linux: ``/proc/cpuinfo``; elsewhere numpy's detection)."""
    machine = platform.machine() or "unknown"
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return _from_numpy(machine)
    return parse_cpuinfo(text, machine)


def parse_cpuinfo(text: str, machine: str) -> CpuFeatures:
    """Features from the first processor's entry of a Linux ``/proc/cpuinfo``."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    present = set((fields.get("flags") or fields.get("features") or "").split())
    known = X86_FLAGS + ARM_FLAGS
    model = fields.get("model name") or fields.get("cpu model") or fields.get("hardware") or ""
    if not present:
        return _from_numpy(machine, model)
    return CpuFeatures(machine, model, tuple(f for f in known if f in present), "/proc/cpuinfo")


def _from_numpy(machine: str, model: str = "") -> CpuFeatures:
    """numpy's runtime dispatch detection (macOS, Windows): it knows AVX2/AVX-512 VNNI/ARM dot product, not
    AVX-VNNI or AMX, so a CPU with only those reads as saturating, the safe side."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as detected
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as detected
        except ImportError:
            return CpuFeatures(machine, model or platform.processor(), (), "unknown")
    names = {"avx2": "AVX2", "avx512f": "AVX512F", "avx512bw": "AVX512BW", "avx512_vnni": "AVX512_VNNI",
             "asimd": "ASIMD", "asimddp": "ASIMDDP"}
    alt = {"avx512_vnni": "AVX512VNNI"}
    flags = tuple(f for f, key in names.items() if detected.get(key) or detected.get(alt.get(f, "")))
    return CpuFeatures(machine, model or platform.processor(), flags, "numpy")


def pinned_blas(features: CpuFeatures, environ=os.environ) -> str | None:
    """The ``OPENBLAS_CORETYPE`` that pins numpy's OpenBLAS to kernels without AVX-512 on a CPU with AVX-512, or
    ``None``. The searches are numpy GEMMs: on the real ViT-S/14 (AMD EPYC, AVX-512) the linear-layer search ran
    1.6x slower with ``Haswell`` pinned than with OpenBLAS's own choice (README, Compile cost). Some platforms
    set the variable because older OpenBLAS builds misdetect or crash on newer CPUs, so it is reported, not
    changed."""
    core = environ.get("OPENBLAS_CORETYPE", "").strip()
    if not core or core.lower() in OPENBLAS_AVX512_CORES or "avx512f" not in features.flags:
        return None
    try:
        import numpy as np

        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    except Exception:  # numpy's build record is informational; an old numpy has no dict mode
        return None
    return core if "openblas" in str(blas).lower() else None


def one_blas_thread(function: Callable) -> Callable:
    """``function`` run with numpy's BLAS on one thread (threadpoolctl), whatever the machine's cores and the
    ``*_NUM_THREADS`` variables: a GEMM split over another number of threads can sum in another order, and a
    search's choice between two near-equal candidates can follow the last bit of a sum. So the bytes a conversion
    writes depend on the model, the data, the seed, the CPU kind and the BLAS kernels, not on the thread count.
    onnxruntime's own threads (calibration, evaluation) are not limited."""
    @functools.wraps(function)
    def pinned(*args, **kwargs):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            return function(*args, **kwargs)

    return pinned


def blas_record(environ=os.environ) -> dict:
    """numpy's BLAS and the kernels it runs (threadpoolctl), and the OpenBLAS settings in the environment: the
    searches are float GEMMs, so their speed and the last bits of their sums depend on the kernel (a machine that
    sets ``OPENBLAS_CORETYPE`` runs that core's kernels whatever its CPU). ``num_threads`` is the process's own
    setting; the searches run on one (:func:`one_blas_thread`)."""
    from threadpoolctl import threadpool_info

    env = {k: environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS") if k in environ}
    info = numpy_blas(threadpool_info())
    return {k: info.get(k) for k in ("internal_api", "version", "architecture", "num_threads")} | {"env": env}


def numpy_blas(libraries: list[dict]) -> dict:
    """numpy's own BLAS among the libraries threadpoolctl lists (``threadpool_info()``): the one inside numpy's
    install (a wheel's ``numpy.libs`` or ``numpy/.dylibs``), else the first BLAS. Other packages load BLAS libraries
    of their own (OpenCV an OpenBLAS that names this CPU's kernels differently), in an order that depends on what was
    imported first."""
    import numpy

    home = Path(numpy.__file__).resolve().parent
    blas = [i for i in libraries if i.get("user_api") == "blas"]
    folders = (home.parent / "numpy.libs", home / ".dylibs", home)  # Linux and Windows wheels, macOS wheels, builds
    own = [i for i in blas if Path(i.get("filepath", "")).resolve().parent in folders]
    return (own or blas or [{}])[0]
