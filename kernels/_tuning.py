"""The fused kernels' machine-dependent choices: defaults per instruction set, and a tuned file.

The block sizes of the fused attention kernels, the shapes from which they transpose the key
and value tiles, and the work split depend on the machine: its vector width, its caches and the
BLAS kernel it runs (OpenBLAS's Haswell kernels reach about 50 GFLOP/s per core on a 64^3
sgemm and 72 from 128 up; its SkylakeX kernels have a fast path for small products). So:

* :data:`DEFAULTS` holds one setting per instruction set (``"avx512"``, ``"avx2"``,
  ``"other"``), each measured on a machine of that kind; :func:`defaults` picks one, and on
  AVX-512 with OpenBLAS on narrower kernels sends every tile product to the own micro-kernel;
* ``fastattn tune`` (:func:`fastattn.tune`) measures the choices on this machine within a time
  budget and stores the winners in a per-user file (``$XDG_CACHE_HOME/fastattn/tuning.json``,
  or ``FASTATTN_TUNE_FILE``), keyed by the CPU, the instruction set the kernels are compiled
  for, the BLAS kernel and the versions of numba, numpy and the BLAS;
* :func:`current` returns the setting in force: the file's when it fits this machine, else the
  defaults. A corrupt file, or one tuned elsewhere, is ignored with a warning;
  ``FASTATTN_TUNE=off`` ignores the file altogether.

A setting only changes the block sizes, the work split and what multiplies the tiles and the
unfused kernels' per-batch-entry products (BLAS or the kernels' own micro-kernel,
``kernels._micro``); for a given setting, results do not depend on the thread count.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import asdict, dataclass, fields, replace

from ._atomic import atomic_open

FORMAT = 3  # 2: kt_dim joined the setting; 3: own_dim


@dataclass(frozen=True)
class Setting:
    """One machine's choices for the fused kernels (all ints, so a file can hold them)."""

    block_q: int  # query rows per tile, without causal
    block_k: int  # key rows per tile, without causal
    causal_block_small: int  # square causal tiles when max(Tq, Tk) <= 256
    causal_block: int  # square causal tiles above that
    kt_rows: int  # from this many query rows per tile on, transpose the K and V tiles
    kt_dim: int  # and, in the backward, whatever the rows at head dims up to this (0: never)
    serial_flops: int  # below this much work, one thread (handing out costs more)
    min_units: int  # work units wanted per call, so a few threads share it evenly
    own_dim: int  # heads up to this wide: tile products (fused) and products (unfused) by
    # the own micro-kernel (_micro)

    def check(self) -> Setting:
        """Return self when every value is in its sane range, else raise ValueError."""
        for f in fields(self):
            v = getattr(self, f.name)
            if type(v) is not int:
                raise ValueError(f"{f.name} must be an int, got {v!r}")
        for name in ("block_q", "block_k", "causal_block_small", "causal_block"):
            v = getattr(self, name)
            if not 8 <= v <= 1024:
                raise ValueError(f"{name} must be in [8, 1024], got {v}")
        if not 1 <= self.kt_rows <= 1 << 30:
            raise ValueError(f"kt_rows must be in [1, 2**30], got {self.kt_rows}")
        if not 0 <= self.kt_dim <= 1024:
            raise ValueError(f"kt_dim must be in [0, 1024], got {self.kt_dim}")
        if not 0 <= self.serial_flops <= 10**12:
            raise ValueError(f"serial_flops must be in [0, 1e12], got {self.serial_flops}")
        if not 1 <= self.min_units <= 1024:
            raise ValueError(f"min_units must be in [1, 1024], got {self.min_units}")
        if not 0 <= self.own_dim <= 1024:
            raise ValueError(f"own_dim must be in [0, 1024], got {self.own_dim}")
        return self


#: Never transpose the key and value tiles (a ``kt_rows`` no tile reaches).
NEVER = 1 << 30

