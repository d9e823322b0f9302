"""The README's two set-up commands stay true: CI runs the test command verbatim, and the main
job's config exists and builds."""

import pathlib
import re

from flowrl.cli import EXPERIMENTS_DIR

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_command = _bash_blocks()[1].strip()
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_main_job_command_names_a_shipped_config():
    main_command = _bash_blocks()[0].strip()
    config = main_command.split("flowrl train ")[1].split()[0]
    assert (EXPERIMENTS_DIR / config).is_file()


def test_readme_links_resolve():
    links = re.findall(r"\]\(([^)#]+\.md)\)", (ROOT / "README.md").read_text())
    assert links
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing, missing


def test_every_extractor_has_a_docs_page_and_configs():
    import extractors  # noqa: F401
    from flowrl.registry import REGISTRY

    for name in REGISTRY:
        assert (ROOT / "docs" / f"{name}.md").is_file(), f"docs/{name}.md missing"
        assert list((EXPERIMENTS_DIR / name).glob("*.gin")), f"experiments/{name}/ has no gin file"
