"""Write a generated table into a markdown file between its `<!-- NAME:start -->` / `<!-- NAME:end -->` markers."""

from __future__ import annotations

from pathlib import Path


def write_marked_section(path: str | Path, section: str, name: str) -> None:
    """Replace the text between the NAME markers of `path` with `section`, keeping the rest; append the marked
    block when the file has no such markers (or does not exist)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{section}\n{end}"
    file = Path(path)
    text = file.read_text() if file.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
    file.write_text(text)
