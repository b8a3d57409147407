"""The documentation runs: every fenced code block in README.md and docs/**/*.md is executed
here, or is marked as not executed with a reason; docs/api.md is up to date.

Marker syntax: HTML comments (invisible on GitHub) on the lines directly above a block's
opening fence, one marker per line, no blank line in between:

    <!-- not-executed: REASON -->
        The block is not run. REASON is required and says why (``needs the network (a Hub
        model id)``, ``output``, ``takes ~9 min; tests/test_pipeline.py covers it``...).
    <!-- run-with: `OLD` -> `NEW`; `OLD2` -> `NEW2` (NOTE) -->
        The block is run after replacing each OLD by NEW, literally; each OLD must occur in
        the block. The NOTE (free text outside the backticks) says why and where NEW comes from.
    <!-- slow: REASON -->
        The block runs only as a ``@pytest.mark.slow`` test (needs the demo model, or takes
        more than ~20 s); REASON says which.

Every other ```python / ```bash / ```sh block runs, each on its own: a python block in a fresh
interpreter (``python block.py``), a shell block with ``bash -euo pipefail``, in a fresh
temporary working directory with no network (``HF_HUB_OFFLINE=1``). So every block must be
self-contained, as for a reader who copies just that one. A block may use these files, which
the test puts in the working directory: ``tiny-codegen/`` (a 3-layer random CodeGen with its
tokenizer, ``tests/conftest.py::save_tiny_model``; for ``run-with`` in place of a Hub model
id). Blocks in any other language (```text, ```json, no language) must be marked not-executed.

docs/api.md is generated (``python -m mg_editing._apidoc > docs/api.md``), so this test
skips its blocks (docstrings and signatures, not examples to run) and instead checks that the
committed file equals freshly generated output.
"""

from __future__ import annotations

import difflib
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
API_DOC = ROOT / "docs" / "api.md"
REGENERATE = "python -m mg_editing._apidoc > docs/api.md"
#: Generated files: not scanned for blocks (see the module docstring).
GENERATED = (API_DOC,)

RUNNABLE = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
MARKERS = ("not-executed", "run-with", "slow")
FAST_TIMEOUT_S = 90  # a default-suite block should take < ~20 s; this only catches hangs
SLOW_TIMEOUT_S = 900

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_COMMENT = re.compile(r"^\s*<!--(?P<body>.*?)-->\s*$")
_MARKER = re.compile(r"^\s*(?P<name>[a-z-]+)\s*:(?P<value>.*)$", re.S)
_PAIR = re.compile(r"`(?P<old>[^`]+)`\s*->\s*`(?P<new>[^`]*)`")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [f for f in files if f not in GENERATED]


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    markers: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{_rel(self.path)}:{self.line}"

    @property
    def executed(self) -> bool:
        return "not-executed" not in self.markers and self.lang in RUNNABLE

    def replacements(self) -> list[tuple[str, str]]:
        return [(m["old"], m["new"]) for m in _PAIR.finditer(self.markers.get("run-with", ""))]

    def code_to_run(self) -> str:
        code = self.code
        for old, new in self.replacements():
            code = code.replace(old, new)
        return code


