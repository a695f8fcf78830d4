"""Per-device state: each GPU gets its own graphs, handles, plans, scratch and launches (docs/multi-gpu.md).

The CPU tests check the bookkeeping with fake devices (no GPU needed): graph keys and disk paths carry
the device index, cuDNN handles are kept per (device, thread) and made on their device, plans are cached
per device, tuning lookups use the problem's own GPU, and the Triton and cuDNN launches switch to the
tensors' device when another one is current. The ``gpu`` test runs decode on cuda:0 and cuda:1
interleaved, from two threads, on non-default streams (needs two GPUs).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

import kvdecode
from kvdecode import _append, _interpret, _mask_lengths, backends, planner
from kvdecode.backends import ReferenceBackend
from kvdecode.cudnn_graphs import DiskCache, GraphCache, GraphKey, cuda_env
from kvdecode.cudnn_graphs import backend as cudnn_backend
from kvdecode.cudnn_graphs.builder import BuiltGraph
from kvdecode.plan import PLANS
from kvdecode.planner import Choice
from kvdecode.problem import DecodeProblem
from kvdecode.reference import reference_decode_attention, relative_l2_error, tolerance_for
from kvdecode.thresholds import Threshold
from kvdecode.triton_kernels import config as triton_config
from kvdecode.triton_kernels.launcher import SplitKVLauncher


def problem_on(index: int, *, batch=2, capacity=1024, head_dim=128, dtype=torch.bfloat16) -> DecodeProblem:
    """A problem on ``cuda:<index>`` described without tensors (contiguous BHSD, H_q 16, H_kv 4)."""
    kv = (4 * capacity * head_dim, capacity * head_dim, head_dim, 1)
    return DecodeProblem(
        batch=batch,
        num_q_heads=16,
        num_kv_heads=4,
        head_dim=head_dim,
        q_len=1,
        capacity=capacity,
        dtype=dtype,
        device=torch.device("cuda", index),
        q_strides=(16 * head_dim, head_dim, head_dim, 1),
        k_strides=kv,
        v_strides=kv,
        scale=1 / math.sqrt(head_dim),
    )


class FakeDevices:
    """Stands in for ``torch.cuda.current_device`` / ``torch.cuda.device``: a per-thread current index."""

    def __init__(self) -> None:
        self._local = threading.local()
        self.switches: list[int] = []  # every index a ``torch.cuda.device`` context switched to

    def current(self) -> int:
        return getattr(self._local, "index", 0)

    def set(self, index: int) -> None:
        self._local.index = index

    def context(self, device):
        fake = self

        class _Ctx:
            def __enter__(self):
                self.prev = fake.current()
                index = device.index if isinstance(device, torch.device) else int(device)
                fake.switches.append(index)
                fake.set(index)

            def __exit__(self, *exc):
                fake.set(self.prev)

        return _Ctx()


@pytest.fixture
def fake_devices(monkeypatch) -> FakeDevices:
    fake = FakeDevices()
    monkeypatch.setattr(torch.cuda, "current_device", fake.current)
    monkeypatch.setattr(torch.cuda, "device", fake.context)
    return fake


# ---- cuDNN graph keys, graph cache, disk cache --------------------------------------------------------


def test_graph_keys_and_plan_files_differ_by_device(tmp_path):
    keys = [
        GraphKey.from_problem(problem_on(i), deterministic=False, with_lse=False, cudnn_version=91900)
        for i in (0, 1)
    ]
    assert [k.device_index for k in keys] == [0, 1]
    assert keys[0] != keys[1] and hash(keys[0]) != hash(keys[1])
    assert dataclasses.replace(keys[0], device_index=1) == keys[1]  # the device is the only difference
    assert keys[0].digest() != keys[1].digest()
    disk = DiskCache(tmp_path)
    assert disk.path_for(keys[0]) != disk.path_for(keys[1])


def test_graph_cache_builds_one_graph_per_device():
    built = []
    cache = GraphCache(lambda key: built.append(key) or SimpleNamespace(key=key, source="build"), maxsize=8)
    keys = [
        GraphKey.from_problem(problem_on(i), deterministic=False, with_lse=False, cudnn_version=91900)
        for i in (0, 1, 0, 1)
    ]
    graphs = [cache.get(k) for k in keys]
    assert [k.device_index for k in built] == [0, 1]  # built once per device, then hits
    assert graphs[0] is graphs[2] and graphs[1] is graphs[3] and graphs[0] is not graphs[1]
    info = cache.cache_info()
    assert (info.builds, info.hits, info.currsize) == (2, 2, 2)


# ---- cuDNN handles: per (device, thread), made on their device ----------------------------------------


class FakeCudnnModule:
    def __init__(self, devices: FakeDevices) -> None:
        self.devices = devices
        self.created: list[tuple[int, int]] = []  # (handle, device current at creation)
        self.bound: list[tuple[int, int]] = []  # (handle, stream)
        self._next = 100

    def create_handle(self) -> int:
        self._next += 1
        self.created.append((self._next, self.devices.current()))
        return self._next

    def set_stream(self, handle: int, stream: int) -> None:
        self.bound.append((handle, stream))


def test_handles_are_kept_per_device_and_thread(fake_devices, monkeypatch):
    fake = FakeCudnnModule(fake_devices)
    monkeypatch.setattr(cuda_env, "load_cudnn", lambda: (fake, 91900, None))
    monkeypatch.setattr(cuda_env, "_local", threading.local())
    h0, h1 = cuda_env.handle_for(0, 11), cuda_env.handle_for(1, 12)
    assert h0 != h1
    assert dict(fake.created) == {h0: 0, h1: 1}  # each made while its own device was current
    assert fake_devices.current() == 0  # and the caller's device is restored
    assert cuda_env.handle_for(0, 11) == h0 and len(fake.bound) == 2  # same stream: no re-bind
    assert cuda_env.handle_for(0, 13) == h0 and fake.bound[-1] == (h0, 13)  # new stream: re-bound
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(lambda: (cuda_env.handle_for(0, 11), cuda_env.handle_for(1, 12))).result()
    assert set(other).isdisjoint({h0, h1}) and other[0] != other[1]
    assert dict(fake.created) == {h0: 0, h1: 1, other[0]: 0, other[1]: 1}


# ---- launches follow the tensors' device --------------------------------------------------------------


def test_triton_launch_switches_to_the_tensors_device_only_when_needed(fake_devices):
    launcher = SplitKVLauncher.__new__(SplitKVLauncher)  # the launch itself is replaced below
    launcher.device_index = 1
    seen = []
    launcher._launch = lambda *args: seen.append(fake_devices.current())
    args = (None,) * 8
    fake_devices.set(0)
    launcher(*args)
    assert seen == [1] and fake_devices.current() == 0 and fake_devices.switches == [1]
    fake_devices.set(1)
    launcher(*args)
    assert seen == [1, 1] and fake_devices.switches == [1]  # already current: no device switch


def test_append_and_mask_lengths_launches_switch_to_their_tensors_device(fake_devices, monkeypatch):
    """The append and mask-lengths kernels launch through ``on_device``: on the tensors' GPU."""
    monkeypatch.setattr(_interpret, "interpreter_active", lambda: False)
    assert _append.on_device is _interpret.on_device is _mask_lengths.on_device
    fake_devices.set(0)
    with _interpret.on_device(torch.device("cuda", 1)):
        assert fake_devices.current() == 1
    with _interpret.on_device(torch.device("cuda", 0)):
        pass
    assert fake_devices.switches == [1] and fake_devices.current() == 0
    with _interpret.on_device(torch.device("cpu")):
        pass
    assert fake_devices.switches == [1]


