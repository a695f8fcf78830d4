"""Plan once, run many: ``plan`` does the host work, ``DecodePlan.run`` only checks and launches."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ._checks import (
    check_inputs,
    check_outputs,
    check_scales,
    check_sinks_given,
    inputs_match,
    signature,
)
from .backends import Launcher, get_backend
from .errors import KVDecodeError, UnsupportedError
from .planner import Choice, Route, check_backend_name, check_max_seq_len, route
from .problem import DecodeProblem, capturing

__all__ = [
    "PLANS",
    "DecodePlan",
    "PlanCache",
    "clear_plan_cache",
    "plan",
    "plan_cache_info",
    "plan_for_choice",
]

log = logging.getLogger("kvdecode.planner")


@dataclass(eq=False)
class DecodePlan:
    """A decode problem bound to a backend and its configuration (the compiled kernels or cuDNN graph).

    ``run`` checks the tensors against the plan (a mismatch raises :class:`KVDecodeError` naming both
    sides) and launches; it never syncs the host.

    A plan holds no per-call state: scratch (the Triton partials, cuDNN's workspace and clamped lengths)
    is allocated per call from torch's caching allocator on the current stream, so one plan may be run
    from any number of threads and streams at once (and captured in several CUDA graphs). The one
    exception: by default an eager Triton call with several splits is one kernel (the fused merge, see
    ``SplitKVConfig.fused_merge``; not for a deterministic plan) and takes its partials from a buffer per
    (device, stream) that every plan shares (calls on a stream run one after another); under capture each
    call gets its own and the merge runs as a kernel of its own.
    """

    problem: DecodeProblem
    choice: Choice
    deterministic: bool
    launcher: Launcher = field(repr=False)

    def __post_init__(self) -> None:
        self._sig = signature(self.problem)

    @property
    def backend(self) -> str:
        return self.choice.backend

    def run(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        seq_lens: torch.Tensor,
        *,
        kv_start: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        return_lse: bool = False,
        lse: torch.Tensor | None = None,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Launch the planned kernel(s); returns ``out`` (and ``lse`` when ``return_lse``).

        Parameters
        ----------
        q, k_cache, v_cache : Tensor
            Same shapes, dtype, device and strides as the plan's problem (``q [B, H_q, T_q, D]``, caches
            ``[B, H_kv, capacity, D]``); a mismatch raises :class:`KVDecodeError` naming both sides.
        seq_lens : int32 Tensor ``[B]``, contiguous, on the plan's device
            Read on the device: they may change between runs (and between CUDA-graph replays).
        kv_start, mask, sinks : Tensor, optional
            As planned (given exactly when the plan was made with them).
        out : Tensor ``[B, H_q, T_q, D]``, optional
            Written in place; allocated when None. Must not overlap q, the caches, ``lse`` or itself.
        return_lse : bool
            Also return the natural-log LSE, float32 ``[B, H_q, T_q]``.
        lse : float32 Tensor ``[B, H_q, T_q]``, optional
            Written in place; implies ``return_lse``. With ``out`` and ``lse`` given no output is
            allocated (scratch still comes from torch's caching allocator, the graph's pool under capture).
        """
        sig = self._sig
        plain = sig.plain and kv_start is None and mask is None and k_scale is None and v_scale is None
        if not (plain and inputs_match(sig, q, k_cache, v_cache, seq_lens, sinks)):
            check_inputs(self.problem, q, k_cache, v_cache, seq_lens, kv_start, mask)
            check_scales(self.problem, k_scale, v_scale)
            check_sinks_given(self.problem, sinks)
        scales = None if k_scale is None else (k_scale, v_scale)
        return self._launch_checking_outputs(
            q, k_cache, v_cache, seq_lens, kv_start, mask, out, lse, return_lse, scales, sinks
        )

    def _launch_checking_outputs(
        self, q, k_cache, v_cache, seq_lens, kv_start, mask, out, lse, return_lse, scales=None, sinks=None
    ):
        """:meth:`_launch` after checking ``out`` and ``lse``, for inputs known to match the problem
        (checked by ``run``, or the tensors that made it): the fast test against the signature, which
        sizes every input, else the full checks naming the fault."""
        if out is not None or lse is not None:
            check_outputs(
                self.problem, q, k_cache, v_cache, seq_lens, kv_start, mask, out, lse, scales, sinks,
                sig=self._sig,
            )  # fmt: skip
            return_lse = return_lse or lse is not None
        return self._launch(
            q, k_cache, v_cache, seq_lens, kv_start, mask, out, lse, return_lse, scales, sinks
        )

    def _launch(
        self, q, k_cache, v_cache, seq_lens, kv_start, mask, out, lse, return_lse, scales=None, sinks=None
    ):
        """Allocate what is missing and launch, without checks: for callers whose tensors made the problem
        (``decode_attention`` validates them in ``DecodeProblem.from_tensors``)."""
        p = self.problem
        if out is None:
            out = torch.empty((p.batch, p.num_q_heads, p.q_len, p.head_dim), dtype=p.dtype, device=p.device)
        if lse is None and return_lse:
            lse = torch.empty((p.batch, p.num_q_heads, p.q_len), dtype=torch.float32, device=p.device)
        self.launcher(q, k_cache, v_cache, seq_lens, kv_start, mask, out, lse, scales=scales, sinks=sinks)
        return (out, lse) if return_lse else out


class PlanCache:
    """The one cache of plans, shared by every entry point (``decode_attention``, ``kvdecode.sdpa``,
    ``StaticKVCache``, the torch op): a bounded LRU, safe to use from several threads.

    A plan is keyed by ``(problem, backend asked for, backend chosen, deterministic)``: what was asked
    is part of the key, so an ``auto`` plan whose cuDNN build fell back to Triton is never handed to a
    later explicit ``backend="cudnn"`` call. Plans hold no per-call state, so threads and streams share
    them. Entry points that can describe a call more cheaply than a :class:`DecodeProblem` register an
    *alias* (any hashable) for a problem; aliases are dropped with the plans they lead to.
    The planner's length-independent work (:func:`~kvdecode.planner.route`) is memoized per problem too.
    """

    def __init__(self, maxsize: int = 256) -> None:
        self.maxsize = maxsize
        self._plans: OrderedDict[tuple, DecodePlan] = OrderedDict()
        self._routes: OrderedDict[tuple, Route] = OrderedDict()
        self._aliases: dict[object, DecodeProblem] = {}
        self._problems: dict[DecodeProblem, DecodeProblem] = {}  # one object per distinct problem
        self._lock = threading.Lock()
        self._stats = {"hits": 0, "misses": 0}

    def route(self, problem: DecodeProblem, backend: str, deterministic: bool = False) -> Route:
        key = (problem, backend, deterministic)
        found = self._routes.get(key)  # (a read: atomic under the GIL; the lock guards the changes)
        if found is None:
            found = route(problem, backend, deterministic=deterministic)
            with self._lock:
                self._routes[key] = found
                while len(self._routes) > self.maxsize:
                    self._routes.popitem(last=False)
        return found

    def plan_for_call(
        self,
        problem: DecodeProblem,
        backend: str,
        deterministic: bool,
        max_seq_len: int | None,
        seq_lens: torch.Tensor | None,
    ) -> DecodePlan:
        """``get(problem, route(...).choose(...))`` for one call, the choice's reason made only on a miss
        (or with DEBUG logging on: :meth:`Route.choose` logs it): a hit is one route lookup, a length
        compare and one plan lookup."""
        found_route = self.route(problem, backend, deterministic)
        decided = found_route.backend_for(problem, max_seq_len, seq_lens)
        if not log.isEnabledFor(logging.DEBUG):
            found = self._hit((problem, backend, decided[0], deterministic))
            if found is not None:
                return found
        choice = found_route.choose(problem, max_seq_len, seq_lens, decided)
        return self.get(problem, choice, asked=backend, deterministic=deterministic)

    def _hit(self, key: tuple) -> DecodePlan | None:
        """The cached plan of ``key``, counted as a hit and made the newest; None on a miss."""
        with self._lock:
            found = self._plans.get(key)
            if found is not None:
                self._stats["hits"] += 1
                self._plans.move_to_end(key)
            return found

    def problem_for(self, alias: object) -> DecodeProblem | None:
        """The problem an entry point registered under ``alias`` (None if unknown or evicted)."""
        return self._aliases.get(alias)

    def remember(self, alias: object, problem: DecodeProblem) -> DecodeProblem:
        """Register ``alias`` for ``problem`` and return the one object that stands for that problem:
        an equal problem remembered before under another alias, else ``problem`` itself. Two aliases of
        one problem (say, a contiguous and a sliced mask of the same strides) then key the plan cache
        with the same object, and a lookup is an identity test, not a compare of every field (~2 µs,
        four lookups a call)."""
        with self._lock:
            problem = self._problems.setdefault(problem, problem)
            self._aliases[alias] = problem
            if len(self._aliases) > 4 * self.maxsize:  # aliases of evicted plans: drop the oldest half
                for stale in list(self._aliases)[: len(self._aliases) // 2]:
                    del self._aliases[stale]
                self._problems = {p: p for p in self._aliases.values()}
        return problem

    def get(
        self, problem: DecodeProblem, choice: Choice, *, asked: str, deterministic: bool = False
    ) -> DecodePlan:
        """The plan for ``choice`` (made on a miss, outside the lock: cuDNN builds take a while)."""
        found = self._hit((problem, asked, choice.backend, deterministic))
        if found is not None:
            return found
        key = (problem, asked, choice.backend, deterministic)
        made = plan_for_choice(problem, choice, deterministic=deterministic, auto=asked == "auto")
        if made.backend != choice.backend and capturing(problem.device):
            return made  # a fallback forced by the capture (cuDNN builds outside it): not for later calls
        with self._lock:
            self._stats["misses"] += 1
            made = self._plans.setdefault(key, made)
            self._plans.move_to_end(key)
            while len(self._plans) > self.maxsize:
                self._plans.popitem(last=False)
        return made

    def peek(
        self, problem: DecodeProblem, *, asked: str, backend: str, deterministic: bool = False
    ) -> DecodePlan | None:
        """The cached plan of that key, without counting a lookup or refreshing its age."""
        with self._lock:
            return self._plans.get((problem, asked, backend, deterministic))

    def cache_info(self) -> dict[str, int]:
        """``size`` (plans held), ``maxsize``, ``hits`` and ``misses`` of :meth:`get`."""
        with self._lock:
            return dict(size=len(self._plans), maxsize=self.maxsize, **self._stats)

    def clear(self) -> None:
        """Forget every plan, route and alias and reset the counters (e.g. after the tuning table changed)."""
        with self._lock:
            self._plans.clear()
            self._routes.clear()
            self._aliases.clear()
            self._problems.clear()
            self._stats.update(hits=0, misses=0)


PLANS = PlanCache()


def plan_cache_info() -> dict[str, int]:
    """Statistics of the shared plan cache (see :class:`PlanCache`)."""
    return PLANS.cache_info()


def clear_plan_cache() -> None:
    """Empty the shared plan cache."""
    PLANS.clear()


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise KVDecodeError(f"{name} must be True or False, got {value!r}")
    return value


def plan(
    problem: DecodeProblem,
    *,
    backend: str = "auto",
    deterministic: bool = False,
    max_seq_len: int | None = None,
) -> DecodePlan:
    """Choose a backend for ``problem`` and do its host work once (configuration, kernels, graphs); plans
    come from the shared plan cache, so planning the same problem twice returns the same plan.

    Parameters
    ----------
    problem : DecodeProblem
        From :meth:`DecodeProblem.from_tensors` on example tensors of the shapes and layout to serve.
    backend : {"auto", "triton", "cudnn", "reference"}
        With ``"auto"`` the choice is made for ``max_seq_len`` (the longest row the plan will serve), or
        for the capacity when it is None: ``run`` never reads the device lengths. A cuDNN graph that fails
        to build under ``"auto"`` falls back to Triton with the reason recorded in ``choice``.
    deterministic : bool
        Bitwise-reproducible results, on Triton (see :func:`kvdecode.decode_attention`): ``auto`` keeps
        the plan off cuDNN, an explicit ``backend="cudnn"`` raises :class:`UnsupportedError`.
    max_seq_len : int, optional
        The longest filled length the plan will see (``<= capacity``).

    Returns
    -------
    DecodePlan
        ``plan.run(q, k_cache, v_cache, seq_lens, out=..., lse=...)`` launches with no host sync; with
        ``out`` (and ``lse``) given it allocates no output (scratch comes from torch's caching allocator,
        the graph's pool under capture), so a step can be captured in a CUDA graph.

    Raises
    ------
    UnsupportedError
        An explicit ``backend`` cannot serve ``problem``.

    Examples
    --------
    >>> import torch, kvdecode
    >>> q = torch.randn(2, 8, 1, 64); k = torch.randn(2, 2, 256, 64)
    >>> lens = torch.tensor([17, 256], dtype=torch.int32)
    >>> p = kvdecode.plan(kvdecode.DecodeProblem.from_tensors(q, k, k, lens), backend="triton")
    >>> out = torch.empty_like(q)
    >>> p.run(q, k, k, lens, out=out) is out
    True
    """
    if not isinstance(problem, DecodeProblem):
        raise KVDecodeError(
            f"problem must be a DecodeProblem, got {type(problem).__name__}; "
            "make one with kvdecode.DecodeProblem.from_tensors(q, k_cache, v_cache, seq_lens)"
        )
    check_backend_name(backend)
    check_flag("deterministic", deterministic)
    max_seq_len = check_max_seq_len(max_seq_len, problem)
    choice = PLANS.route(problem, backend, deterministic).choose(problem, max_seq_len, None)
    return PLANS.get(problem, choice, asked=backend, deterministic=deterministic)


def plan_for_choice(
    problem: DecodeProblem, choice: Choice, *, deterministic: bool = False, auto: bool = False
) -> DecodePlan:
    """Make the plan of an already made choice; under ``auto`` a cuDNN build failure falls back to Triton."""
    try:
        launcher = get_backend(choice.backend).make_launcher(problem, deterministic=deterministic)
    except UnsupportedError as exc:
        if not (auto and choice.backend == "cudnn"):
            raise
        log.debug("auto: cuDNN declined %s at build time (%s); using triton", problem.name, exc)
        choice = Choice(
            "triton", f"auto: cuDNN declined at build time ({exc})", choice.threshold, choice.length
        )
        launcher = get_backend("triton").make_launcher(problem, deterministic=deterministic)
    return DecodePlan(problem=problem, choice=choice, deterministic=deterministic, launcher=launcher)
