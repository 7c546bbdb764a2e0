"""Time spent per layer and per kernel, forward and backward apart (and generation's
``infer``, ``step``, ``attend`` and ``project_kv``, where a layer has them; the decoding steps
that a layer's ``stepper`` makes count as its ``step``).

>>> with fastattn.profile(model) as prof:
...     loss = model.forward(xs, ts)
...     model.backward()
>>> print(prof.table())

Layers are found by walking ``model``'s attributes (lists, tuples and dicts included) for
objects with ``forward`` and ``backward`` methods; their methods are wrapped for the duration
of the ``with`` block only. Kernels are timed when a layer asks for one through
``fastattn._backend.kernel`` inside the block. Times are wall-clock (``time.perf_counter``);
a layer's *total* includes the layers it calls, its *self* time does not.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from fastattn import _backend

_PHASES = ("forward", "backward")
_GENERATION = ("infer", "step", "attend", "project_kv")  # timed too where a layer has them
_STEPPERS = {"stepper": "step"}  # methods that make step functions: the phase of those


@dataclass
class Entry:
    """Accumulated time of one layer method or kernel."""

    kind: str  # "layer" or "kernel"
    name: str  # attribute path and class for a layer, "backend:kernel" for a kernel
    phase: str  # "forward", "backward", a generation method ("infer", ...), "-" for kernels
    calls: int = 0
    total: float = 0.0  # seconds, children included
    self_time: float = 0.0  # seconds, children excluded


def _is_layer(obj) -> bool:
    return callable(getattr(obj, "forward", None)) and callable(getattr(obj, "backward", None))


def find_layers(root, name: str = "model", max_depth: int = 8):
    """[(path, layer)] for ``root`` and every layer reachable from its attributes."""
    found, seen = [], set()

    def visit(obj, path, depth):
        if id(obj) in seen or depth > max_depth:
            return
        if _is_layer(obj):
            seen.add(id(obj))
            found.append((path, obj))
            children = vars(obj) if hasattr(obj, "__dict__") else {}
            for key, value in children.items():
                if key.startswith("__"):
                    continue
                visit_value(value, f"{path}.{key}", depth + 1)

    def visit_value(value, path, depth):
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit_value(item, f"{path}[{i}]", depth)
        elif isinstance(value, dict):
            for key, item in value.items():
                visit_value(item, f"{path}[{key!r}]", depth)
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            visit(value, path, depth)

    visit(root, name, 0)
    return found


class Profile:
    """Context manager that times layer methods and kernels; see the module docstring."""

    def __init__(self, *models, names=None):
        self.models = models
        self.names = names or [f"model{i}" if len(models) > 1 else "model"
                               for i in range(len(models))]
        self.entries: dict[tuple, Entry] = {}
        self._open = threading.local()  # per thread: child-time accumulators of open calls
        self._lock = threading.Lock()  # for entries, which the threads share
        self._patched: list[tuple] = []
        self.wall = 0.0

    # -- timing -------------------------------------------------------------------------
    def _timed(self, key, fn):
        def wrapper(*args, **kwargs):
            stack = self._open.__dict__.setdefault("stack", [])
            stack.append([0.0])
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                children = stack.pop()[0]
                if stack:
                    stack[-1][0] += elapsed
                with self._lock:
                    e = self.entries.get(key)
                    if e is None:
                        e = self.entries[key] = Entry(*key)
                    e.calls += 1
                    e.total += elapsed
                    e.self_time += elapsed - children

        wrapper.__wrapped__ = fn
        return wrapper

    def _timed_maker(self, key, make):
        """``make``, whose functions come back timed under ``key``."""
        def wrapper(*args, **kwargs):
            return self._timed(key, make(*args, **kwargs))

        wrapper.__wrapped__ = make
        return wrapper

    def wrap_kernel(self, name: str, backend: str, fn):
        """``fn`` timed under the name ``backend:name``."""
        return self._timed(("kernel", f"{backend}:{name}", "-"), fn)

    # -- patching -----------------------------------------------------------------------
    def __enter__(self):
        for model, root in zip(self.models, self.names, strict=True):
            for path, layer in find_layers(model, root):
                label = f"{path} ({type(layer).__name__})"
                # (method, phase it is timed as, wrapper): the methods themselves, and the
                # steppers, whose step functions come back timed
                wraps = ([(p, p, self._timed) for p in _PHASES]
                         + [(p, p, self._timed) for p in _GENERATION]
                         + [(m, p, self._timed_maker) for m, p in _STEPPERS.items()])
                for method, phase, wrap in wraps:
                    if method not in _PHASES and not callable(getattr(layer, method, None)):
                        continue
                    had_own = method in vars(layer)
                    original = getattr(layer, method)
                    setattr(layer, method, wrap(("layer", label, phase), original))
                    self._patched.append((layer, method, had_own, original))
        self._previous = _backend.set_profiler(self)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._t0
        _backend.set_profiler(self._previous)
        for layer, phase, had_own, original in reversed(self._patched):
            if had_own:
                setattr(layer, phase, original)
            else:
                delattr(layer, phase)
        self._patched.clear()
        return False

    # -- reports ------------------------------------------------------------------------
    def rows(self, kind: str | None = None, sort: str = "self_time"):
        """Entries (optionally of one kind), slowest first by ``sort``."""
        rows = [e for e in self.entries.values() if kind is None or e.kind == kind]
        return sorted(rows, key=lambda e: getattr(e, sort), reverse=True)

    def table(self, sort: str = "self_time", limit: int | None = None) -> str:
        """A text table of layers then kernels, each sorted by ``sort``."""
        lines = [f"wall time inside the profile: {self.wall * 1e3:.1f} ms"]
        roots = [e for e in self.rows("layer") if e.name.split(" ")[0] in self.names]
        if roots:
            outside = self.wall - sum(e.total for e in roots)
            lines.append(f"outside the model's forward/backward (optimizer, data, glue): "
                         f"{outside * 1e3:.1f} ms")
        for kind in ("layer", "kernel"):
            rows = self.rows(kind, sort)[:limit]
            if not rows:
                continue
            width = max(len(e.name) for e in rows)
            pw = max(8, *(len(e.phase) for e in rows))  # "project_kv" is 10 wide
            lines.append("")
            lines.append(f"{kind + 's':<{width}}  {'phase':>{pw}}  {'calls':>6}  "
                         f"{'total ms':>9}  {'self ms':>9}  {'self %':>6}")
            for e in rows:
                share = 100.0 * e.self_time / self.wall if self.wall else 0.0
                lines.append(f"{e.name:<{width}}  {e.phase:>{pw}}  {e.calls:>6}  "
                             f"{e.total * 1e3:>9.2f}  {e.self_time * 1e3:>9.2f}  {share:>6.1f}")
        return "\n".join(lines)

    def as_dict(self):
        """The entries as plain data (for JSON)."""
        return {"wall_seconds": self.wall,
                "entries": [vars(e).copy() for e in self.rows()]}


def profile(*models, names=None) -> Profile:
    """``with fastattn.profile(model) as prof:`` times ``model``'s layers and the kernels."""
    return Profile(*models, names=names)
