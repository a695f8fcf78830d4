"""The ``kvdecode`` command line: argument errors, ``info`` without a GPU, ``demo`` end to end.

The CPU demo runs in a subprocess with ``TRITON_INTERPRET=1`` and ``--device cpu`` so that it is the
reduced size on every machine, the GPU one included; the full-size demo is a ``gpu`` test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvdecode
from kvdecode import cli, demo
from kvdecode.errors import KVDecodeError
from kvdecode.reference import TOLERANCES

ROOT = Path(__file__).resolve().parents[1]
# step, seq_lens, backend, time, GB/s, rel L2, check
ROW = re.compile(r"^\s*(\d+)\s+([\d,]+)\s+(\w+)\s+([\d.]+)\s+([\d.e+-]+)\s+([\d.e+-]+)\s+(\S.*)$")


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "kvdecode", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``cli.main(argv)`` in process; argparse's ``SystemExit`` becomes the exit code."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _subcommands() -> list[str]:
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if a.dest == "command"]
    return sorted(action.choices)


def test_python_m_help_lists_every_subcommand() -> None:
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: kvdecode")
    for name in _subcommands():
        assert re.search(rf"^\s+{name}\s", result.stdout, re.M), f"{name} missing from --help"


@pytest.mark.parametrize("name", _subcommands())
def test_each_subcommand_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _main([name, "--help"], capsys)
    assert code == 0
    assert out.startswith(f"usage: kvdecode {name}")


def test_console_script_points_at_main() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["kvdecode"] == "kvdecode.cli:main"


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], "the following arguments are required: COMMAND"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["demo", "--steps", "x"], "invalid int value: 'x'"),
        (["demo", "--backend", "nope"], "invalid choice: 'nope'"),
        (["demo", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["demo", "--steps", "0"], "--steps must be in 1.."),  # KVDecodeError inside the subcommand
        (["demo", "--device", "tpu"], "--device must be 'cpu' or 'cuda[:N]', got 'tpu'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _main(argv, capsys)
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kvdecode") and ": error: " in lines[0]
    assert expected in lines[0]


def test_kvdecode_error_inside_prints_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(**kwargs: object) -> int:
        raise KVDecodeError("steps must be small,\ngot many; use fewer")

    monkeypatch.setattr(demo, "run_demo", broken)
    code, out, err = _main(["demo"], capsys)
    assert (code, out) == (2, "")
    assert err == "kvdecode: error: steps must be small, got many; use fewer\n"


def test_other_exceptions_are_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(**kwargs: object) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(demo, "run_demo", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["demo"])


def _info(capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    code, out, err = _main(["info"], capsys)
    assert (code, err) == (0, "")
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())
    return rows


def test_info_without_gpu(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rows = _info(capsys)
    assert rows["device"] == "no CUDA device"
    assert rows["kvdecode"] == kvdecode.__version__
    assert rows["torch"].startswith(torch.__version__)
    assert rows["triton"] == __import__("triton").__version__
    assert rows["triton interpreter"].startswith(("on", "off"))
    for key in ("cudnn frontend", "cuDNN library", "torch's cuDNN", "triton cache dir", "python"):
        assert rows[key], key


def test_info_reports_missing_pieces(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "cudnn", None)  # `import cudnn` now raises ImportError

    def no_device() -> str:
        raise RuntimeError("driver exploded\nsecond line")

    monkeypatch.setattr(cli, "_device", no_device)
    rows = _info(capsys)
    assert rows["cudnn frontend"].startswith("unavailable (ModuleNotFoundError: ")
    assert rows["cuDNN library"].startswith("unavailable (ModuleNotFoundError: ")
    assert rows["device"] == "unavailable (RuntimeError: driver exploded)"
    assert rows["torch"].startswith(torch.__version__)


def _parse_demo(stdout: str) -> list[re.Match]:
    return [m for m in map(ROW.match, stdout.splitlines()) if m]


def test_demo_cpu_end_to_end() -> None:
    result = _run("demo", "--device", "cpu", "--steps", "3", "--seed", "7", env={"TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "reduced size on the CPU" in lines[0] and "interpreter" in lines[0]
    assert "H_q 8, H_kv 2, D 64, capacity 256, bfloat16" in lines[1]
    assert re.search(r"^planner: triton ", result.stdout, re.M)
    rows = _parse_demo(result.stdout)
    assert [int(m[1]) for m in rows] == [1, 2, 3]
    lens = [[int(n) for n in m[2].split(",")] for m in rows]
    assert len(set(lens[0])) == 4 and all(1 <= n <= 256 for n in lens[-1])  # ragged, within capacity
    assert lens[1] == [n + 1 for n in lens[0]] and lens[2] == [n + 1 for n in lens[1]]
    for m, row_lens in zip(rows, lens):
        assert m[3] == "triton"
        seconds, gbps = float(m[4]) * 1e-3, float(m[5])  # time in ms on the CPU
        kv_bytes = 2 * sum(row_lens) * 2 * 64 * 2  # K and V actually read: 2 * sum(L) * H_kv * D * bf16
        assert seconds > 0 and gbps * 1e9 * seconds == pytest.approx(kv_bytes, rel=0.01)
        assert float(m[6]) <= TOLERANCES[torch.bfloat16].rel_l2 and m[7] == "ok"
    assert lines[-1].startswith("all 3 steps match the float64 reference")


@pytest.mark.parametrize("wrong", ["zeros", "unwritten"])
def test_demo_fails_when_a_check_fails(wrong: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def bad_decode(q, k_cache, v_cache, seq_lens, *, out, **kwargs):
        if wrong == "zeros":
            out.zero_()
        return out  # "unwritten": out keeps the NaN poison

    monkeypatch.setattr(demo, "decode_attention", bad_decode)
    lines: list[str] = []
    code = demo.run_demo(steps=2, device="cpu", backend="reference", emit=lines.append)
    assert code == 1
    assert lines[-1].startswith("FAILED: step(s) 1, 2 differ from the float64 reference")
    assert sum("FAIL (> 0.004)" in line for line in lines) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_demo_gpu_full_size() -> None:
    result = _run("demo", "--steps", "3", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "SMs" in lines[0]
    assert "H_q 32, H_kv 8, D 128, capacity 4096, bfloat16" in lines[1]
    rows = _parse_demo(result.stdout)
    assert len(rows) == 3 and all(m[7] == "ok" for m in rows)