def test_cudnn_execute_runs_on_the_launchers_device(fake_devices, monkeypatch):
    p = problem_on(1, batch=1, capacity=64, head_dim=64)
    key = GraphKey.from_problem(p, deterministic=False, with_lse=False, cudnn_version=91900)
    executed = []
    graph = SimpleNamespace(
        execute=lambda pack, ws, handle: executed.append((fake_devices.current(), handle))
    )
    launcher = cudnn_backend.CudnnLauncher.__new__(cudnn_backend.CudnnLauncher)
    launcher.problem, launcher.device_index = p, 1
    launcher._graphs = {False: BuiltGraph(key, graph, 0, "build", 0.0)}
    launcher.device, launcher.workspace_size = torch.device("cpu"), 0
    launcher._seq_len_q = torch.ones(1, 1, 1, 1, dtype=torch.int32)
    handles = []
    monkeypatch.setattr(cudnn_backend, "handle_for", lambda index, stream: handles.append(index) or 7)
    monkeypatch.setattr(cudnn_backend, "current_stream", lambda index: 1000 + index)
    q = torch.randn(1, 16, 1, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 4, 64, 64, dtype=torch.bfloat16)
    lens = torch.tensor([5], dtype=torch.int32)
    out = torch.empty_like(q)
    for current in (0, 1):
        fake_devices.set(current)
        launcher(q, k, k, lens, None, None, out, None)
        assert fake_devices.current() == current
    assert executed == [(1, 7), (1, 7)] and handles == [1, 1]
    assert fake_devices.switches == [1]  # switched only while cuda:0 was current