#: Defaults per instruction set, from ``fastattn tune`` on a 2-core AMD EPYC (Zen 4): natively
#: (AVX-512, OpenBLAS SkylakeX kernels) no candidate beat 128x64 tiles with transposed key
#: tiles; with NUMBA_CPU_NAME=haswell and OPENBLAS_CORETYPE=Haswell (the AVX2 code paths of
#: Numba and OpenBLAS, whose small products are slower) 256x128 tiles without the transposes
#: took 0.93 of the time of 128x128 ones, and causal 64/128 tiles 0.92 of 32/64 ones. At head
#: dims 16 and 32, the backward with transposed tiles took 0.71-0.93 of the time without them
#: natively (1 to 29 query rows), 0.94-1.15 on the AVX2 paths: kt_dim 32 and 0. The kernels'
#: own tile products (kernels._micro) took 0.88 of the time of BLAS's on the AVX2 paths
#: (geometric mean over T = 29, 128 and 2048) and 1.1-1.4 natively at head dims 32 and 64,
#: where OpenBLAS has a fast path for small products; natively at the default model's heads
#: (16 wide), a training step took 0.97-0.98 of its time with BLAS's (three alternations):
#: own_dim 1024 and 16. With them, causal 64/64 tiles took 0.92 of 64/128 ones on AVX2.
#: (Those AVX2-path runs named the CPU only: Numba's code still had the host's AVX-512
#: features, which NUMBA_CPU_FEATURES=+avx2,+fma takes away; see target().) Where the kernels
#: are AVX-512 code but OpenBLAS runs narrower kernels (OPENBLAS_CORETYPE=Haswell, or a CPU it
#: does not know), every tile product goes to the own micro-kernel: see defaults().
DEFAULTS = {
    "avx512": Setting(block_q=128, block_k=64, causal_block_small=32, causal_block=64,
                      kt_rows=64, kt_dim=32, serial_flops=4_000_000, min_units=8,
                      own_dim=16),
    "avx2": Setting(block_q=256, block_k=128, causal_block_small=64, causal_block=64,
                    kt_rows=NEVER, kt_dim=0, serial_flops=4_000_000, min_units=8,
                    own_dim=1024),
    "other": Setting(block_q=128, block_k=128, causal_block_small=64, causal_block=128,
                     kt_rows=NEVER, kt_dim=0, serial_flops=4_000_000, min_units=8,
                     own_dim=0),
}

_AVX512_CPUS = ("skylake-avx512", "cascadelake", "cooperlake", "cannonlake", "icelake",
                "tigerlake", "rocketlake", "sapphirerapids", "emeraldrapids", "graniterapids",
                "znver4", "znver5", "knl", "knm", "x86-64-v4")
_AVX2_CPUS = ("haswell", "broadwell", "skylake", "alderlake", "raptorlake", "meteorlake",
              "arrowlake", "lunarlake", "gracemont", "znver1", "znver2", "znver3", "bdver4",
              "x86-64-v3")


#: OpenBLAS's AVX-512 kernels, by the core names it reports (lower case); every other core of
#: its x86-64 builds (Haswell, Zen, Sandybridge, ...) uses 32-byte vectors or narrower
_AVX512_BLAS_KERNELS = frozenset({"skylakex", "cooperlake", "sapphirerapids"})


def defaults(t: dict) -> tuple[Setting, str]:
    """The default setting for what the kernels run on (``t``: :func:`target`'s dict) and
    how :func:`current` names it.

    The instruction set of the kernels picks :data:`DEFAULTS`' entry. One case is the BLAS's:
    AVX-512 kernels with OpenBLAS on narrower kernels (the variable
    ``OPENBLAS_CORETYPE=Haswell``, or a CPU newer than the OpenBLAS). The own micro-kernel then
    has twice BLAS's vector width, and every tile product goes to it (``own_dim`` 1024): on a
    2-core AMD EPYC (Zen 5) with OpenBLAS's Haswell kernels, the attention suite's fused
    forward plus backward (heads 64 wide) took about half the time of the AVX-512 defaults'
    (0.46-0.59 in float32, T = 29 to 2048, 0.49-0.59 in float64).
    """
    isa = t["isa"]
    kernel = str(t.get("blas_kernel", "unknown"))
    if (isa == "avx512" and t.get("blas") == "openblas"
            and kernel.lower() not in _AVX512_BLAS_KERNELS):
        return (replace(DEFAULTS[isa], own_dim=1024),
                f"defaults for {isa}, all tile products by the own micro-kernel (BLAS runs its "
                f"{kernel} kernels)")
    return DEFAULTS[isa], f"defaults for {isa}"


def _isa_of(cpu: str, features: set[str]) -> str:
    if cpu.startswith(_AVX512_CPUS) or "avx512f" in features:
        return "avx512"
    if cpu.startswith(_AVX2_CPUS) or {"avx2", "fma"} <= features:
        return "avx2"
    return "other"


def target() -> dict:
    """What the kernels run on: the host CPU, the CPU Numba compiles for (NUMBA_CPU_NAME, else
    the host), the instruction set of the code it makes, and the kernel of the BLAS that Numba
    calls.

    Numba compiles with the features in NUMBA_CPU_FEATURES, else with the host's, whatever
    CPU it is named: on an AVX-512 host, NUMBA_CPU_NAME=haswell alone still makes AVX-512
    code (LLVM then vectorises with 512-bit registers). AVX2 code takes
    NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=+avx2,+fma (the CPU's own features, plus these).
    """
    host, name, isa = _compile_target()
    return {"host_cpu": host, "cpu": name, "isa": isa, **_blas()}


