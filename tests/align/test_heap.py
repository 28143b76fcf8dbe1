"""align/train/heap.py: with `keep_freed_memory`, the large temporaries of steps after the first
few are served from the process's heap, nearly without page faults; `prefloop align`
sets it when it is its own process (cli/main.py), not when a caller imports the CLI and passes
its arguments."""
from __future__ import annotations

import subprocess
import sys

import pytest

MEASURE = """
import resource, torch
def step():  # temporaries of a training step's sizes, some alive together, all freed at its end
    a, b, c = torch.ones(32 << 18), torch.ones(256 << 18), torch.ones(128 << 18)
    del b
    d = torch.ones(64 << 18)
def faults_of_later_steps():
    for _ in range(6):  # the heap's free blocks settle in 3 to 5 steps
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
"""


def faults(setup: str) -> int:
    out = subprocess.run([sys.executable, "-c", setup + MEASURE +
                          "print(faults_of_later_steps())"],
                         capture_output=True, text=True, check=True, timeout=120)
    return int(out.stdout.split()[-1])


glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")


@glibc
def test_kept_freed_memory_serves_the_next_large_block_without_page_faults():
    plain = faults("")
    kept = faults("from prefloop.align.train.heap import keep_freed_memory\n"
                  "assert keep_freed_memory()\n")
    assert plain > 1000  # every 4 KiB page of each block, faulted in again from a fresh mmap
    # 0 in most processes; where the heap's layout leaves one block to fault in again, that
    # block's pages only (1/15 of them all)
    assert kept < plain / 8


def test_the_align_command_keeps_freed_memory_only_as_its_own_process(tmp_path):
    def run(argv: list[str], call: str) -> list[str]:
        code = ("import sys\n"
                "from prefloop.align.train import heap\n"
                "heap.keep_freed_memory = lambda: print('kept')\n"
                f"sys.argv = ['prefloop', *{argv!r}]\n"
                "from prefloop.cli.main import main\n"
                f"assert {call} == 0\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-500:]
        return out.stdout.split()
    jobs = ["align", "jobs", "--data-dir", str(tmp_path)]
    assert "kept" in run(jobs, "main()")
    assert "kept" not in run(jobs, "main(sys.argv[1:])")  # a caller passing its arguments
    # its own process, another command
    assert "kept" not in run(["models", "list", "--data-dir", str(tmp_path)], "main()")
