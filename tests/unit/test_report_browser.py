"""The report and its pairs page rendered by a real browser: headless Chromium, offline.

`--dump-dom` prints the DOM after the page has loaded and its scripts have run, so the
pairs page's filter, preset by the URL fragment, shows in which rows it hid. Skipped
when no Chromium is installed (scripts/setup.sh installs Debian's as root).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from flows.report import pairs_page_path, write_report
from tests.unit.test_report import HOSTILE, build_store, incumbent_text, pair_row

BROWSER = os.environ.get("RLAIF_CHROMIUM") or next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
)
pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason="no chromium binary on PATH (scripts/setup.sh installs Debian's chromium when run "
    "as root; or set RLAIF_CHROMIUM)",
)
# Nothing leaves the machine: no name resolves, no background or component traffic.
OFFLINE = [
    "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage", "--no-first-run",
    "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-default-apps", "--disable-extensions",
    "--host-resolver-rules=MAP * ~NOTFOUND",
]  # fmt: skip
TIMEOUT_S = 60


def dump_dom(url: str, tmp_path: Path) -> str:
    """The DOM of `url` once loaded, from a Chromium with a fresh profile, stopped (its
    process group, by its own pid) if it outlives TIMEOUT_S."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [str(BROWSER), *OFFLINE, f"--user-data-dir={profile}", "--dump-dom", url]
    env = {**os.environ, "HOME": str(tmp_path)}
    browser = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = browser.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        out, err = "", f"no DOM after {TIMEOUT_S} s"
    finally:
        # whatever of its process group is left (its own pid is the group's id)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(browser.pid, signal.SIGKILL)
        browser.wait()
    assert "</html>" in out, f"chromium printed no page: {err[-2000:]}"
    return out


def shown_rows(dom: str) -> list[str]:
    """The pair rows the filter left visible, by their text."""
    rows = re.findall(r"<tr (data-iteration=[^>]*)>(.*?)</tr>", dom, flags=re.S)
    return [re.sub(r"<[^>]+>", " ", body) for attrs, body in rows if "hidden" not in attrs]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    return write_report(build_store(root / "data"), root / "report.html")


def test_the_report_shows_the_answers_and_verdicts_and_runs_nothing(
    report: Path, tmp_path: Path
) -> None:
    dom = dump_dom(report.as_uri(), tmp_path)
    assert "<title>rlaif loop loop-a" in dom and "pwned" not in dom.split("</title>")[0]
    for text in (
        "Answers: incumbent and candidate on eval prompts",
        "Short answer 1.0.",
        incumbent_text(2, 3),
        "p(candidate better) <b>0.950</b>",
        "counted as: candidate wins",
        "counted as: tie (position bias)",
        "fails concise: at most 6 words",
        '&lt;script&gt;document.title="pwned"&lt;/script&gt;',  # shown, not run
    ):
        assert text in dom, text
    assert "<img" not in dom and dom.count("<script") == 0
    assert 'href="report-pairs.html"' in dom


def test_the_pairs_filter_runs_from_the_url_fragment(report: Path, tmp_path: Path) -> None:
    page = pairs_page_path(report)
    everything = shown_rows(dump_dom(page.as_uri(), tmp_path))
    assert len(everything) == 12

    dom = dump_dom(f"{page.as_uri()}#principle=honest&min_p=0.75", tmp_path)
    rows = shown_rows(dom)
    expected = [(i, n) for i in (4, 2) for n in range(3) if pair_row(i, n, [])["p_chosen"] >= 0.75]
    assert [re.search(r"chosen (\d)-(\d)", r).groups() for r in rows] == [  # type: ignore[union-attr]
        (str(i), str(n)) for i, n in expected
    ]
    assert f'data-filtered="yes">{len(expected)} of 12 pairs shown' in dom

    dom = dump_dom(f"{page.as_uri()}#q=PWNED&iteration=3", tmp_path)  # text search, any case
    rows = shown_rows(dom)
    assert len(rows) == 1 and "&lt;img src=x" in rows[0]
    assert "<img" not in dom and dom.split("</title>")[0].count("pwned") == 0
    assert HOSTILE not in dom
