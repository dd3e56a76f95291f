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


def read_marked_section(path: str | Path, name: str) -> str:
    """The text between the NAME markers of `path` ("" when the file or the markers are missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    file = Path(path)
    text = file.read_text() if file.exists() else ""
    if start not in text or end not in text:
        return ""
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")


def _subsections(text: str) -> tuple[str, dict[str, str]]:
    """(text before the first '### ' heading, {heading line: its block up to the next heading})."""
    head, blocks, current = [], {}, None
    for line in text.splitlines():
        if line.startswith("### "):
            current = line
            blocks[current] = [line]
        elif current is None:
            head.append(line)
        else:
            blocks[current].append(line)
    return "\n".join(head).strip("\n"), {k: "\n".join(v).strip("\n") for k, v in blocks.items()}


def merge_subsections(old: str, new: str) -> str:
    """`old` with each '### ' subsection that `new` also has replaced by new's; new ones appended; the
    text before the first heading is new's.

    A run that re-measures part of a section (`bench_ops.py --only causal`) keeps the rest as measured.
    """
    old_blocks = _subsections(old)[1]  # the old text before the first heading is replaced too
    new_head, new_blocks = _subsections(new)
    merged = {**old_blocks, **new_blocks}  # old order, new text; new headings last
    return "\n\n".join(([new_head] if new_head else []) + list(merged.values()))
