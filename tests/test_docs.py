"""Every relative link and image in README.md and docs/ points at a file that exists.

Links to web pages (any URL with a scheme: http, https, mailto, ...) and pure #anchors are not
checked; a #fragment is stripped before the target is looked up. Links inside fenced code blocks
and inline code are not links.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
BACKTICKS = re.compile(r"`+")
# [text](target "title") and ![alt](target); the target may be wrapped in <...>.
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>\n]*>|[^)\s]+)(?:\s+[\"'(][^)]*[\"')])?\s*\)"
)
# [label]: target, a reference definition on a line of its own.
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.MULTILINE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def without_code_blocks(text: str) -> str:
    """The text with every fenced code block left out (its lines become empty)."""
    lines: list[str] = []
    fence: str | None = None
    for line in text.splitlines():
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)
        elif (
            fence is not None
            and opening
            and opening.group(1)[0] == fence[0]
            and len(opening.group(1)) >= len(fence)
        ):
            fence = None
        elif fence is None:
            lines.append(line)
            continue
        lines.append("")
    return "\n".join(lines)


def without_code_spans(text: str) -> str:
    """The text with every inline code span left out: a run of backticks up to the next run of
    the same length (CommonMark); a run that is never closed is kept as it is."""
    runs = list(BACKTICKS.finditer(text))
    kept: list[str] = []
    position = index = 0
    while index < len(runs):
        opening = runs[index]
        closing = next(
            (
                later
                for later in range(index + 1, len(runs))
                if len(runs[later].group()) == len(opening.group())
            ),
            None,
        )
        if closing is None:
            index += 1
            continue
        kept.append(text[position : opening.start()])
        position = runs[closing].end()
        index = closing + 1
    kept.append(text[position:])
    return "".join(kept)


def link_targets(text: str) -> list[str]:
    """The targets of the reference definitions, then of the inline links and images, in Markdown
    text, leaving out fenced code blocks and inline code. A link may span lines."""
    # A code span ends with its paragraph, so an unclosed backtick cannot reach into the next one.
    prose = "\n\n".join(without_code_spans(block) for block in without_code_blocks(text).split("\n\n"))
    targets = [match.group(1) for match in REFERENCE_DEFINITION.finditer(prose)]
    targets += [match.group(1) for match in INLINE_LINK.finditer(prose)]
    return [target.removeprefix("<").removesuffix(">") for target in targets]


def local_path(source: Path, target: str) -> Path | None:
    """The file a link in `source` points at, or None for a web address or a pure #anchor."""
    if SCHEME.match(target):
        return None
    path = unquote(target.split("#", 1)[0].split("?", 1)[0])
    if not path:
        return None
    return REPO / path.lstrip("/") if path.startswith("/") else source.parent / path


def relative_links() -> list[tuple[Path, str, Path]]:
    links = []
    for source in markdown_files():
        for target in link_targets(source.read_text(encoding="utf-8")):
            path = local_path(source, target)
            if path is not None:
                links.append((source, target, path))
    return links


LINKS = relative_links()


@pytest.mark.parametrize(
    ("source", "target", "path"),
    LINKS,
    ids=[f"{source.relative_to(REPO)}->{target}" for source, target, _ in LINKS],
)
def test_link_target_exists(source: Path, target: str, path: Path) -> None:
    assert path.exists(), f"{source.relative_to(REPO)}: the link {target!r} points at a missing file"


def test_the_documentation_has_links() -> None:
    assert (REPO / "README.md").is_file()
    assert any(source.name == "README.md" for source, _, _ in LINKS)
    assert any(source.parent.name == "docs" for source, _, _ in LINKS)


def test_link_targets_skip_code_and_find_images() -> None:
    text = "\n".join(
        [
            "See [the study](docs/study.md#results) and ![a plot](docs/study/plot.png).",
            'A [titled](a.md "Title") link, an [angle](<b c.md>) one, and [ref]: d.md',
            "[ref]: e.md",
            "Inline `[not](a-link.md)` code, and [web](https://example.invalid/x.md), [anchor](#top).",
            "```python",
            "x = [Entity('a')](f.md)",
            "```",
        ]
    )
    assert link_targets(text) == [
        "e.md",
        "docs/study.md#results",
        "docs/study/plot.png",
        "a.md",
        "b c.md",
        "https://example.invalid/x.md",
        "#top",
    ]
    assert link_targets("a [link that\nwraps](wrapped.md) and `code ``with`` runs` [x](y.md)") == [
        "wrapped.md",
        "y.md",
    ]
    assert link_targets("an unclosed ` backtick\n\n[next paragraph](z.md) and `a span`") == ["z.md"]
    source = REPO / "docs" / "page.md"
    assert local_path(source, "https://example.invalid/x.md") is None
    assert local_path(source, "mailto:someone@example.invalid") is None
    assert local_path(source, "#top") is None
    assert local_path(source, "study.md#results") == REPO / "docs" / "study.md"
    assert local_path(source, "../README.md") == REPO / "docs" / ".." / "README.md"
