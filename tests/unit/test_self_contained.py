"""Nothing in the repository or the installed package points at files outside the repository.

Users get the repository (or only the wheel); a design document that lies beside the
checkout on a developer's machine is not theirs to read, so docs, docstrings, scripts and
the audit export manifest must name what the repository itself holds (docs/contract.md).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import saga_worker
from saga_worker.audit.chain import AUDIT_HASH_SPEC
from tests.requirements import unavailable

REPO = Path(__file__).resolve().parents[2]
PACKAGE = Path(saga_worker.__file__).resolve().parent

# Built by concatenation so that this file does not match itself.
FORBIDDEN = re.compile(
    "|".join(re.escape(p) for p in (".." + "/shared", "shared" + "/DESIGN", "DESIGN" + ".md"))
)
# [text](target) in Markdown; targets with a scheme or a pure anchor stay inside anyway.
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        unavailable(f"git ls-files failed in {REPO}: {exc}")
    return [REPO / name for name in out.decode().split("\0") if name]


def text_of(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
        return None  # binary (charts) or deleted in the work tree


def offending_lines(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        text = text_of(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                found.append(f"{path}:{number}: {line.strip()}")
    return found


def test_tracked_files_name_nothing_outside_the_repository() -> None:
    assert offending_lines(tracked_files()) == []


def test_installed_package_names_nothing_outside_the_repository() -> None:
    files = [p for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert files, f"no files under {PACKAGE}"
    assert offending_lines(files) == []


def test_markdown_links_stay_inside_the_repository() -> None:
    escaping = []
    for path in tracked_files():
        if path.suffix != ".md" or (text := text_of(path)) is None:
            continue
        for target in MD_LINK.findall(text):
            if "://" in target or target.startswith(("#", "mailto:")):
                continue
            resolved = (path.parent / target.split("#", 1)[0]).resolve()
            if not resolved.is_relative_to(REPO):
                escaping.append(f"{path.relative_to(REPO)}: {target}")
    assert escaping == []


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_markdown_anchors_name_existing_headings() -> None:
    # Links to documents written in other branches (docs/deployment.md, docs/rabbitmq.md) are
    # checked once the file exists; an anchor into a file that exists must name a heading.
    broken = []
    for path in tracked_files():
        if path.suffix != ".md" or (text := text_of(path)) is None:
            continue
        for target in MD_LINK.findall(text):
            if "://" in target or "#" not in target:
                continue
            name, anchor = target.split("#", 1)
            linked = (path.parent / name).resolve() if name else path
            if (linked_text := text_of(linked)) is None:
                continue
            headings = re.findall(r"^#{1,6} (.+)$", linked_text, re.MULTILINE)
            if anchor not in {github_anchor(h) for h in headings}:
                broken.append(f"{path.relative_to(REPO)}: {target}")
    assert broken == []


def test_export_manifest_names_the_hash_definition_not_a_file() -> None:
    # The manifest carries AUDIT_HASH_SPEC; docs/audit.md defines the hash under that name.
    name = "saga_worker audit hash v2"
    assert AUDIT_HASH_SPEC.startswith(name)
    assert name in (REPO / "docs" / "audit.md").read_text(encoding="utf-8")
    assert not FORBIDDEN.search(AUDIT_HASH_SPEC)
