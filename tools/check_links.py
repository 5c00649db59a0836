"""Checks that the documentation points at things that exist: every relative Markdown link (and the
#anchor of a link into a Markdown file), and every repository path mentioned in the text or in code
(csrc/..., bench/..., docs/..., python/..., tests/..., tools/..., cmake/..., .ci/...).

    python3 tools/check_links.py [FILE.md ...]

Without FILE arguments it checks README.md, CONTRIBUTING.md, docs/**/*.md and bench/results/MANIFEST.md.

Run from the project root; exits 1 and lists what is missing. A path is looked up from the project
root and from the Markdown file's folder. A path that is gone passes where the same file says where
history keeps it (`git show REV:path`, REV a commit's hex name; checked against git where the commit
is at hand), and so do the folders above it. Paths with placeholders (DATE, GPU, COMMIT, OUT, <...>,
*, {...}) are skipped.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
PATH = re.compile(r"(?<![\w/.-])((?:\.\./)*(?:csrc|bench|docs|python|tests|tools|cmake|\.ci)/[\w./{}<>*-]*)")
# A file in git history: `git show 9b97e26:tools/x.sh`.
HISTORY = re.compile(r"\b([0-9a-f]{7,40}):((?:csrc|bench|docs|python|tests|tools|cmake|\.ci)/[\w./-]*)")
PLACEHOLDERS = ("DATE", "GPU", "COMMIT", "OUT", "BENCH", "FILE", "<", ">", "*", "{", "}", "...")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation out, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[|\]\([^)]*\)", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    found, seen = set(), {}
    fenced = False
    for line in md.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not line.startswith("#"):
            continue
        s = slug(line.lstrip("#"))
        n = seen.get(s, 0)
        seen[s] = n + 1
        found.add(s if n == 0 else f"{s}-{n}")
    return found


def exists(rel: str, md: Path) -> bool:
    rel = rel.rstrip("/")
    return (md.parent / rel).exists() or (ROOT / rel).exists()


def in_history(rev: str, path: str) -> bool | None:
    """Whether commit `rev` holds `path` (None where git or the commit is not at hand: a shallow or
    exported tree)."""
    import subprocess

    try:
        if subprocess.run(["git", "cat-file", "-e", f"{rev}^{{commit}}"], cwd=ROOT, capture_output=True).returncode:
            return None
        return subprocess.run(["git", "cat-file", "-e", f"{rev}:{path}"], cwd=ROOT, capture_output=True).returncode == 0
    except OSError:
        return None


def check(md: Path) -> list[str]:
    problems = []
    text = md.read_text()
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        where = md if not path else (md.parent / path)
        if path and not where.exists():
            problems.append(f"{md.relative_to(ROOT)}: link {target}: no such file")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            problems.append(f"{md.relative_to(ROOT)}: link {target}: no heading #{anchor}")
    historic = set()
    for rev, path in HISTORY.findall(text):
        path = path.rstrip(".,;:)")
        if any(p in path for p in PLACEHOLDERS):
            continue
        if in_history(rev, path) is False:
            problems.append(f"{md.relative_to(ROOT)}: {rev}:{path}: no such file in git history")
        historic.add(path)
    for raw in PATH.findall(text):
        token = raw.rstrip(".,;:)")
        if any(p in token for p in PLACEHOLDERS):
            continue
        if any(h == token.rstrip("/") or h.startswith(token.rstrip("/") + "/") for h in historic):
            continue
        if not exists(token, md):
            problems.append(f"{md.relative_to(ROOT)}: path {token}: does not exist")
    return problems


def main(argv: list[str]) -> int:
    files = [Path(a).resolve() for a in argv] or [
        ROOT / "README.md",
        ROOT / "CONTRIBUTING.md",
        *sorted((ROOT / "docs").rglob("*.md")),
        ROOT / "bench/results/MANIFEST.md",
    ]
    problems = [p for f in files for p in check(f)]
    for p in problems:
        print(p)
    print(f"checked {len(files)} files: {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
