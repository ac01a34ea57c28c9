"""glibc malloc tuning: freed tensor memory is reused instead of being page-faulted back in."""

import subprocess
import sys

import pytest

from tests.conftest import REPO

# ten forward passes of a small 1x1-conv block (a 19 MB hidden activation, as a CNN's are); print
# the minor page faults they cost
PROBE = """
import resource, sys, torch
if sys.argv[1] == "tuned":
    from capcli.allocator import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()  # once per process; True again after
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(16, 64, 1), torch.nn.GELU(), torch.nn.Conv2d(64, 16, 1), torch.nn.GELU())
x = torch.randn(8, 16, 96, 96)
with torch.inference_mode():
    net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        net(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str, env_extra: dict | None = None) -> int:
    import os

    env = {k: v for k, v in os.environ.items() if not (k.startswith("MALLOC_") or k == "CAPCLI_SYSTEM_MALLOC")}
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_blocks_are_reused_instead_of_page_faulted_back():
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").gnu_get_libc_version
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    plain, tuned = faults("plain"), faults("tuned")
    assert plain > 1000  # glibc's default: big blocks handed back and faulted in again, 4 KB at a time
    assert tuned < plain / 20, (plain, tuned)


def test_opt_out_leaves_malloc_alone(monkeypatch):
    import capcli.allocator as allocator

    monkeypatch.setattr(allocator, "_done", None)
    monkeypatch.setenv("CAPCLI_SYSTEM_MALLOC", "1")
    assert allocator.keep_freed_memory() is False
    monkeypatch.setattr(allocator, "_done", None)
    monkeypatch.delenv("CAPCLI_SYSTEM_MALLOC")
    monkeypatch.setenv("MALLOC_ARENA_MAX_", "2")  # the user's own glibc tuning wins
    assert allocator.keep_freed_memory() is False


def test_the_command_line_tunes_malloc_at_start(monkeypatch):
    import capcli.cli.main as cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(sys, "argv", ["capcli", "--version"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 0 and calls == [1]


def _run_python(code: str) -> str:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_model_commands_import_torch_with_the_collector_paused_then_frozen():
    # a model command (evaluate, stopped by a user error after the wrapper ran) imports timm once,
    # freezes what the imports made and leaves the collector on; a prepare command imports no torch
    code = """
import gc, sys
from typer.testing import CliRunner
from capcli.cli.main import app
r = CliRunner().invoke(app, ["prepare", "folder", "--images", "/nonexistent-dir", "--captions", "/nonexistent.csv", "--out", "/nonexistent-out"])
print(r.exit_code, "torch" in sys.modules)
r = CliRunner().invoke(app, ["evaluate"])
print(r.exit_code, "timm" in sys.modules, gc.isenabled(), gc.get_freeze_count() > 100000)
"""
    assert _run_python(code).split("\n") == ["1 False", "1 True True True"]


def test_main_freezes_the_heap_on_the_way_out():
    code = """
import gc, sys
from capcli.cli import main
sys.argv = ["capcli", "--version"]
try:
    main.main()
except SystemExit:
    pass
print(gc.get_freeze_count() > 0)
"""
    assert _run_python(code).split("\n")[-1] == "True"
