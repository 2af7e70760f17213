"""The documented commands: what they write inside the checkout is git-ignored, and README examples do not
overwrite each other's output."""
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Where commands write when no output flag is given (sample's grid, train-digits' runs, build/bench exports).
DEFAULT_OUTPUTS = ["samples.png", "runs/digits-20250101-120000/weights.safetensors",
                   "exports/bench/bench-digits-cpu.json", "exports/DiT-S-2-256/model.onnx", "exports/digits/manifest.json"]


def documented_commands(path: Path) -> list[list[str]]:
    """Every `python -m ditexport ...` command in a Markdown file, as argument lists (inline `code` too)."""
    commands = []
    for line in path.read_text().splitlines():
        for match in re.finditer(r"python -m ditexport(?:\.\w+)? [^`#|\\]*", line):
            text = match.group(0).split("&&")[0]
            try:
                commands.append(shlex.split(text)[3:])
            except ValueError:  # an unbalanced quote in prose
                continue
    return commands


def written_paths(args: list[str]) -> list[str]:
    """The values of --out and --json: what the command writes (placeholders like DIR skipped)."""
    paths = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--out", "--json")]
    return [p for p in paths if not p.isupper() and "<" not in p and "…" not in p and "..." not in p]


def ignored(relative: str) -> bool:
    proc = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", relative])
    return proc.returncode == 0


@pytest.fixture(scope="module")
def git_checkout():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout of the project (.gitignore is checked with git check-ignore)")


def test_what_documented_commands_write_inside_the_checkout_is_ignored(git_checkout):
    checked, unignored = [], []
    for doc in DOCS:
        for args in documented_commands(doc):
            for path in written_paths(args):
                if Path(path).is_absolute():
                    continue  # /tmp and the like: outside the checkout
                checked.append(path)
                if not ignored(path):
                    unignored.append(f"{doc.name}: {' '.join(args)} writes {path}")
    for path in DEFAULT_OUTPUTS:
        checked.append(path)
        if not ignored(path):
            unignored.append(f"default output {path}")
    assert len(checked) > 10 and not unignored, unignored
    assert not ignored("ditexport/cli.py") and not ignored("docs/digits_samples.png")  # the check can say no


def test_readme_sample_examples_write_distinct_files():
    """The examples under "### `sample`" each write their own grid; only the plain default writes samples.png,
    which the quickstart's command writes too."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("### `sample`"):text.index("| flag |", text.index("### `sample`"))]
    examples = [shlex.split(line.split("#")[0])[3:] for line in block.splitlines() if "python -m ditexport" in line]
    outputs = [dict(zip(args, args[1:])).get("--out", "samples.png") for args in examples]
    assert len(outputs) == 6 and len(set(outputs)) == len(outputs), outputs
    ddim = next(out for args, out in zip(examples, outputs) if "ddim" in args)
    assert ddim != "samples.png"


def python_examples(path: Path) -> list[str]:
    """The ```python blocks of a Markdown file."""
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.slow
def test_python_examples_in_the_docs_run(digits_export, tmp_path, monkeypatch, one_torch_thread):
    """Every Python example of the README and docs/ runs as written, in a directory where exports/digits is the
    export `python -m ditexport build` makes (the quickstart's first command)."""
    (tmp_path / "exports").mkdir()
    shutil.copytree(digits_export, tmp_path / "exports" / "digits")
    monkeypatch.chdir(tmp_path)
    ran = []
    for doc in DOCS:
        for i, code in enumerate(python_examples(doc)):
            exec(compile(code, f"{doc.name} example {i + 1}", "exec"), {"__name__": "__docs__"})
            ran.append(f"{doc.name} {i + 1}")
    assert len(ran) >= 7 and any(r.startswith("README.md") for r in ran), ran
    assert (tmp_path / "exports" / "digits-fp32" / "manifest.json").is_file()  # the build example built
    assert (tmp_path / "three.png").is_file() and (tmp_path / "docs" / "digits_samples.png").is_file()
