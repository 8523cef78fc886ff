"""The README's set-up and test commands are the ones CI runs, word for word."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands():
    readme = REPO / "README.md"
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    commands = [line for line in ci if line and not line.startswith(("#", "set ", "cd ", "rm "))]
    assert len(commands) == 2, commands
    blocks = readme.read_text().split("```bash\n")[1:]
    shown = [block.split("```")[0].strip() for block in blocks]
    assert commands[0] in shown, f"install command not in README: {commands[0]}"
    assert commands[1] in shown, f"test command not in README: {commands[1]}"
    assert "finetune run recipes/quickstart.yaml" in shown
