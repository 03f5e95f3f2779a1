"""The C++ CPU kernels (``csrc/*.cpp``): built on first use, cached, optional.

``csrc/paged_attention.cpp`` (paged decode attention, the KV write),
``csrc/elementwise.cpp`` (RMSNorm, the fused residual add + RMSNorm, SiLU-and-mul,
rotary + KV write) and ``csrc/gemv.cpp`` (the linear layer of a few rows) are
compiled together by ``torch.utils.cpp_extension`` with ``-O3 -march=native`` the
first time an op needs them (4 s here, 10-20 s on a slow 2-core machine; the engine
calls :func:`load` at start-up so no request waits on it), and
the build is cached across processes under torch's extension directory, keyed by the
sources, the flags, torch, Python, the CPU, the source folder and the venv. They include only torch's stable C ABI
headers, which parse in seconds.

When they cannot be built (no compiler, a failed build) one warning says why and every
op takes its torch path; ``PATCHBAY_NO_CPP_KERNELS=1`` forces the torch paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import torch

log = logging.getLogger("patchbay.kernels")

_CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (_CSRC / "paged_attention.cpp", _CSRC / "elementwise.cpp", _CSRC / "gemv.cpp",
           _CSRC / "dense_attention.cpp")
HEADERS = (_CSRC / "vec.h", _CSRC / "helper.h")
OPS = ("paged_decode", "write_kv", "rms_norm", "add_rms_norm", "silu_and_mul", "rope_qkv", "linear_small",
       "set_gemv_helper", "dense_decode", "cross_decode")
_CXX_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-Wno-psabi"]
_lock = threading.Lock()
_state: dict = {}  # "ops": the ops, or None once loading failed; "error": why
_warned: set[str] = set()


def warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("the torch path instead of the C++ kernels: %s", reason)


def enabled() -> bool:
    """False when ``PATCHBAY_NO_CPP_KERNELS`` asks for the torch paths."""
    return os.environ.get("PATCHBAY_NO_CPP_KERNELS", "") in ("", "0")


def ops_for(*tensors: torch.Tensor):
    """The ops if they may serve ``tensors`` (CPU, one dtype, float32 or bfloat16), else None."""
    if not enabled():
        return None
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.bfloat16):
        return None
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != dtype:
            return None
    return load()


def allow_helper_thread(allowed: bool) -> None:
    """Let ``linear_small`` share its rows with one helper thread of its own while torch runs on
    one thread (the engine's small decode steps; see ``csrc/gemv.cpp``). For a process that may
    use two cores or more (never allowed where this process may run on one core only: the
    helper would take turns with the caller there); off by default."""
    if allowed and hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) < 2:
        allowed = False
    ops = load() if enabled() else None
    if ops is not None:
        ops.set_gemv_helper(allowed)


def error() -> str | None:
    """Why the C++ kernels are unavailable (building them first if not tried yet), or None."""
    load()
    return _state.get("error")


def load():
    """The ops (``torch.ops.patchbay`` overloads, named as :data:`OPS`), compiled on the first
    call; None, with one warning, if they cannot be built or loaded. Thread-safe."""
    if "ops" not in _state:
        with _lock:
            if "ops" not in _state:
                ops = None
                try:
                    ops = _build()
                except Exception as e:  # noqa: BLE001 - whatever failed, the torch paths work
                    reason = f"{type(e).__name__}: {e}".strip()
                    _state["error"] = reason
                    warn_once("cannot build them: " + (reason if len(reason) < 3000 else "..." + reason[-3000:]))
                _state["ops"] = ops
    return _state["ops"]


def _cpu_id() -> str:
    """What ``-march=native`` depends on: a build cache copied to another CPU must not be reused."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    return platform.processor() or platform.machine()


def _build():
    from torch.utils import cpp_extension

    texts = [p.read_text() for p in (*SOURCES, *HEADERS)]
    # the build files hold absolute paths (the sources, torch's headers in the venv): key on them too, so two
    # checkouts or venvs keep their own builds instead of rebuilding each other's in turn
    where = [str(_CSRC.resolve()), sys.prefix]
    key = hashlib.sha256("\0".join([*texts, torch.__version__, sys.version, *_CXX_FLAGS, _cpu_id(), *where]).encode())
    name = f"patchbay_kernels_{key.hexdigest()[:16]}"  # a changed source, flag, torch, CPU or place: a new build
    build_dir = cpp_extension._get_build_directory(name, verbose=False)
    path = os.environ["PATH"]
    if shutil.which("ninja") is None:  # the ninja wheel's binary sits next to python in an unactivated venv
        with contextlib.suppress(ImportError):
            import ninja

            path = os.pathsep.join([ninja.BIN_DIR, path])
        path = os.pathsep.join([os.path.dirname(sys.executable), path])
    # torch's own build lock is a file that a killed build leaves behind, and every later
    # build would wait on it forever; an flock dies with its process: under it, that file is stale.
    with open(os.path.join(build_dir, "patchbay.flock"), "w") as lock_file:
        if _flock(lock_file):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(build_dir, "lock"))
        old_path, os.environ["PATH"] = os.environ["PATH"], path
        try:
            cpp_extension.load(name=name, sources=[str(p) for p in SOURCES], extra_cflags=_CXX_FLAGS,
                               extra_include_paths=[str(_CSRC)], build_directory=build_dir,
                               is_python_module=False, verbose=False)
        finally:
            os.environ["PATH"] = old_path
    ns = torch.ops.patchbay
    return SimpleNamespace(**{op: getattr(ns, op).default for op in OPS})


def _flock(f) -> bool:
    """Lock ``f`` until it is closed (or this process dies); False where that is not possible."""
    try:
        import fcntl

        fcntl.flock(f, fcntl.LOCK_EX)
    except (ImportError, OSError):
        return False
    return True