def parse_markdown(path: Path, text: str | None = None) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a Markdown file with their markers, and file-level problems
    (markers that stand above no block, unclosed fences)."""
    lines = (path.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    used_marker_lines: set[int] = set()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = len(m["indent"]), m["fence"], m["info"].strip()
        close = re.compile(rf"^ {{0,{indent + 3}}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        rel = _rel(path)
        if j == len(lines):
            problems.append(f"{rel}:{i + 1}: the code block is never closed")
        body = [ln[indent:] if ln[:indent].strip() == "" else ln.lstrip() for ln in lines[i + 1 : j]]
        block = Block(path, i + 1, info.split()[0].lower() if info else "", "\n".join(body) + "\n")
        # markers: the comment lines directly above the fence
        k = i - 1
        while k >= 0 and _COMMENT.match(lines[k]):
            used_marker_lines.add(k)
            body_text = _COMMENT.match(lines[k])["body"]
            marker = _MARKER.match(body_text)
            name = marker["name"] if marker else None
            if name not in MARKERS:
                block.problems.append(
                    f"the comment {lines[k].strip()!r} directly above the block is not a marker "
                    f"({', '.join(f'<!-- {n}: ... -->' for n in MARKERS)}); put a blank line between them if it is not meant as one")
            elif name in block.markers:
                block.problems.append(f"two {name} markers")
            else:
                block.markers[name] = marker["value"].strip()
            k -= 1
        blocks.append(block)
        i = j + 1
    for n, line in enumerate(lines):
        c = _COMMENT.match(line)
        if c and n not in used_marker_lines:
            marker = _MARKER.match(c["body"])
            if marker and marker["name"] in MARKERS:
                rel = _rel(path)
                problems.append(f"{rel}:{n + 1}: the marker {line.strip()!r} stands above no code block "
                                "(markers go on the lines directly above the opening fence)")
    return blocks, problems


def check_block(block: Block) -> list[str]:
    """What is wrong with a block's markers; empty when it runs or says why it does not."""
    problems = list(block.problems)
    markers = block.markers
    if "not-executed" in markers:
        if len(markers["not-executed"]) < 3:
            problems.append("<!-- not-executed: REASON --> needs a reason")
        for other in ("run-with", "slow"):
            if other in markers:
                problems.append(f"not-executed and {other} contradict each other")
    elif block.lang not in RUNNABLE:
        what = f"```{block.lang}" if block.lang else "a block without a language"
        problems.append(f"{what} cannot be run: mark it <!-- not-executed: REASON --> (e.g. `output`)")
    if "slow" in markers and len(markers["slow"]) < 3:
        problems.append("<!-- slow: REASON --> needs a reason")
    if "run-with" in markers:
        pairs = block.replacements()
        if not pairs:
            problems.append("<!-- run-with: `OLD` -> `NEW` (NOTE) --> names no `OLD` -> `NEW` replacement")
        for old, _ in pairs:
            if old not in block.code:
                problems.append(f"run-with replaces `{old}`, which is not in the block")
    return [f"{block.where}: {p}" for p in problems]


def all_blocks() -> tuple[list[Block], list[str]]:
    blocks, problems = [], []
    for path in doc_files():
        found, file_problems = parse_markdown(path)
        blocks += found
        problems += file_problems
    return blocks, problems


BLOCKS, FILE_PROBLEMS = all_blocks()


# -- the markers ----------------------------------------------------------------------------
def test_every_block_runs_or_says_why():
    problems = FILE_PROBLEMS + [p for b in BLOCKS for p in check_block(b)]
    assert not problems, "Code blocks in the documentation that neither run nor say why:\n" + "\n".join(problems)


def test_the_checker_catches_what_it_should(tmp_path):
    text = "\n".join([
        "```text", "a table", "```",                                  # 1: text, unmarked
        "<!-- not-executed: -->", "```python", "print(1)", "```",     # 4: marker without reason
        "<!-- run-with: `\"x\"` -> `\"y\"` (demo) -->", "```python", "print('z')", "```",  # 8: OLD missing
        "<!-- not-excuted: typo -->", "```bash", "true", "```",       # 12: misspelt marker
        "<!-- slow: needs the demo model -->", "", "text",            # 16: marker above no block
        "<!-- not-executed: output -->", "```", "42", "```",          # 19: fine
        "<!-- run-with: `1` -> `2` (cheaper) -->", "```python", "print(1)", "```",  # 23: fine
    ])
    path = tmp_path / "doc.md"
    blocks, problems = parse_markdown(path, text)
    for block in blocks:
        problems += check_block(block)
    lines = sorted({int(p.split(":")[1]) for p in problems})
    assert lines == [1, 5, 9, 13, 16], problems
    fine = [b for b in blocks if b.line == 24][0]
    assert fine.executed and fine.code_to_run() == "print(2)\n"
    assert not blocks[4].executed  # not-executed


