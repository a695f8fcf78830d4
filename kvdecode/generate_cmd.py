"""``kvdecode generate``: tokens/s of a Hugging Face generation loop, kvdecode vs transformers' sdpa.

Builds a random-weights Llama-3-8B-shaped model (hidden 4096, 32 query heads, 8 KV heads, head dim 128,
MLP 14336; ``--layers`` decoder layers) in bf16 on a GPU, or a tiny one in fp32 on the CPU (the Triton
interpreter: slow, for checking), and generates ``--tokens`` tokens greedily from the same random
prompt with each backend (``cache_implementation="static"``; on a GPU ``generate`` compiles the decode
step with ``mode="reduce-overhead"`` unless ``--no-compile``). Each backend first runs a short warm-up
generation (compilation, kernels), then the timed one with a progress bar. Prints decode tokens/s side
by side and how many generated tokens agree. transformers is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import sys
import time

from .errors import KVDecodeError

__all__ = ["LLAMA3_8B_SHAPE", "TINY_SHAPE", "add_generate_parser", "random_llama", "run_generate"]

LLAMA3_8B_SHAPE = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
)
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=96,
)


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="tokens/s of HF generate with attn_implementation kvdecode vs sdpa (random Llama-3-8B shape)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--tokens", type=int, default=None, help="new tokens (default: 128 on GPU, 8 on CPU)")
    p.add_argument("--prompt", type=int, default=None, help="prompt length (default: 1024 on GPU, 20 on CPU)")
    p.add_argument("--batch", type=int, default=1, help="batch rows (default 1)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: 8 on GPU, 2 on CPU)")
    p.add_argument("--device", default=None, help="'cuda[:N]' or 'cpu' (default: cuda if present)")
    p.add_argument("--backends", default="sdpa,kvdecode", help="attn_implementations (default sdpa,kvdecode)")
    p.add_argument("--no-compile", action="store_true", help="generate without torch.compile")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    return run_generate(
        tokens=args.tokens,
        prompt=args.prompt,
        batch=args.batch,
        layers=args.layers,
        device=args.device,
        backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
        compile=not args.no_compile,
        seed=args.seed,
    )


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KVDecodeError(f"{name} must be a positive int, got {value!r}; e.g. --{name} 8")
    return value


class _Progress:
    """A ``generate`` streamer that draws a progress bar per new token (tqdm when importable)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.count, self.first = total, label, -1, None
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"{label:>10}", unit="tok", file=sys.stderr, leave=True)
        except ImportError:
            self.bar = None

    def put(self, value) -> None:
        self.count += 1  # the first put is the prompt
        if self.count == 1:
            self.first = time.perf_counter()  # the prefill's token: decode timing starts here
        if self.count < 1:
            return
        if self.bar is not None:
            self.bar.update(1)
        else:
            done = int(30 * self.count / self.total)
            print(
                f"\r{self.label:>10} [{'#' * done}{'.' * (30 - done)}] {self.count}/{self.total}",
                end="",
                file=sys.stderr,
            )

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr)


def random_llama(
    layers: int,
    device,
    *,
    tiny: bool,
    seed: int | None = None,
    max_positions: int = 131072,
    sliding_window: int | None = None,
):
    """A ``LlamaForCausalLM`` with random weights built on ``device``: the Llama-3-8B shape
    (:data:`LLAMA3_8B_SHAPE`) or a tiny one, bf16 on CUDA and fp32 elsewhere, in eval mode, no grads.
    With ``sliding_window``, a ``MistralForCausalLM`` of the same shape whose every layer attends only
    the last ``sliding_window`` positions (transformers keeps that many slots per layer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    shape = TINY_SHAPE if tiny else LLAMA3_8B_SHAPE
    if sliding_window is None:
        config_class, model_class, extra = LlamaConfig, LlamaForCausalLM, {}
    else:
        config_class, model_class, extra = (
            MistralConfig,
            MistralForCausalLM,
            {"sliding_window": sliding_window},
        )
    cfg = config_class(num_hidden_layers=layers, max_position_embeddings=max_positions, **shape, **extra)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if seed is not None:
        torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def _build(layers: int, device, seed: int):
    import kvdecode.hf  # noqa: F401  (registers "kvdecode")

    return random_llama(layers, device, tiny=device.type != "cuda", seed=seed)


def _generate(model, backend: str, ids, tokens: int, compile: bool, progress=None):
    model.set_attn_implementation(backend)
    return model.generate(
        input_ids=ids,
        attention_mask=ids.new_ones(ids.shape),
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        cache_implementation="static",
        disable_compile=not compile,
        pad_token_id=0,
        streamer=progress,
    )


def run_generate(
    *,
    tokens: int | None = None,
    prompt: int | None = None,
    batch: int = 1,
    layers: int | None = None,
    device: str | None = None,
    backends: tuple[str, ...] = ("sdpa", "kvdecode"),
    compile: bool = True,
    seed: int = 0,
) -> int:
    """Generate with each backend and print decode tokens/s side by side; returns the exit code."""
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    tokens = _positive("tokens", tokens if tokens is not None else (128 if cuda else 8))
    prompt = _positive("prompt", prompt if prompt is not None else (1024 if cuda else 20))
    batch, layers = (
        _positive("batch", batch),
        _positive("layers", layers if layers is not None else (8 if cuda else 2)),
    )
    if not backends:
        raise KVDecodeError(
            "backends must name at least one attn_implementation, got none; e.g. sdpa,kvdecode"
        )
    model = _build(layers, dev, seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=gen).to(dev)
    shape = "Llama-3-8B-shaped" if cuda else "tiny Llama (CPU: Triton interpreter, slow)"
    print(f"model: {shape}, {layers} layers, {model.dtype}, {dev}; batch {batch}, prompt {prompt}")
    results = {}
    for backend in backends:
        _generate(model, backend, ids, min(tokens, 4), compile and cuda)  # warm-up: compile, kernels
        progress = _Progress(tokens, backend)
        out = _generate(model, backend, ids, tokens, compile and cuda, progress)
        if cuda:
            torch.cuda.synchronize(dev)
        elapsed = time.perf_counter() - (progress.first or time.perf_counter())
        steps = max(tokens - 1, 1)
        results[backend] = (out[:, prompt:], batch * steps / max(elapsed, 1e-9), elapsed)
    _report(results, backends)
    return 0


def _report(results: dict, backends: tuple[str, ...]) -> None:
    print(f"{'backend':>14}  {'decode s':>9}  {'tokens/s':>10}  tokens equal to {backends[0]}")
    first = results[backends[0]][0]
    for name in backends:
        toks, rate, elapsed = results[name]
        agree = (toks == first).float().mean().item() if toks.shape == first.shape else float("nan")
        print(f"{name:>14}  {elapsed:9.3f}  {rate:10.1f}  {agree:6.1%}")
    if "kvdecode" in results and "sdpa" in results:
        print(f"kvdecode / sdpa tokens/s: {results['kvdecode'][1] / results['sdpa'][1]:.2f}x")
