import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    lines = ROOT.joinpath("README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1 : lines.index("```")]
    return block


def test_readme_opens_with_a_sweep_command_and_the_test_command():
    sweep, test = readme_commands()
    assert "tune-alexnet sweep" in sweep and "pip install" in sweep
    assert "pytest" in test and "pip install" in test


def test_ci_runs_exactly_the_readmes_test_command():
    ci_lines = [ln.strip() for ln in ROOT.joinpath(".ci/run").read_text().splitlines()]
    assert readme_commands()[1] in ci_lines


def test_the_readme_is_short_and_links_every_docs_page():
    readme = ROOT.joinpath("README.md").read_text()
    assert len(readme.encode()) < 8 * 1024
    for page in sorted(ROOT.joinpath("docs").glob("*.md")):
        assert f"](docs/{page.name})" in readme, page.name
    for page in ("BENCHMARKS.md", "FIDELITY.md"):
        assert f"]({page})" in readme


def test_the_tour_names_the_study_page_in_the_experiment_folder():
    assert "`report.html` in the same folder" in ROOT.joinpath("README.md").read_text()


# Every command in the README and the docs pages, and the test that runs it: the command as written, or (for the
# benchmarks) its smoke run on the CPU. A shell line is named by its start, a Python block by its first line.
# A block that no test can run is marked instead (MARKERS); its `tune-alexnet sweep` flags are still checked.
RUN_BY = {
    "README.md": {
        "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/tune-alexnet sweep":
            "tests/test_readme.py::test_the_readmes_quick_command_runs_as_written",
        "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/python -m pytest":
            "tests/test_readme.py::test_ci_runs_exactly_the_readmes_test_command",
        "import pandas as pd": "tests/test_results.py::test_the_readmes_python_runs_on_a_real_experiment",
        "from tune_alexnet.checkpoint import": "tests/test_results.py::test_the_readmes_python_runs_on_a_real_experiment",
    },
    "docs/benchmarks.md": {
        "python bench/throughput.py": "tests/test_bench.py::test_throughput_prints_its_table",
        "python bench/launches.py": "tests/test_bench.py::test_launch_count_splits_ops_and_chunking_divides_the_augmentations",
        "python bench/checkpoint.py": "tests/test_bench.py::test_checkpoint_bench_runs_a_sweep_through_the_current_api",
        "python bench/fidelity.py": "tests/test_bench.py::test_fidelity_runs_chosen_study_runs_through_the_sweep",
        "bash bench/device.sh --parts ab": "tests/test_bench.py::test_ab_smoke_trains_every_arm_and_seed_without_ray",
        "bash bench/device.sh": "tests/test_bench.py::test_device_smoke_runs_every_part_without_ray",
    },
    "docs/results.md": {
        "import pandas as pd, pyarrow.dataset as ds": "tests/test_results.py::test_the_docs_python_runs_on_a_real_experiment",
        "from ray import tune": "tests/test_results.py::test_the_docs_python_runs_on_a_real_experiment",
        "from tune_alexnet.checkpoint import": "tests/test_results.py::test_the_docs_python_runs_on_a_real_experiment",
        "from tune_alexnet import api": "tests/test_api.py::test_the_docs_api_example_runs_and_speaks_as_the_command_does",
    },
    "docs/sweeps.md": {"tune-alexnet sweep --help": "tests/test_cli.py::test_help_is_there_for_newcomers"},
}  # fmt: skip
MARKERS = ("<!-- cluster-only -->", "<!-- needs a GPU -->")
COMMAND_BLOCKS = ("bash", "python")  # `text` blocks hold output and diagrams


def fenced_blocks(page: Path) -> list[tuple[str, str | None, list[str]]]:
    """(language, the marker right before it or None, lines) of each fenced block of a Markdown page."""
    blocks, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        opened = re.match(r"\s*```(\S*)\s*$", lines[i])
        if not opened:
            i += 1
            continue
        before = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
        end = next(j for j in range(i + 1, len(lines)) if re.match(r"\s*```\s*$", lines[j]))
        body = textwrap.dedent("\n".join(lines[i + 1 : end])).splitlines()
        blocks.append((opened.group(1), before if before in MARKERS else None, body))
        i = end + 1
    return blocks


def commands(language: str, body: list[str]) -> list[str]:
    """A shell block's commands, one a line (a `\\` continues it) without its comment; a Python block as its first
    line."""
    if language == "python":
        return [body[0]]
    joined = "\n".join(body).replace("\\\n", " ")
    return [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines() if line.strip()]


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(ROOT.joinpath("docs").glob("*.md"))]


def test_every_command_in_the_docs_is_run_by_a_named_test_or_marked():
    named = set()
    for page in pages():
        name = page.relative_to(ROOT).as_posix()
        for language, marker, body in fenced_blocks(page):
            assert language, f"{name}: a fenced block without a language ({body[:1]}); allowed: bash, python, text"
            if language not in COMMAND_BLOCKS or marker:
                continue
            for command in commands(language, body):
                key = next((k for k in RUN_BY.get(name, {}) if command.startswith(k)), None)
                assert key, f"{name}: {command!r} is run by no test in RUN_BY and its block has none of {MARKERS}"
                named.add((name, key))
    assert named == {(page, key) for page, keys in RUN_BY.items() for key in keys}  # no entry left stale
    for test in {t for keys in RUN_BY.values() for t in keys.values()}:
        path, function = test.split("::")
        assert f"def {function}(" in ROOT.joinpath(path).read_text(), test


def test_every_sweep_command_in_the_docs_passes_the_command_lines_checks():
    """The flags of each `tune-alexnet sweep` line, marked blocks included (a placeholder `...` left out)."""
    from tune_alexnet.cli import _settings, build_parser

    seen = 0
    for page in pages():
        for language, _, body in fenced_blocks(page):
            for command in commands(language, body) if language == "bash" else []:
                if "tune-alexnet sweep" not in command or "--help" in command:
                    continue
                argv = shlex.split(command.split("tune-alexnet ", 1)[1].replace("...", ""))
                assert _settings(build_parser().parse_args(argv)), command
                seen += 1
    assert seen >= 6


@pytest.mark.slow
def test_the_readmes_quick_command_runs_as_written(tmp_path):
    """The README's first command after its install, in a checkout beside ../shared/data (a link to the real slice)."""
    from conftest import SHARED_DATA

    if not SHARED_DATA.joinpath("cifar10-mini").is_dir():
        pytest.skip(f"{SHARED_DATA}/cifar10-mini is absent (real CIFAR-10 slice)")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(SHARED_DATA)
    (tmp_path / "checkout").mkdir()
    command = readme_commands()[0].split(".venv/bin/tune-alexnet ", 1)[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-m", "tune_alexnet", *shlex.split(command)], cwd=tmp_path / "checkout",
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    (exp,) = (tmp_path / "checkout" / "ray_results").iterdir()
    assert "6 trials (6 terminated)" in out.stdout and (exp / "report.html").is_file()
    size = sum(f.stat().st_size for f in exp.rglob("*") if f.is_file())
    assert size < 40e6, size  # the README: "about 19 MB in all"
