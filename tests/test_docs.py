"""The README and docs/ as a user reads them: the example runs as copied, every file they
point to exists, and CI runs the README's own install and test commands."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _section(text: str, heading: str) -> str:
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def _fenced(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_the_readme_example_runs_as_copied_and_trains(capsys):
    (code,) = _fenced(_section((ROOT / "README.md").read_text(), "A first example"), "python")
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, "README.md: A first example", "exec"), namespace)
    printed = capsys.readouterr().out.strip().splitlines()
    history = namespace["opt"].history
    assert len(printed) == len(history) == 20 and printed[0].startswith("step 0: loss")
    assert all(d.accepted for d in history)
    assert history[-1].loss_after < 0.5 * history[0].loss_before


def _local_targets(page: Path) -> list[tuple[str, Path]]:
    """Markdown links and code spans that name a file or folder of this repository."""
    text = page.read_text()
    targets = []
    for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+:", link):
            targets.append((link, (page.parent / link).resolve()))
    for span in re.findall(r"`([^`\s]+)`", text):
        if re.match(r"(torch_hf|recipes|benchmarks|tests|docs)/[\w./-]*\w$", span) and "*" not in span:
            targets.append((span, ROOT / span))
    return targets


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_file_a_page_points_to_exists(page):
    missing = [name for name, path in _local_targets(page) if not path.exists()]
    assert not missing, f"{page.name} points to files that do not exist: {missing}"


def test_ci_runs_the_readme_install_and_test_commands():
    readme = _section((ROOT / "README.md").read_text(), "Install, run, test")
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ('pip install -e ".[test]"', "python -m pytest -q"):
        assert command in readme and command in ci
    first = _fenced(readme, "bash")[0].splitlines()[0]
    assert first.startswith("pip install torch ") and "cpu" in first  # torch on its own line, the CPU build


@pytest.mark.parametrize("section", ["Adding a damping rule", "Adding a preconditioner",
                                     "Adding a curvature matrix", "Adding a recipe"])
def test_the_design_pages_worked_examples_run(section):
    text = (ROOT / "docs" / "design.md").read_text()
    start = text.index(f"## {section}")
    (code,) = _fenced(text[start : text.find("\n## ", start + 1)], "python")
    exec(compile(code, f"docs/design.md: {section}", "exec"), {"__name__": "__design__"})


def test_the_pointwise_residuals_example_in_docs_scientific_runs():
    text = (ROOT / "docs" / "scientific.md").read_text()
    (code,) = _fenced(_section(text, "Residuals point by point: `torch_hf.residuals.PointwiseResiduals`"), "python")
    exec(compile(code, "docs/scientific.md: PointwiseResiduals", "exec"), {"__name__": "__docs__"})


def test_the_pinn_closure_example_in_docs_scientific_runs():
    text = (ROOT / "docs" / "scientific.md").read_text()
    (code,) = _fenced(_section(text, "Writing a PINN closure: `torch_hf.residuals`"), "python")
    exec(compile(code, "docs/scientific.md: PINN closure", "exec"), {"__name__": "__docs__"})
