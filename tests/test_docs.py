"""The README and the docs site: short, current, free of lab-notebook history, and with no broken relative link.

`mkdocs build --strict` (run by `make lint`) checks the site's own links and anchors; these tests check what it
cannot: the README, which is not part of the site, and the generated benchmarks page. No cluster: seconds.
"""

import re
from pathlib import Path

import pytest

from benchmarks import docs_page

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

# A diary names issues, runs, sessions and days; the docs say what is true now. Dates are allowed in a link to a
# result file (its name carries one) and in code (an audit line's timestamp is an example, not a diary entry).
_DIARY = re.compile(r"\bissue \d+|\bruns? \d+|\bsession\b", re.IGNORECASE)
_DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")
_RESULT_LINK = re.compile(r"\[[^\]]*\]\((?:\.\./)*(?:benchmarks/)?results/[^)]*\)")
_CODE = re.compile(r"^```.*?^```|`[^`\n]*`", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_benchmarks_page_is_what_the_results_give():
    assert docs_page.PAGE.read_text() == docs_page.render(), "run: python -m benchmarks.docs_page"


def test_the_benchmarks_page_links_each_figure_to_a_result_file_that_exists():
    targets = set(re.findall(r"\]\(results/([^)]+)\)", docs_page.PAGE.read_text()))
    assert len(targets) >= 5
    assert all((docs_page.RESULTS / name).is_file() for name in targets), targets


def test_the_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= 250, f"README.md has {lines} lines: move the detail into a page of docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_page_reads_as_a_diary(page):
    text = _RESULT_LINK.sub("", page.read_text())
    diary = _DIARY.findall(text)
    dates = _DATE.findall(_CODE.sub("", text))
    assert not diary and not dates, f"{page.name}: {diary + dates}"


def test_every_relative_link_in_the_readme_resolves():
    links = [link.split("#")[0] for link in _LINK.findall(README.read_text())]
    relative = [link for link in links if link and not re.match(r"[a-z]+:", link)]
    assert relative, "the README links no page of docs/"
    missing = [link for link in relative if not (ROOT / link).exists()]
    assert not missing, f"README.md links files that do not exist: {missing}"


def test_the_diary_patterns_catch_a_diary():
    """The patterns above are what the tests rely on: each must find what it is for, and leave a result link be."""
    assert _DIARY.findall("as run 19 showed in issue 11, the session") == ["run 19", "issue 11", "session"]
    assert not _DIARY.findall("sessionStorage, the gpu_session.sh script, runs on 2 cores")
    assert _DATE.findall("measured on 2026-11-23") == ["2026-11-23"]
    assert not _DATE.findall(_RESULT_LINK.sub("", "[2,457](results/pipeline-x-2026-11-24-run1.json)"))
    assert not _DATE.findall(_CODE.sub("", '`{"time": "2026-11-23T09:38:26Z"}`'))
