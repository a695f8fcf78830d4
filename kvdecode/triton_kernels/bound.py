"""A Triton kernel with its arguments bound once: per-call launches that skip ``JITFunction.run``.

``JITFunction.run`` re-binds every argument, re-computes the specialization key and looks the compiled
kernel up on every call (~10-40 µs of host time for a kernel with many parameters). A plan's launches
only ever differ in a few pointers (and the ``out``/``lse`` strides), so :class:`BoundKernel` goes through
``JITFunction.run`` once per *specialization* (the 16-byte alignment of every pointer plus the exact
values of the per-call integers), keeps the ``CompiledKernel`` it returned, and afterwards calls that
kernel's launcher directly, as ``JITFunction.run`` itself does after its lookup.

Direct launches take the pointers as integers (``data_ptr()``), not tensors: Triton's launcher asks the
driver about every tensor argument (``cuPointerGetAttribute``, to refuse CPU tensors) and takes an
integer as it is. The callers' checks have already placed every tensor on the kernel's GPU, and the
caller computes those integers anyway (they decide the specialization), so this skips one driver call
per pointer (13 for the split kernel) and nothing else. ``JITFunction.run`` (a new specialization, the
interpreter) always gets the tensors.

The direct path is used only where it is known to work: a real GPU (not the interpreter) and a Triton
whose ``CompiledKernel`` has ``run``, ``function`` and ``packed_metadata``. If a direct launch raises,
the bound kernel falls back to ``JITFunction.run`` for good (logged at DEBUG). Compiles are counted per
kernel in :func:`compile_counts` (a compiled variant met for the first time in this process: compiled
afresh or loaded from Triton's on-disk cache).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

import torch
from triton.runtime.errors import OutOfResources

from .._interpret import interpreter_active
from ..errors import KVDecodeError

__all__ = ["BoundKernel", "bound_kernel", "compile_counts", "int_class", "reset_compile_counts"]

log = logging.getLogger("kvdecode.triton")

_SEEN: set[tuple[str, str]] = set()
_COUNTS: Counter[str] = Counter()
_LOCK = threading.Lock()


def compile_counts() -> dict[str, int]:
    """Compiled kernel variants this process has met, per kernel name (``{"split_kv_kernel": 1, ...}``)."""
    with _LOCK:
        return dict(_COUNTS)


def reset_compile_counts() -> None:
    """Forget the variants met so far (for benchmarks that count compiles from a point on)."""
    with _LOCK:
        _SEEN.clear()
        _COUNTS.clear()


def _note_variant(name: str, kernel: object) -> None:
    tag = str(getattr(kernel, "hash", id(kernel)))
    with _LOCK:
        if (name, tag) not in _SEEN:
            _SEEN.add((name, tag))
            _COUNTS[name] += 1


try:
    from triton import knobs as _knobs

    _HOOKS_OWNER = _knobs.runtime
except (ImportError, AttributeError):  # older Triton: hooks live on CompiledKernel
    from triton.compiler import CompiledKernel as _HOOKS_OWNER


def int_class(value: int) -> object:
    """What Triton specializes an integer argument on (Triton 3.6 and 3.9 alike): 1 becomes a constant;
    any other value is typed by its range (i32, i64, u64) and marked when divisible by 16. A key made of
    these classes (not of the values) lets calls whose integers differ only in value share a kernel, and
    stays bounded however many values a process meets."""
    if value == 1:
        return 1
    width = 0 if -(2**31) <= value < 2**31 else 1 if value < 2**63 else 2
    return (width, value % 16 == 0)


def _hooks():
    """The launch hooks, or ``(None, None)`` when none is registered (then no launch metadata is built:
    Triton's launcher only hands it to the hooks)."""
    enter, leave = _HOOKS_OWNER.launch_enter_hook, _HOOKS_OWNER.launch_exit_hook
    if not getattr(enter, "calls", enter) and not getattr(leave, "calls", leave):
        return None, None
    return enter, leave


class BoundKernel:
    """One ``@triton.jit`` kernel and its launch options, launched with a full positional argument list.

    Parameters
    ----------
    fn : triton JITFunction
    name : str
        For :func:`compile_counts` and logs.
    options : dict
        ``num_warps``, ``num_stages``, ``launch_pdl``...: what ``fn[grid](..., **options)`` takes.
    device_index : int or None
        The CUDA device the kernel launches on (its current stream is read per call); None under the
        interpreter, where every launch goes through ``fn[grid]``.
    """

    def __init__(self, fn, name: str, options: dict, device_index: int | None) -> None:
        self.fn, self.name, self.options = fn, name, options
        self.device_index = device_index
        self.direct = device_index is not None and not interpreter_active()
        self._compiled: dict[tuple, object] = {}
        self._tried: set[tuple] = set()  # specs whose prepare failed: not tried again

    def __call__(self, grid: tuple[int, int, int], args: list, spec: tuple, binder_args=None) -> None:
        """Launch on ``grid``; ``spec`` must determine Triton's specialization of ``args`` (alignments and
        per-call integers): launches with an equal ``spec`` share one compiled kernel. ``args`` may hold
        pointers as integers when ``binder_args`` is given: a zero-argument callable returning the same
        list with the tensors, which ``JITFunction.run`` needs (its specialization reads them)."""
        kernel = self._compiled.get(spec) if self.direct else None
        if kernel is not None:
            try:
                stream = raw_stream(self.device_index)
                enter, leave = _hooks()
                meta = (
                    None if enter is None and leave is None else kernel.launch_metadata(grid, stream, *args)
                )
                kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata,
                           meta, enter, leave, *args)  # fmt: skip
                return
            except Exception as exc:  # an unknown Triton: its binder path is always right
                # For good, and for every caller of this BoundKernel (the append and mask-lengths kernels
                # have one per process and device). An exception raised after the launch was queued (a
                # launch hook's) would launch it twice below: harmless for kvdecode's kernels, which
                # write the same values when run twice.
                log.debug("%s: direct launch failed (%s); using JITFunction.run from now on", self.name, exc)
                self.direct = False
        try:
            kernel = self.fn[grid](*(args if binder_args is None else binder_args()), **self.options)
        except OutOfResources as exc:  # a configuration this GPU cannot run: before anything was launched
            options = ", ".join(f"{k}={v}" for k, v in self.options.items())
            raise KVDecodeError(
                f"{self.name} ({options}) does not fit this GPU: {exc}; choose a configuration with fewer "
                "stages, a smaller block_n or fewer heads_per_cta (or let kvdecode pick one)"
            ) from exc
        if kernel is not None:  # None under the interpreter
            _note_variant(self.name, kernel)
        if self.direct and _launchable(kernel):
            self._compiled[spec] = kernel

    def is_new(self, spec: tuple) -> bool:
        """Whether a direct launch of ``spec`` has no compiled kernel yet and none was tried by
        :meth:`prepare` (always False off the GPU)."""
        return self.direct and spec not in self._compiled and spec not in self._tried

    def prepare(self, grid: tuple[int, int, int], spec: tuple, binder_args) -> None:
        """Compile and load the kernel of ``spec`` without launching it (``binder_args()``: the tensors a
        launch of that specialization would get), so that a later launch of it, under CUDA-graph capture
        say, neither compiles nor loads a module. Nothing to do off the GPU or once ``spec`` is known.
        A failure (a form that does not fit this GPU) is logged as a warning, not raised: the call that
        prepares runs another form, and a launch of this one raises then; it is not tried again."""
        if not self.is_new(spec):
            return
        self._tried.add(spec)
        try:
            kernel = self.fn.warmup(*binder_args(), grid=grid, **self.options)
            getattr(kernel, "_init_handles", lambda: None)()  # loads the module (lazy until a launch)
        except Exception as exc:  # (out of resources, say): the launch of this form will say it
            log.warning(
                "%s: could not compile ahead the form a CUDA-graph capture launches (%s: %s); a capture "
                "of this call would compile it then", self.name, type(exc).__name__, str(exc)[:200],
            )  # fmt: skip
            return
        if not _launchable(kernel):
            return  # (a Triton that compiles asynchronously, or a hook that stopped the compile)
        _note_variant(self.name, kernel)
        self._compiled.setdefault(spec, kernel)


def _launchable(kernel: object) -> bool:
    """Whether a compiled kernel has what a direct launch calls (None: Triton compiled nothing)."""
    return all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata"))


def _torch_stream(index: int) -> int:
    return torch.cuda.current_stream(index).cuda_stream


# the raw handle of a CUDA device's current stream (what Triton's launcher takes), without a Stream object
raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or _torch_stream

_REGISTRY: dict[tuple, BoundKernel] = {}


def bound_kernel(fn, name: str, device: torch.device, **options) -> BoundKernel:
    """The process's one :class:`BoundKernel` of ``fn`` with ``options`` on ``device``, for kernels that
    belong to no plan (the append and mask-lengths kernels): their direct launches skip
    ``JITFunction.run`` once a specialization has been met. Off CUDA, or under the interpreter, the
    kernel launches through ``fn[grid]`` every time."""
    if device.type != "cuda" or interpreter_active():
        index = None
    else:  # "cuda" without an index: the current device's
        index = device.index if device.index is not None else torch.cuda.current_device()
    key = (fn, name, index, tuple(sorted(options.items())))
    found = _REGISTRY.get(key)
    if found is None:
        found = _REGISTRY.setdefault(key, BoundKernel(fn, name, options, index))
    return found
