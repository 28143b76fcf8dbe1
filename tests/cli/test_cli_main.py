"""The `prefloop` command line as a user meets it (subprocess `python -m prefloop.cli`):
defaults in --help, a typo'd flag answered with the subcommand's usage and the closest flag,
mistakes that need no model reported before torch is even imported, and `--dtype auto`."""
import logging
import subprocess
import sys
import time

import pytest

from prefloop.server.model.options import auto_dtype, cpu_bf16_flags

CLI = [sys.executable, "-m", "prefloop.cli"]


def prefloop(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_typo_prints_the_subcommands_usage_and_the_closest_flag():
    res = prefloop("generate", "hi", "--max-tokns", "3")
    assert res.returncode == 2
    assert res.stderr.startswith("usage: prefloop generate")  # not the top-level usage
    assert "did you mean --max-tokens?" in res.stderr
    res = prefloop("chat", "--top-pp", "0.9")
    assert res.returncode == 2 and res.stderr.startswith("usage: prefloop chat")
    assert "unrecognized arguments: --top-pp (did you mean --top-p?) 0.9" in res.stderr
    res = prefloop("generate", "hi", "--zzzzzz")
    assert res.returncode == 2 and "unrecognized arguments: --zzzzzz" in res.stderr
    assert "did you mean" not in res.stderr


def test_help_shows_defaults_and_every_flag_has_help():
    out = " ".join(prefloop("generate", "--help").stdout.split())  # help lines wrap anywhere
    assert "(default: 128)" in out and "(default: 1.0)" in out and "(default: auto)" in out
    chat = " ".join(prefloop("chat", "--help").stdout.split())
    top_p = chat[chat.index("--top-p TOP_P "):]
    assert "nucleus sampling" in top_p.split("--seed SEED")[0]
    assert "seed of each answer" in chat[chat.index("--seed SEED "):]
    from prefloop.cli.main import build_parser
    for command in ("generate", "chat", "rope", "bench"):
        parser = build_parser([command])
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        missing = [a.option_strings for a in sub._actions if a.option_strings and not a.help]
        assert not missing, f"{command}: flags without help {missing}"


@pytest.mark.parametrize("args,message", [
    (("generate", ""), "prompt is empty"),
    (("generate", "hi", "--model", "/no/such/model"), "model path '/no/such/model' does not exist"),
    (("generate", "hi", "--temperature", "inf"), "temperature must be a finite number"),
    (("generate", "hi", "--frequency-penalty", "3"), "frequency_penalty must be in [-2, 2]"),
])
def test_generate_refuses_at_once_before_torch_is_imported(args, message):
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-X", "importtime", *CLI[1:], *args], capture_output=True,
                         text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert res.returncode == 2 and message in res.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if "|" in line]
    assert "torch" not in imported and not any(m.startswith("torch.") for m in imported)
    assert "building" not in res.stderr and "loaded" not in res.stderr
    assert elapsed < 3.0, elapsed  # was 16-59 s (a kernel build / a model load first)


def test_dtype_auto_is_bf16_on_native_bf16_cpus_and_cuda_else_float32(caplog):
    with_bf16 = "processor : 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n"
    with_amx = "flags\t\t: fpu avx2 amx_bf16\n"
    without = "flags\t\t: fpu sse avx2 avx512f\n"
    assert cpu_bf16_flags(with_bf16) == ["avx512_bf16"]
    assert auto_dtype("cpu", cpuinfo=with_bf16)[0] == "bfloat16"
    assert auto_dtype("cpu", cpuinfo=with_amx)[0] == "bfloat16"
    assert auto_dtype("cpu", cpuinfo=without) == ("float32", "this CPU has no native bf16 "
                                                             "(no avx512_bf16 / amx_bf16)")
    assert auto_dtype("cuda", cpuinfo=without)[0] == "bfloat16"
    from prefloop.server.serving.build import resolve_dtype
    with caplog.at_level(logging.INFO, logger="prefloop.server.serving.build"):
        chosen = resolve_dtype("auto", "cpu")
    assert chosen == auto_dtype("cpu")[0]
    assert [r.getMessage() for r in caplog.records] == [f"--dtype auto: {chosen} ({auto_dtype('cpu')[1]})"]
    assert resolve_dtype("float32", "cpu") == "float32"


def test_dtype_auto_is_the_default_of_every_model_command():
    import argparse
    import inspect

    from prefloop.cli.model_args import add_model_arguments, generator_kwargs
    from prefloop.server.serving.build import build_generator
    p = argparse.ArgumentParser()
    add_model_arguments(p)
    assert generator_kwargs(p.parse_args([]))["dtype"] == "auto"
    assert generator_kwargs(p.parse_args(["--dtype", "float32"]))["dtype"] == "float32"
    assert inspect.signature(build_generator).parameters["dtype"].default == "auto"


def test_serve_runs_on_uvloop_by_default_and_refuses_a_missing_one_before_loading(tmp_path):
    """`--event-loop auto` takes uvloop (a dependency), `asyncio` the standard loop; asking for
    uvloop where it cannot be imported is a one-line error before torch or a model is loaded."""
    import os

    import uvloop

    from prefloop.cli.serve import _loop_factory
    assert _loop_factory("auto") is uvloop.new_event_loop is _loop_factory("uvloop")
    assert _loop_factory("asyncio") is None
    hidden = tmp_path / "hide" / "uvloop"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    env = {**os.environ, "PYTHONPATH": f"{hidden.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run([sys.executable, "-X", "importtime", *CLI[1:], "serve", "--event-loop", "uvloop",
                          "--data-dir", str(tmp_path / "data"), "--port", "0"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 2
    assert "--event-loop uvloop: uvloop is not installed" in res.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if "|" in line]
    assert "torch" not in imported


@pytest.mark.parametrize("value", ["0", "nan"])
def test_serve_refuses_a_bad_default_repetition_penalty_before_loading(tmp_path, value):
    res = subprocess.run([sys.executable, "-X", "importtime", *CLI[1:], "serve",
                          "--default-repetition-penalty", value, "--data-dir", str(tmp_path / "data"),
                          "--port", "0", "--http-port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert f"default repetition_penalty must be a finite number > 0 (1 = off), got {float(value)}" \
        in res.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if "|" in line]
    assert "torch" not in imported