# ---- plans, tuning tables and SM counts per device ----------------------------------------------------


def test_plan_cache_keeps_problems_on_different_devices_apart(monkeypatch):
    backends.backend_names()  # register the real backends before adding a recording one
    made = []

    class Recording(ReferenceBackend):
        def make_launcher(self, problem, *, deterministic=False):
            made.append(problem)
            return super().make_launcher(problem)

    monkeypatch.setitem(backends._REGISTRY, "reference", Recording())
    PLANS.clear()
    choice = Choice("reference", "test")
    p0, p1 = problem_on(0), problem_on(1)
    plans = [PLANS.get(p, choice, asked="reference") for p in (p0, p1, p0, p1)]
    assert made == [p0, p1]
    assert plans[0] is plans[2] and plans[1] is plans[3] and plans[0] is not plans[1]
    assert [pl.problem.device.index for pl in plans[:2]] == [0, 1]


def test_thresholds_use_the_gpu_of_the_problems_device(monkeypatch):
    names = {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA A100-SXM4-80GB"}
    monkeypatch.setattr(cuda_env, "device_props", lambda index: SimpleNamespace(name=names[index]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # two fake GPUs on a CPU machine
    asked = []

    def fake_threshold(head_dim, dtype_name, batch, gpu_name, **heads):
        asked.append(gpu_name)
        return Threshold({names[0]: 111, names[1]: 222}[gpu_name], "test", provisional=False)

    monkeypatch.setattr(planner, "threshold_for", fake_threshold)
    got = [planner.auto_threshold(problem_on(i)).value for i in (1, 0)]
    assert got == [222, 111] and asked == [names[1], names[0]]


def test_tuned_configs_use_the_gpu_of_the_problems_device(monkeypatch):
    import kvdecode.thresholds as thresholds
    import kvdecode.tuning.environment as environment

    asked = []
    monkeypatch.setattr(triton_config, "interpreter_active", lambda: False)
    monkeypatch.setattr(environment, "device_gpu_name", lambda device: f"GPU{device.index}")
    monkeypatch.setattr(thresholds, "table_for_gpu", lambda name: asked.append(name))
    for i in (1, 0):
        assert triton_config.tuned_config(problem_on(i)) is None
    assert asked == ["GPU1", "GPU0"]


def test_heuristic_split_count_uses_each_devices_sm_count(monkeypatch):
    sms = {0: 132, 1: 8}
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda device: SimpleNamespace(multi_processor_count=sms[torch.device(device).index]),
    )
    configs = [triton_config.heuristic_config(problem_on(i, batch=1, capacity=8192)) for i in (0, 1)]
    # 1 row x 4 KV heads = 4 programs: 2 waves of 132 SMs want 66 splits, of 8 SMs only 4
    assert [c.num_splits for c in configs] == [66, 4]


# ---- the real thing: two GPUs, two threads, non-default streams ---------------------------------------

# name, device, backend, (B, H_q, H_kv, T_q, D, capacity), dtype, left-padded; per thread
THREAD_CASES = [
    [
        ("same-shape cudnn", 0, "cudnn", (2, 16, 4, 1, 128, 1024), torch.bfloat16, False),
        ("same-shape cudnn", 1, "cudnn", (2, 16, 4, 1, 128, 1024), torch.bfloat16, False),
        ("triton gqa tq2", 1, "triton", (3, 8, 2, 2, 64, 512), torch.bfloat16, True),
    ],
    [
        ("triton fp16", 0, "triton", (1, 32, 8, 1, 128, 2048), torch.float16, False),
        ("cudnn mqa", 1, "cudnn", (4, 8, 1, 1, 64, 768), torch.bfloat16, False),
    ],
]
STEPS = 4
SLEEP_CYCLES = 2_000_000  # ~1 ms of GPU time before each step's inputs land: a launch on another stream races


def _make_case(spec, gen):
    name, dev, backend, (b, hq, hkv, tq, d, cap), dtype, padded = spec
    device = torch.device("cuda", dev)
    k = torch.randn(b, hkv, cap, d, generator=gen).to(device, dtype)
    v = torch.randn(b, hkv, cap, d, generator=gen).to(device, dtype)
    lens = [torch.randint(tq + 3, cap + 1, (b,), generator=gen, dtype=torch.int32) for _ in range(STEPS + 1)]
    for i, row in enumerate(lens):
        row[i % b] = cap if i % 2 else min(cap, tq + 3)  # a full row and a short one
    starts = torch.randint(0, 4, (b,), generator=gen, dtype=torch.int32) if padded else None  # <= L - T_q
    return SimpleNamespace(
        name=name, device=device, backend=backend, dtype=dtype, k=k, v=v,
        qs=[torch.randn(b, hq, tq, d, generator=gen).to(device, dtype) for _ in range(STEPS + 1)],
        lens=[t.to(device) for t in lens],
        kv_start=None if starts is None else starts.to(device),
        live_q=torch.full((b, hq, tq, d), math.nan, dtype=dtype, device=device),
        live_lens=torch.full((b,), tq, dtype=torch.int32, device=device),
        outs=[torch.full((b, hq, tq, d), math.nan, dtype=dtype, device=device) for _ in range(STEPS + 1)],
    )  # fmt: skip


def _step(case, i):
    """Stage step ``i``'s inputs on the device's current stream (after a sleep), then decode."""
    with torch.cuda.device(case.device):
        torch.cuda._sleep(SLEEP_CYCLES)
    case.live_q.copy_(case.qs[i])
    case.live_lens.copy_(case.lens[i])
    kvdecode.decode_attention(
        case.live_q, case.k, case.v, case.live_lens,
        kv_start=case.kv_start, backend=case.backend, out=case.outs[i],
    )  # fmt: skip


def _worker(cases, barrier):
    streams = {d: torch.cuda.Stream(device=d) for d in (0, 1)}
    with torch.cuda.stream(streams[0]), torch.cuda.stream(streams[1]):
        assert all(torch.cuda.current_stream(d) == s for d, s in streams.items())
        barrier.wait()
        for i in range(1, STEPS + 1):
            for j, case in enumerate(cases):
                other = 1 - case.device.index
                current = case.device.index if (i + j) % 2 else other  # half the calls from the other GPU
                with torch.cuda.device(current):
                    _step(case, i)
    for s in streams.values():
        s.synchronize()
    return dict(getattr(cuda_env._local, "states", {}))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_two_threads_interleaved(monkeypatch, tmp_path):
    from kvdecode.cudnn_graphs import CudnnBackend, clear, default_graph_cache

    monkeypatch.setenv("KVDECODE_CACHE_DIR", str(tmp_path))  # graphs are built here, not loaded
    PLANS.clear()
    clear()
    gen = torch.Generator().manual_seed(1234)
    cases = [[_make_case(spec, gen) for spec in specs] for specs in THREAD_CASES]
    flat = [c for group in cases for c in group]
    cudnn_problems = {}
    for c in flat:
        p = DecodeProblem.from_tensors(c.live_q, c.k, c.v, c.live_lens, kv_start=c.kv_start)
        if c.backend == "cudnn":
            reason = CudnnBackend().supports(p)
            if reason is not None:
                pytest.skip(f"cuDNN cannot serve {p.name} here: {reason}")
            cudnn_problems[c.name, c.device.index] = p
    for c in flat:  # step 0 on the main thread: plans, graphs and Triton compiles (one thread at a time)
        with torch.cuda.device(1 - c.device.index):
            _step(c, 0)
    for d in (0, 1):
        torch.cuda.synchronize(d)
    barrier = threading.Barrier(len(cases), timeout=120)  # a failing worker must not hang the other
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = [pool.submit(_worker, group, barrier) for group in cases]
        handles = [f.result() for f in futures]

    for c in flat:
        for i in range(STEPS + 1):
            ref, _ = reference_decode_attention(c.qs[i], c.k, c.v, c.lens[i], kv_start=c.kv_start)
            err = relative_l2_error(c.outs[i], ref)
            assert err <= tolerance_for(c.dtype).rel_l2, f"{c.name} on {c.device}, step {i}: rel L2 {err:.3g}"

    # every thread made its own handle on every device it ran cuDNN on
    assert set(handles[0]) == {0, 1} and set(handles[1]) == {1}
    made = [handles[0][0].handle, handles[0][1].handle, handles[1][1].handle]
    assert len(set(made)) == 3
    # each device built its own graphs: one per (shape, device), even for the same shape
    cache = default_graph_cache()
    keys = {}
    for (name, dev), p in cudnn_problems.items():
        launcher = PLANS.peek(p, asked="cudnn", backend="cudnn").launcher
        assert launcher.device_index == dev and launcher.device == torch.device("cuda", dev)
        keys[name, dev] = launcher.key(lse=False)
        assert keys[name, dev].device_index == dev and keys[name, dev] in cache
    same0, same1 = keys["same-shape cudnn", 0], keys["same-shape cudnn", 1]
    assert dataclasses.replace(same0, device_index=1) == same1
    assert cache.peek(same0).graph is not cache.peek(same1).graph
    assert cache.cache_info().builds == len(keys)


def test_cudnn_writes_a_misaligned_out_through_scratch(fake_devices, monkeypatch):
    """cuDNN needs 16-byte-aligned outputs; a misaligned ``out`` (a valid call) used to raise. It now gets
    the result through an aligned scratch buffer and a copy, like an ``out`` of another layout."""
    p = problem_on(0, batch=1, capacity=64, head_dim=64)
    key = GraphKey.from_problem(p, deterministic=False, with_lse=False, cudnn_version=91900)
    written = []

    def execute(pack, ws, handle):
        pack[cudnn_backend.UID_O].fill_(3.0)
        written.append(pack[cudnn_backend.UID_O].data_ptr())

    launcher = cudnn_backend.CudnnLauncher.__new__(cudnn_backend.CudnnLauncher)
    launcher.problem, launcher.device_index = p, 0
    launcher._graphs = {False: BuiltGraph(key, SimpleNamespace(execute=execute), 0, "build", 0.0)}
    launcher.device, launcher.workspace_size = torch.device("cpu"), 0
    launcher._seq_len_q = torch.ones(1, 1, 1, 1, dtype=torch.int32)
    monkeypatch.setattr(cudnn_backend, "handle_for", lambda index, stream: 7)
    monkeypatch.setattr(cudnn_backend, "current_stream", lambda index: 1000)
    q = torch.randn(1, 16, 1, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 4, 64, 64, dtype=torch.bfloat16)
    lens = torch.tensor([5], dtype=torch.int32)
    out = torch.empty(q.numel() + 1, dtype=torch.bfloat16)[1:].view(q.shape)  # 2 bytes off
    assert out.data_ptr() % 16
    launcher(q, k, k, lens, None, None, out, None)
    assert written[0] != out.data_ptr() and written[0] % 16 == 0
    assert torch.equal(out, torch.full_like(out, 3.0))