def test_markers_are_documented():
    guide = (ROOT / "docs" / "guide.md").read_text(encoding="utf-8")
    for name in MARKERS:
        assert f"<!-- {name}:" in guide, f"docs/guide.md should document the {name} marker"


# -- running the blocks ---------------------------------------------------------------------
def _params():
    params = []
    for block in BLOCKS:
        if block.executed:
            marks = [pytest.mark.slow] if "slow" in block.markers else []
            params.append(pytest.param(block, id=block.where, marks=marks))
    return params


def _fixtures(workdir: Path, code: str) -> None:
    if "tiny-codegen" in code:
        save_tiny_model(workdir / "tiny-codegen", "codegen")


@pytest.mark.parametrize("block", _params())
def test_block_runs(block: Block, tmp_path):
    code = block.code_to_run()
    _fixtures(tmp_path, code)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if RUNNABLE[block.lang] == "python":
        script = tmp_path / "block.py"
        script.write_text(code)
        command = [sys.executable, str(script)]
    else:
        command = ["bash", "-euo", "pipefail", "-c", code]
    timeout = SLOW_TIMEOUT_S if "slow" in block.markers else FAST_TIMEOUT_S
    # its own session, so that a timeout ends everything the block started, not just its shell
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, encoding="utf-8", errors="replace", start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{block.where}: still running after {timeout} s" +
                    ("" if "slow" in block.markers else "; if it is meant to take long, mark it <!-- slow: REASON -->"))
    assert proc.returncode == 0, (
        f"{block.where}: exit status {proc.returncode}\n--- the block as run ---\n{code}"
        f"--- stdout (tail) ---\n{stdout[-3000:]}\n--- stderr (tail) ---\n{stderr[-4000:]}"
    )
    for expected in EXPECTED_OUTPUTS.get(block.where, ()):
        assert (tmp_path / expected).exists(), f"{block.where}: the block should have written {expected}"


#: Files a block says it writes, checked after it ran (by ``file:line`` of the block).
EXPECTED_OUTPUTS: dict[str, tuple[str, ...]] = {}


def _expect(path: str, needle: str, *outputs: str) -> None:
    for block in BLOCKS:
        if _rel(block.path) == path and needle in block.code:
            EXPECTED_OUTPUTS[block.where] = outputs


_expect("README.md", 'save_pretrained("codegen-350M-mg-edit-row")',
        "codegen-350M-mg-edit-row/adapter_config.json", "codegen-350M-mg-edit-row/adapter_model.safetensors")
_expect("docs/guide.md", 'save_pretrained("demo-mg-edit-row")',
        "demo-mg-edit-row/adapter_model.safetensors", "demo-mg-edit-row-merged/config.json")


def test_some_blocks_run_in_the_default_suite():
    executed = [b for b in BLOCKS if b.executed]
    assert any("slow" not in b.markers for b in executed), "no documentation block runs in the fast tests"


# -- links and the API reference ------------------------------------------------------------
_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def test_relative_links_resolve():
    broken = []
    for path in [*doc_files(), *GENERATED]:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in _LINK.finditer(line):
                target = m["target"].split("#")[0]
                if not target or re.match(r"^[a-z]+:", target):
                    continue
                if not (path.parent / target).exists():
                    broken.append(f"{_rel(path)}:{n}: {m['target']}")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_api_reference_is_linked():
    assert "docs/api.md" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert "api.md" in (ROOT / "docs" / "guide.md").read_text(encoding="utf-8")


def test_api_reference_is_up_to_date():
    done = subprocess.run([sys.executable, "-m", "mg_editing._apidoc"], cwd=ROOT, capture_output=True, text=True,
                          encoding="utf-8", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    committed = API_DOC.read_text(encoding="utf-8") if API_DOC.is_file() else ""
    if committed != done.stdout:
        diff = "".join(list(difflib.unified_diff(
            committed.splitlines(True), done.stdout.splitlines(True), "docs/api.md (committed)", "generated"))[:60])
        pytest.fail(f"docs/api.md is out of date with the docstrings; regenerate it from the repository root with\n\n"
                    f"    {REGENERATE}\n\nand commit it. First differences:\n{diff}")
