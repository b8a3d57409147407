"""The sandbox: hostile programs fail, the harness survives, nothing outside the sandbox changes."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time

import pytest

from mg_editing import sandbox
from mg_editing.sandbox import (
    ALLOW_CODE_EVAL_ENV,
    CodeExecutionNotAllowedError,
    ExecutionResult,
    run_many,
    run_program,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox's OS layers are Linux-specific")

IS_ROOT = os.geteuid() == 0


def run(program: str, **kwargs) -> ExecutionResult:
    kwargs.setdefault("timeout", 2.0)
    return run_program(program, allow_code_execution=True, **kwargs)


@pytest.fixture(autouse=True)
def sandbox_parent(monkeypatch, tmp_path_factory):
    """Sandbox directories go to a fresh parent, which must be empty again after each test."""
    tmp_path_factory.getbasetemp()  # pytest's own temp root stays where it was
    parent = tempfile.mkdtemp(prefix="mg-edit-test-")
    os.chmod(parent, 0o755)  # reachable by the unprivileged sandbox user
    monkeypatch.setattr(tempfile, "tempdir", parent)
    yield parent
    leftovers = os.listdir(parent)
    os.rmdir(parent) if not leftovers else None
    assert leftovers == [], "sandbox directories were not removed"


@pytest.fixture
def decoy(tmp_path, monkeypatch):
    """A directory with a file that hostile programs aim at; the harness's HOME points at it,
    so even a leaked HOME could only ever hit the decoy, never the real home directory."""
    home = tmp_path / "decoy_home"
    home.mkdir()
    precious = home / "precious.txt"
    precious.write_text("keep me")
    monkeypatch.setenv("HOME", str(home))
    yield home
    assert precious.read_text() == "keep me"
    assert sorted(p.name for p in home.iterdir()) == ["precious.txt"]


def assert_harness_goes_on() -> None:
    assert run("assert sum(range(4)) == 6").passed


# --- opt-in ----------------------------------------------------------------------------------


def test_refuses_without_opt_in(monkeypatch):
    monkeypatch.delenv(ALLOW_CODE_EVAL_ENV, raising=False)
    for call in (lambda: run_program("x = 1"), lambda: run_many(["x = 1"])):
        with pytest.raises(CodeExecutionNotAllowedError, match=ALLOW_CODE_EVAL_ENV) as info:
            call()
        assert "allow_code_execution=True" in str(info.value)
        assert "untrusted" in str(info.value)


def test_env_var_opts_in_and_explicit_false_refuses(monkeypatch):
    monkeypatch.setenv(ALLOW_CODE_EVAL_ENV, "1")
    assert run_program("x = 1").passed
    with pytest.raises(CodeExecutionNotAllowedError):
        run_program("x = 1", allow_code_execution=False)
    monkeypatch.setenv(ALLOW_CODE_EVAL_ENV, "yes")  # only the exact value "1" counts
    with pytest.raises(CodeExecutionNotAllowedError):
        run_program("x = 1")


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        run("x = 1", timeout=0)
    with pytest.raises(TypeError):
        run(b"x = 1")


# --- ordinary programs -----------------------------------------------------------------------


def test_correct_program_passes():
    result = run("import math, typing, collections, hashlib\nassert math.gcd(12, 18) == 6\n")
    assert result == ExecutionResult(True, "passed", result.returncode, result.duration_s)


def test_failing_program_reports_the_exception():
    result = run("def f():\n    return 1\nassert f() == 2, 'wrong answer'\n")
    assert not result.passed
    assert result.status == "failed: AssertionError: wrong answer"


def test_child_lives_in_its_own_scrubbed_directory(decoy, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    program = (
        "import os, tempfile\n"
        "cwd = os.path.realpath(os.getcwd())\n"
        f"assert os.environ['HOME'] != {str(decoy)!r}\n"
        "assert os.path.realpath(os.environ['HOME']) == cwd\n"
        "assert os.path.realpath(tempfile.gettempdir()).startswith(cwd)\n"
        "assert 'SECRET_TOKEN' not in os.environ\n"
        "open('scratch.txt', 'w').write('writing inside the sandbox is fine')\n"
    )
    assert run(program).passed


def test_run_many_preserves_order():
    programs = ["assert 1 + 1 == 2", "assert False", "x = 1", "raise KeyError('k')", "while True: pass"]
    results = run_many(programs, workers=3, timeout=1.0, allow_code_execution=True)
    assert [r.passed for r in results] == [True, False, True, False, False]
    assert results[3].status.startswith("failed: KeyError")
    assert results[4].status == "timed out"


# --- hostile programs ------------------------------------------------------------------------


def test_infinite_loop_times_out():
    start = time.monotonic()
    result = run("while True:\n    pass\n", timeout=1.0)
    assert (result.passed, result.status) == (False, "timed out")
    assert time.monotonic() - start < 1.0 + sandbox._STARTUP_GRACE_S + 2
    assert_harness_goes_on()


def test_timeout_that_swallows_exceptions_is_still_killed():
    program = "import time\nwhile True:\n    try:\n        time.sleep(10)\n    except BaseException:\n        pass\n"
    result = run(program, timeout=0.5)
    assert (result.passed, result.status) == (False, "timed out")


@pytest.mark.parametrize("guard", [True, False], ids=["python-guard", "os-layer-only"])
def test_fork_bomb_fails_fast(guard):
    start = time.monotonic()
    result = run("import os\nwhile True:\n    os.fork()\n", guard=guard)
    assert not result.passed
    assert time.monotonic() - start < 5  # refused at once, not killed by the timeout
    assert result.status != "timed out"
    assert_harness_goes_on()


def test_subprocess_and_threads_are_refused():
    assert run("import subprocess\nsubprocess.run(['true'])\n").status == "blocked: subprocess.Popen"
    assert run("import ctypes\n").status.startswith("failed: ModuleNotFoundError")
    # RLIMIT_NPROC=0: no new tasks of any kind, threads included.
    result = run("import threading\nt = threading.Thread(target=print)\nt.start()\n")
    assert not result.passed


def test_huge_allocation_hits_the_memory_limit():
    result = run("x = bytearray(50 * 10**9)\n", memory_mb=512)
    assert (result.passed, result.status) == (False, "memory")
    assert_harness_goes_on()


def test_rm_rf_home_and_decoy_are_blocked(decoy):
    precious = decoy / "precious.txt"
    attacks = [
        "import os\nos.system('rm -rf ~')\n",
        f"import os\nos.system('rm -rf {decoy}')\n",
        f"import shutil\nshutil.rmtree({str(decoy)!r})\n",
        f"import os\nos.remove({str(precious)!r})\n",
        f"import pathlib\npathlib.Path({str(precious)!r}).unlink()\n",
        f"open({str(precious)!r}, 'w').write('overwritten')\n",
        f"import os\nos.rename({str(precious)!r}, {str(precious)!r} + '.bak')\n",
    ]
    for attack in attacks:
        result = run(attack)
        assert not result.passed, attack
        assert result.status.startswith("blocked"), (attack, result.status)
        assert precious.read_text() == "keep me"
    assert_harness_goes_on()


def test_blocked_call_fails_even_when_the_program_swallows_the_error():
    result = run("import os\ntry:\n    os.system('true')\nexcept Exception:\n    pass\n")
    assert (result.passed, result.status) == (False, "blocked: os.system")


@pytest.mark.skipif(not IS_ROOT, reason="only a root harness drops the child to an unprivileged user")
def test_os_layer_protects_files_without_the_python_guard(decoy):
    precious = decoy / "precious.txt"
    for attack in (f"import shutil\nshutil.rmtree({str(decoy)!r})\n",
                   f"open({str(precious)!r}, 'w').write('overwritten')\n",
                   f"import os\nos.system('rm -rf {decoy}')\nassert os.path.exists({str(precious)!r})\n"):
        run(attack, guard=False)
        assert precious.read_text() == "keep me"


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    yield server
    server.close()


def _assert_no_connection(server) -> None:
    with pytest.raises(socket.timeout):
        server.accept()


def test_socket_connect_is_blocked(listener):
    port = listener.getsockname()[1]
    result = run(f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n")
    assert (result.passed, result.status) == (False, "blocked: socket.socket")
    result = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n")
    assert not result.passed
    _assert_no_connection(listener)
    assert_harness_goes_on()


@pytest.mark.skipif(not sandbox._namespace_prefix(), reason="no network namespace available here")
def test_network_namespace_without_the_python_guard(listener):
    port = listener.getsockname()[1]
    result = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n", guard=False)
    assert not result.passed
    _assert_no_connection(listener)


@pytest.mark.parametrize("exit_call", ["import os\nos._exit(0)", "import sys\nsys.exit(0)", "exit(0)", "raise SystemExit"])
def test_exit_before_the_tests_is_a_failure(exit_call):
    program = f"{exit_call}\nassert False, 'the tests would fail'\n"
    result = run(program)
    assert not result.passed
    assert "exit" in result.status.lower()
    assert_harness_goes_on()


@pytest.mark.parametrize("guard", [True, False], ids=["python-guard", "os-layer-only"])
def test_killing_the_parent_does_not_hurt_the_harness(guard):
    harness = os.getpid()
    program = f"import os, signal\nos.kill(os.getppid(), 9)\nos.kill({harness}, signal.SIGKILL)\n"
    result = run(program, guard=guard)
    assert not result.passed  # and we are still alive to check it
    assert_harness_goes_on()


def test_hostile_batch_in_parallel(decoy):
    programs = [
        "while True: pass",
        "import os\nwhile True: os.fork()",
        "x = bytearray(50 * 10**9)",
        "import os\nos.system('rm -rf ~')",
        "import os\nos._exit(0)",
        "import os\nos.kill(os.getppid(), 9)",
        "assert 2 + 2 == 4",
    ]
    results = run_many(programs, workers=4, timeout=1.0, memory_mb=512, allow_code_execution=True)
    assert [r.passed for r in results] == [False] * 6 + [True]
