"""Write docs/cli.md, the command-line reference, from the click commands themselves.

    python docs/gen_cli.py          # rewrite docs/cli.md
    python docs/gen_cli.py --check  # exit 1 if docs/cli.md is out of date

tests/test_pipeline.py checks that the committed file is current.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tinylstm.cli import main  # noqa: E402

OUT = Path(__file__).resolve().parent / "cli.md"
WIDTH = 100


def render() -> str:
    # make_context applies each command's own context settings (-h as well as --help), as a real call does.
    root = main.make_context("tinylstm", [], resilient_parsing=True, terminal_width=WIDTH, max_content_width=WIDTH)
    lines = ["# Command-line reference", "",
             "Generated from the commands' own help by `python docs/gen_cli.py`; do not edit by hand.", "",
             "```text", main.get_help(root), "```", ""]
    for name in main.list_commands(root):
        command = main.get_command(root, name)
        ctx = command.make_context(name, [], parent=root, resilient_parsing=True, terminal_width=WIDTH,
                                   max_content_width=WIDTH)
        lines += [f"## tinylstm {name}", "", "```text", command.get_help(ctx), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv[1:]:
        sys.exit(0 if OUT.is_file() and OUT.read_text() == text else 1)
    OUT.write_text(text)
    print(f"wrote {OUT}")
