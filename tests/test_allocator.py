"""The allocator setting (`finetune.allocator`): memory a step frees is reused by the next, not mapped and zeroed again
by the kernel; and every training run sets it."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
from conftest import TINY, run_cli_in_process

import finetune.training.run
from finetune import allocator

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")

# Five times what a step does: 64 MB of activations asked for, written, freed. Prints the page faults it took.
STEPS = """
import resource, sys, torch
from finetune.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():
    block = torch.empty(16 * 2**20)  # 64 MB of float32
    block.fill_(1.0)
    del block
for _ in range(5):  # the first times, pages are new either way, while the heap settles its layout
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(setting: str) -> int:
    result = subprocess.run([sys.executable, "-c", STEPS, setting], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


@glibc
def test_memory_a_step_frees_is_reused_by_the_next_without_page_faults():
    # 5 x 64 MB is 81,920 pages of 4 KB: by default glibc unmaps the block at each free and the kernel maps and
    # zeroes every page again, five times; kept, the next step writes into the same pages (at most once more, 16,384
    # pages, where another thread took the heap's top in between).
    block = 16 * 2**20 * 4 // 4096
    assert page_faults("default") >= 5 * block
    assert page_faults("keep") <= block + 100


def test_every_training_run_keeps_freed_memory(tmp_path, image_folder, monkeypatch):
    calls = []
    monkeypatch.setattr(finetune.training.run, "keep_freed_memory", lambda: calls.append(True))
    run_cli_in_process(tmp_path, *TINY, f"data.root={image_folder}", "trainer.max_epochs=1")
    assert calls == [True]


def test_off_glibc_nothing_is_set(monkeypatch):
    allocator.keep_freed_memory.cache_clear()
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    try:
        assert allocator.keep_freed_memory() is False
    finally:
        allocator.keep_freed_memory.cache_clear()
