from pathlib import Path

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