def compiled_isa() -> str:
    """The instruction set of the code Numba makes (its CPU and features, as in target()):
    "avx512", "avx2" or "other"."""
    return _compile_target()[2]


def _compile_target() -> tuple[str, str, str]:
    """(host CPU, the CPU Numba compiles for, the instruction set of the code it makes)."""
    import llvmlite.binding as llvm
    import numba

    host = llvm.get_host_cpu_name()
    name = numba.config.CPU_NAME or host
    if name == "host":
        name = host
    if numba.config.CPU_FEATURES is None:  # Numba's rule: the host's features, any CPU name
        feats = {k for k, on in llvm.get_host_cpu_features().items() if on}
    else:  # the named CPU's own features (its family decides), with these added or removed
        feats = set()
        for f in numba.config.CPU_FEATURES.split(","):
            if f[1:] and f[0] in "+-":
                (feats.add if f[0] == "+" else feats.discard)(f[1:])
    return host, name, _isa_of(name, feats)


def _blas() -> dict:
    """The BLAS that Numba's tile products call (SciPy's): library, kernel, version."""
    from ._blas import pools

    libs = pools()
    if not libs:
        return {"blas": "unknown", "blas_kernel": "unknown", "blas_version": "unknown"}
    info = libs[0].info()
    return {"blas": str(info.get("internal_api")), "blas_kernel": str(info.get("architecture")),
            "blas_version": str(info.get("version"))}


def machine_key() -> dict:
    """What a tuned setting is valid for: CPU, instruction set, BLAS kernel and versions."""
    from importlib import metadata

    t = target()
    key = {k: t[k] for k in ("cpu", "isa", "blas", "blas_kernel", "blas_version")}
    for pkg in ("numba", "numpy"):
        key[pkg] = metadata.version(pkg)
    return key


def tuning_file() -> str:
    """The per-user tuning file: FASTATTN_TUNE_FILE, else under XDG_CACHE_HOME or ~/.cache."""
    path = os.environ.get("FASTATTN_TUNE_FILE")
    if path:
        return path
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastattn", "tuning.json")


def read_file(path: str, key: dict):
    """The Setting stored in ``path`` for ``key``; None (with a warning saying why) when the
    file is missing, corrupt, of another format or tuned for another machine."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        warnings.warn(f"ignoring the tuning file {path}: unreadable ({exc})", stacklevel=3)
        return None
    try:
        if not isinstance(data, dict) or "format" not in data:
            raise ValueError("no format")
        if data["format"] != FORMAT:
            warnings.warn(f"ignoring the tuning file {path}: written in format "
                          f"{data['format']!r}, this fastattn reads format {FORMAT} (run "
                          f"'fastattn tune' again)", stacklevel=3)
            return None
        if data.get("key") != key:
            warnings.warn(f"ignoring the tuning file {path}: it was tuned for "
                          f"{data.get('key')}, this machine is {key}", stacklevel=3)
            return None
        values = data["setting"]
        if not isinstance(values, dict) or set(values) != {f.name for f in fields(Setting)}:
            raise ValueError("its setting lacks or adds fields")
        return Setting(**values).check()
    except (ValueError, TypeError, KeyError) as exc:
        warnings.warn(f"ignoring the tuning file {path}: corrupt ({exc})", stacklevel=3)
        return None


def write_file(path: str, key: dict, setting: Setting, measured: dict | None = None) -> None:
    """Write ``setting`` for ``key`` to ``path`` atomically (a temporary file in the same
    folder, then a rename): a reader sees the old file or the new one, never half of one."""
    setting.check()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    data = {"format": FORMAT, "key": key, "setting": asdict(setting),
            "measured": measured or {}}
    with atomic_open(path, "w") as f:
        json.dump(data, f, indent=1)


_state: dict = {}
# held while the setting is read or put in force: without it, a use() on one thread while
# another thread reads the file for the first time could be overwritten by that read
_state_lock = threading.RLock()


def current() -> tuple[Setting, str]:
    """The setting in force and where it comes from (read once per process)."""
    now = _state.get("current")  # one entry: a thread reading it sees all or nothing
    if now is None:
        with _state_lock:
            now = _state.get("current")
            if now is None:
                now = _state["current"] = _load()
    return now


def _load():
    default = defaults(target())
    if os.environ.get("FASTATTN_TUNE", "").lower() == "off":
        return default[0], default[1] + " (FASTATTN_TUNE=off)"
    path = tuning_file()
    tuned = read_file(path, machine_key())
    return (tuned, f"tuned ({path})") if tuned is not None else default


def use(setting: Setting | None, source: str = "set in this process") -> None:
    """Put ``setting`` in force in this process (None: read the defaults and file again)."""
    with _state_lock:
        _state.clear()
        if setting is not None:
            _state["current"] = setting.check(), source
