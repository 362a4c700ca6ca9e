"""Loop status and the HTML report, read back from a real store in tmp_path."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from alignment.constitution import from_dict
from alignment.judge import Judgment
from flows.report import pairs_page_path, print_status, write_report
from flows.report_store import (
    MAX_PAIRS,
    eval_examples,
    incumbent_series,
    judge_audits,
    loop_history,
    loop_pairs,
    pick_examples,
)
from storage import Store, StoreNotFound

START = datetime(2025, 1, 2, tzinfo=timezone.utc)
BASE = "tiny-1c6521e8ec56"
M1, M2, M3 = "m1" + "a" * 20, "m2" + "b" * 20, "m3" + "c" * 20
KL_GATE = {"gate": "kl", "metric": "kl", "threshold": 0.5, "message": "KL too far"}
WIN_GATE = {"gate": "win_rate", "metric": "win_rate", "threshold": 0.5, "message": ""}

# iteration: (incumbent, candidate, decision, candidate violation rate, incumbent's, kl)
ITERATIONS = {
    1: (BASE, M1, "promoted", 0.30, 0.40, 0.1),
    2: (M1, M2, "rejected", 0.35, 0.31, 0.9),
    3: (M1, M3, "promoted", 0.20, 0.29, 0.2),
    4: (M3, None, "skipped", None, None, None),
}


def iteration_row(i: int) -> dict[str, Any]:
    incumbent, candidate, decision, _, _, kl = ITERATIONS[i]
    gates = []
    if kl is not None:
        gates = [
            {**KL_GATE, "value": kl, "passed": kl <= 0.5},
            {**WIN_GATE, "value": 0.6, "passed": True},
        ]
    reasons = {"rejected": ["kl 0.9 above 0.5"], "skipped": ["too few pairs: 3 < 8"]}
    return {
        "iteration_id": f"loop-a-{i}", "loop": "loop-a", "iteration": i, "method": "dpo",
        "incumbent_model_id": incumbent, "candidate_model_id": candidate,
        "data_run_id": f"data-{i}", "eval_run_id": None if kl is None else f"eval-{i}",
        "pairs": 3 if kl is None else 10, "decision": decision,
        "promoted": decision == "promoted", "gates": gates,
        "reasons": reasons.get(decision, []), "started_at": START + timedelta(hours=i),
        "finished_at": START + timedelta(hours=i, minutes=30), "flow_run_id": None,
    }  # fmt: skip


def eval_rows(i: int) -> list[dict[str, Any]]:
    incumbent, candidate, _, violations, baseline_violations, kl = ITERATIONS[i]
    values = {
        "win_rate": 0.6, "mean_p_win": 0.58, "judge_position_consistency": 0.9,
        "judge_not_ok": 0.01, "violation_rate": violations,
        "violation_rate/harmless": violations / 2, "baseline/violation_rate": baseline_violations,
        "baseline/violation_rate/harmless": baseline_violations / 2, "length": 40.0 + i,
        "baseline/length": 38.0 + i, "kl": kl,
    }  # fmt: skip
    return [
        {
            "eval_id": f"eval-{i}-{metric}",
            "model_id": candidate,
            "baseline_model_id": incumbent,
            "metric": metric,
            "value": value,
            "n": 50,
            "ci_low": 0.5 if metric == "win_rate" else None,
            "ci_high": 0.7 if metric == "win_rate" else None,
        }  # fmt: skip
        for metric, value in values.items()
    ]


def model_row(model_id: str, parent: str | None, iteration: int) -> dict[str, Any]:
    return {
        "model_id": model_id, "stage": "dpo", "path": f"/models/{model_id}", "base_model": BASE,
        "parent_model_id": parent, "iteration": iteration, "metrics": {}, "promoted": False,
        "created_at": START + timedelta(hours=iteration), "data_runs": [f"data-{iteration}"],
        "examples": 10, "constitution_ids": ["c1"], "config": {},
    }  # fmt: skip


def pair_row(i: int, n: int, principles: list[str]) -> dict[str, Any]:
    chosen = HOSTILE if (i, n) == (3, 0) else f"chosen {i}-{n}"
    return {
        "pair_id": f"pair-{i}-{n}", "prompt_id": f"p{n}", "prompt": "Hi <b>?", "chosen": chosen,
        "rejected": f"rejected {i}-{n}", "p_chosen": 0.6 + 0.1 * n, "principle_ids": principles,
        "iteration": i, "split": "train",
    }  # fmt: skip


def member(run_id: str, table: str, row_id: str) -> dict[str, str]:
    """One `run_rows` row, as flows.stages.run_stage records a run's expected rows."""
    return {"member_id": f"{run_id}/{table}/{row_id}", "table_name": table, "row_id": row_id}


def audit_rows(iteration: int | None, accuracy: float, run: str, minutes: int) -> list[dict]:
    """One gold audit's `judge_evals` rows, as flows.judge_eval writes them."""
    figures = {
        "accuracy": (accuracy, 40), "position_consistency": (0.8, 40), "not_ok": (1.0, 40),
        "first_position_rate": (0.6, 78), "ece": (0.12, 39),
        "accuracy_chosen_longer": (0.9, 20), "accuracy_chosen_shorter": (0.3, 18),
        "by_principle/honest/accuracy": (accuracy, 40),
        "calibration/bin2/confidence": (0.61, 25), "calibration/bin2/accuracy": (0.52, 25),
        "calibration/bin8/confidence": (0.93, 14), "calibration/bin8/accuracy": (0.71, 14),
    }  # fmt: skip
    return [
        {
            "judge_eval_id": f"{run}-{metric}",
            "judge_model": "judge-m",
            "mode": "logprob",
            "metric": metric,
            "value": value,
            "n": n,
            "iteration": iteration,
            "loop": "loop-a" if iteration is not None else None,
            "created_at": START + timedelta(minutes=minutes),
        }  # fmt: skip
        for metric, (value, n) in figures.items()
    ]


def session_event(min_judge_accuracy: float | None) -> dict[str, Any]:
    gates = {"min_win_rate": 0.5, "min_judge_accuracy": min_judge_accuracy}
    return {
        "event_id": "loop-loop-a-0001:completed", "run_id": "loop-loop-a-0001",
        "status": "completed", "updated_at": START, "config": {"loop": {"gates": gates}},
    }  # fmt: skip


# Model output that tries to run script or close the page's markup: shown as text only.
HOSTILE = (
    '</td></tr></table></script><script>document.title="pwned"</script>'
    '<img src=x onerror="document.title=1">'
)
CONSTITUTION = from_dict({
    "name": "t", "version": "1",
    "principles": [
        {"id": "harmless", "principle": "is harmless", "critique": "c", "revision": "r"},
        {"id": "concise", "principle": "is concise", "critique": "c", "revision": "r",
         "checks": [{"max_words": 6}]},
    ],
})  # fmt: skip
# Eval prompt n of every iteration: the judge's p that the candidate is better, p in the
# first and second order (the candidate shown first / second), and its mode. Prompt 3's
# orders disagree (a tie for the win rate); prompt 5 is decided by the `concise` checks.
EVAL = [
    (0.95, 0.9, 1.0, "pairwise"), (0.85, 0.8, 0.9, "pairwise"), (0.2, 0.3, 0.1, "pairwise"),
    (0.45, 0.7, 0.2, "pairwise"), (0.55, 0.6, 0.5, "pairwise"), (1.0, None, None, "checks"),
]  # fmt: skip


def candidate_text(i: int, n: int) -> str:
    return HOSTILE if (i, n) == (3, 0) else f"Short answer {i}.{n}."


def incumbent_text(i: int, n: int) -> str:
    return f"A long answer that goes on and on, {i}.{n}."  # 10 words: fails `concise`


def eval_answer_rows(i: int) -> dict[str, list[dict[str, Any]]]:
    """One eval run's prompts, both models' answers and the judgments, as the eval writes
    them: the candidate on side A, the incumbent on side B."""
    incumbent, candidate = ITERATIONS[i][:2]
    prompts, responses, judgments = [], [], []
    for n, (p_a, first, second, mode) in enumerate(EVAL):
        prompts.append({"prompt_id": f"ep{n}", "text": f"Eval question {n}?", "split": "eval"})
        for side, model, text in (("a", candidate, candidate_text(i, n)),
                                  ("b", incumbent, incumbent_text(i, n))):  # fmt: skip
            responses.append({
                "response_id": f"r{i}-{n}{side}", "prompt_id": f"ep{n}", "model": model,
                "text": text, "finish_reason": "length" if n == 1 else "stop", "num_tokens": 9,
            })  # fmt: skip
        judgments.append({
            "judgment_id": f"j{i}-{n}", "prompt_id": f"ep{n}", "response_a_id": f"r{i}-{n}a",
            "response_b_id": f"r{i}-{n}b", "principle_id": "concise" if n == 5 else "harmless",
            "constitution_id": CONSTITUTION.constitution_id, "judge_model": "judge-m",
            "mode": mode, "p_a_first": first, "p_a_second": second, "p_a": p_a,
            "position_consistent": None if first is None else (first > 0.5) == (second > 0.5),
            "status": "ok",
        })  # fmt: skip
    return {"prompts": prompts, "responses": responses, "judgments": judgments}


def build_store(root: Path) -> Store:
    """A loop of 4 iterations (promoted, rejected, promoted, skipped) with evals, eval
    answers, judge audits and pairs, written directly as the flows write them."""
    store = Store(root)
    store.write("iterations", [iteration_row(i) for i in ITERATIONS], "loop-session")
    for i, (_, _, _, _, _, kl) in ITERATIONS.items():
        if kl is not None:
            store.write("evals", eval_rows(i), f"eval-{i}")
            for table, rows in eval_answer_rows(i).items():
                key = {"prompts": "prompt_id", "responses": "response_id"}.get(table)
                store.write(table, rows, f"eval-{i}")
                ids = [r[key or "judgment_id"] for r in rows]
                store.write("run_rows", [member(f"eval-{i}", table, x) for x in ids], f"eval-{i}")
        principles = ["harmless"] if i % 2 else ["harmless", "honest"]
        pairs = [pair_row(i, n, principles) for n in range(3)]
        store.write("preference_pairs", pairs, f"data-{i}")
        store.write(
            "run_rows",
            [member(f"data-{i}", "preference_pairs", p["pair_id"]) for p in pairs],
            f"data-{i}",
        )
    content = {"constitution_id": CONSTITUTION.constitution_id, "name": "t", "version": "1",
               "content": CONSTITUTION.content}  # fmt: skip
    store.write("constitutions", [content], "data-1")
    models = [model_row(M1, None, 1), model_row(M2, M1, 2), model_row(M3, M1, 3)]
    for model in models:
        store.write("models", [model], f"train-{model['model_id']}")
    audits = [(1, 0.7, "audit-1", 60), (2, 0.65, "audit-2", 120), (3, 0.8, "audit-3", 180),
              (3, 0.55, "audit-3b", 200), (None, 0.99, "cli", 300)]  # fmt: skip
    for iteration, accuracy, run, minutes in audits:
        store.write("judge_evals", audit_rows(iteration, accuracy, run, minutes), run)
    store.write("runs", [session_event(0.6)], "loop-loop-a-0001")
    return store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return build_store(tmp_path / "data")


def test_incumbent_series_keeps_the_incumbent_when_rejected_or_skipped(store: Store) -> None:
    series = incumbent_series(store)
    assert series == [(0, 0.40), (1, 0.30), (2, 0.31), (3, 0.20), (4, 0.20)]
    assert incumbent_series(store, "loop-a", "violation_rate/harmless")[3] == (3, 0.10)
    assert incumbent_series(store, "no-such-loop") == []


def test_loop_history_reads_gates_and_both_sides_of_the_eval(store: Store) -> None:
    history = loop_history(store)
    assert history.loop == "loop-a"
    assert [it.decision for it in history.iterations] == [
        "promoted", "rejected", "promoted", "skipped",
    ]  # fmt: skip
    rejected = history.iterations[1]
    assert rejected.failing() == ["kl"]
    assert rejected.value("baseline/length") == 40.0
    assert rejected.metrics["win_rate"].ci_high == 0.7
    assert history.iterations[3].metrics == {}
    assert history.incumbent() == M3


def test_status_shows_decisions_and_lineage(store: Store) -> None:
    out = io.StringIO()
    print_status(store, console=Console(file=out, width=200))
    text = out.getvalue()
    for word in ("promoted", "rejected", "skipped", "too few pairs", "0.400→0.300"):
        assert word in text
    lineage = next(line for line in text.splitlines() if line.startswith("incumbent "))
    assert lineage == (
        f"incumbent {M3[:12]} (dpo, iteration 3, trained on run data-3) "
        f"← {M1[:12]} (dpo, iteration 1, trained on run data-1) ← {BASE[:12]}"
    )


def test_status_without_iterations_still_lists_models(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    store.write("models", [model_row(M1, None, 1)], "train-1")
    out = io.StringIO()
    print_status(store, console=Console(file=out, width=200))
    assert "No loop iterations" in out.getvalue()
    assert M1[:12] in out.getvalue()


def test_status_of_a_missing_store_raises(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFound):
        print_status(Store(tmp_path / "nothing"), console=Console(file=io.StringIO()))


def test_judge_audits_keep_the_latest_of_each_iteration_and_the_gate(store: Store) -> None:
    judge = judge_audits(store, "loop-a")
    assert [(a.iteration, a.run_id) for a in judge.audits] == [
        (1, "audit-1"), (2, "audit-2"), (3, "audit-3b"),
    ]  # fmt: skip
    latest = judge.latest()
    assert latest is not None and latest.metrics.accuracy == 0.55
    assert [b.count for b in latest.metrics.calibration if b.count] == [25, 14]
    assert judge.min_accuracy == 0.6 and judge.distrusted()
    assert judge_audits(store, "no-such-loop").audits == []


def test_report_says_plainly_when_the_judge_is_not_trusted(store: Store, tmp_path: Path) -> None:
    page = write_report(store, tmp_path / "report.html").read_text(encoding="utf-8")
    assert (
        '<p class="fail">Judge not trusted: gold accuracy 0.550 (iteration 3 audit) is below '
        "min_judge_accuracy 0.600; its win rates promote nothing.</p>"
    ) in page
    assert "Judge on the gold audit set" in page and "Judge reliability, iteration 3 audit" in page
    assert "0.900 / 0.300" in page  # accuracy when chosen is longer / shorter
    assert "<code>audit-3b</code>" in page and "<code>audit-2</code>" in page
    assert "<code>audit-3</code>" not in page and "<code>cli</code>" not in page


def test_report_of_a_trusted_judge_and_of_no_gate(store: Store, tmp_path: Path) -> None:
    store.write("runs", [{**session_event(0.5), "event_id": "later", "updated_at": START
                          + timedelta(days=1)}], "loop-loop-a-0001")  # fmt: skip
    page = write_report(store, tmp_path / "a.html").read_text(encoding="utf-8")
    assert "Judge trusted: gold accuracy 0.550 (iteration 3 audit) is at least" in page
    store.write("runs", [{**session_event(None), "event_id": "latest", "updated_at": START
                          + timedelta(days=2)}], "loop-loop-a-0001")  # fmt: skip
    page = write_report(store, tmp_path / "b.html").read_text(encoding="utf-8")
    assert "no min_judge_accuracy gate is set" in page


def test_report_is_one_self_contained_html_file(store: Store, tmp_path: Path) -> None:
    path = write_report(store, tmp_path / "out" / "report.html")
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<svg") >= 8
    assert not re.search(r"<script|<link|<img", page)  # the model texts are escaped too
    assert "http" not in re.sub(r'xmlns(:\w+)?="[^"]*"|http-equiv', "", page)  # SVG namespaces
    assert "loop-a" in page and str(store.root) in page
    for text in ("kl", "win_rate", "kl 0.9 above 0.5", "too few pairs: 3 &lt; 8", "honest"):
        assert text in page
    assert "FAIL kl 0.9 vs 0.5 (KL too far)" in page
    pairs = pairs_page_path(path)
    assert sorted(path.parent.iterdir()) == sorted([path, pairs])  # no temp file left
    assert pairs.name == "report-pairs.html" and 'href="report-pairs.html"' in page


def test_report_into_a_folder_of_an_empty_loop(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    store.write("models", [model_row(M1, None, 1)], "train-1")
    folder = tmp_path / "reports"
    folder.mkdir()
    path = write_report(store, folder)
    page = path.read_text(encoding="utf-8")
    assert path.parent == folder and "No iterations." in page
    assert "No judge audits in this loop" in page


def test_an_order_free_judge_shows_position_consistency_as_not_applicable(tmp_path: Path) -> None:
    """A contrast judge is position-consistent by construction: the eval's consistency
    column, the audit table and the gate read n/a, never a flat 1.0."""
    store = Store(tmp_path / "data")
    not_applicable = {
        "gate": "min_position_consistency", "metric": "judge_position_consistency",
        "value": None, "threshold": 0.5, "passed": True, "applicable": False,
        "message": "min_position_consistency not applicable: no option order",
    }  # fmt: skip
    row = iteration_row(1)
    store.write("iterations", [{**row, "gates": [*row["gates"], not_applicable]}], "loop-session")
    order_free = {**eval_rows(1)[0], "eval_id": "eval-1-order-free", "metric": "judge/order_free"}
    store.write("evals", [*eval_rows(1), {**order_free, "value": 1.0}], "eval-1")
    audit = [{**r, "mode": "contrast"} for r in audit_rows(1, 0.7, "audit-1", 60)]
    store.write("judge_evals", audit, "audit-1")
    page = write_report(store, tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.count("<td>n/a</td>") == 2  # the iteration's column and the audit's
    assert (
        '<li class="na">n/a min_position_consistency '
        "(min_position_consistency not applicable: no option order)</li>"
    ) in page
    assert "n/a: order-free judge (contrast, likelihood)" in page  # the eval plot
    assert "position consistency: n/a (order-free)" in page  # the audit plot's legend
    out = io.StringIO()
    print_status(store, console=Console(file=out, width=200))
    assert "min_position_consistency n/a" in out.getvalue()


def judgment(n: int, p_a: float, mode: str = "pairwise") -> Judgment:
    return Judgment(
        f"j{n}", f"p{n}", f"a{n}", f"b{n}", "harmless", "c", "judge", mode,  # type: ignore[arg-type]
        p_a, p_a, p_a, True, None, "ok", None,
    )  # fmt: skip


def test_pick_examples_takes_the_strongest_of_each_side_and_the_closest_to_a_half() -> None:
    judged = [judgment(0, 0.6), judgment(1, 0.99), judgment(2, 1.0, "checks"), judgment(3, 0.1),
              judgment(4, 0.52), judgment(5, 0.48), judgment(6, 0.8)]  # fmt: skip
    picked = [(why, j.judgment_id) for why, j in pick_examples(judged)]
    assert picked == [
        ("strongest for the candidate", "j1"), ("strongest for the candidate", "j6"),
        ("strongest for the incumbent", "j3"), ("strongest for the incumbent", "j5"),
        ("closest to 0.5", "j4"),  # j4 and j5 tie at 0.02: j5 was taken; checks rank last
    ]  # fmt: skip
    assert pick_examples(list(reversed(judged))) == pick_examples(judged)
    one_sided = [judgment(n, 0.6 + n / 10) for n in range(4)] + [judgment(9, 0.5)]
    assert [(why, j.judgment_id) for why, j in pick_examples(one_sided)] == [
        ("strongest for the candidate", "j3"), ("strongest for the candidate", "j2"),
        ("next strongest", "j1"), ("next strongest", "j0"), ("closest to 0.5", "j9"),
    ]  # fmt: skip
    assert [why for why, _ in pick_examples([judgment(0, 0.5)])] == ["next strongest"]
    assert pick_examples([]) == []


def test_eval_examples_show_both_answers_their_checks_and_the_judge(store: Store) -> None:
    found = eval_examples(store, loop_history(store))
    assert [(f.iteration, f.judged, len(f.examples)) for f in found] == [(1, 6, 5), (2, 6, 5),
                                                                       (3, 6, 5)]  # fmt: skip
    first = found[0].examples
    assert [ex.prompt for ex in first] == [f"Eval question {n}?" for n in (0, 1, 2, 3, 4)]
    assert first[0].candidate.text == "Short answer 1.0." and first[0].candidate.failed == []
    assert first[0].incumbent.text == incumbent_text(1, 0)
    assert first[0].incumbent.failed == [("concise", "at most 6 words")]
    assert first[1].candidate.finish_reason == "length"
    assert first[0].judgment.response_a_id == "r1-0a"  # the candidate is side A

    page = write_report(store, store.root / "report.html").read_text(encoding="utf-8")
    section = page[page.index("<h2>Answers") : page.index("<h2>Preference pairs")]
    assert section.count("<h3>Iteration") == 3 and section.count("<tr>") == 3 * 6
    for text in (
        "p(candidate better) <b>0.950</b>",
        "candidate shown first 0.900, shown second 1.000; the orders agree",
        "counted as: candidate wins", "counted as: incumbent wins",
        "counted as: tie (position bias)", "fails concise: at most 6 words", "fails no check",
        "cut off by the token budget", "closest to 0.5", "5 of 6 judged eval prompts",
        html.escape(HOSTILE),  # iteration 3's strongest answer for the candidate
    ):  # fmt: skip
        assert text in section, text
    assert "<script" not in page and "<img" not in page


def test_answers_without_the_constitution_say_the_checks_are_unknown(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    store.write("iterations", [iteration_row(1)], "loop-session")
    for table, rows in eval_answer_rows(1).items():
        store.write(table, rows, "eval-1")
        key = {"prompts": "prompt_id", "responses": "response_id"}.get(table, "judgment_id")
        store.write("run_rows", [member("eval-1", table, r[key]) for r in rows], "eval-1")
    page = write_report(store, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "checks unknown: the constitution is not in the store" in page
    assert "No preference pairs of this loop in the store." in page


def test_the_pairs_page_is_escaped_bounded_and_runs_only_its_own_script(
    store: Store, tmp_path: Path
) -> None:
    report = write_report(store, tmp_path / "report.html")
    page = pairs_page_path(report).read_text(encoding="utf-8")
    assert page.count("<tr data-iteration=") == 12 and "All 12 train pairs" in page
    assert html.escape(HOSTILE) in page and HOSTILE not in page
    assert page.count("<script") == 1  # the filter; the hostile text is escaped
    script = page[page.index("<script>") + len("<script>") : page.index("</script>")]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src &#x27;sha256-{digest}&#x27;" in page  # the CSP allows it alone
    assert "http" not in page.replace("http-equiv", "")
    assert 'data-principles="harmless honest" data-p="0.8' in page
    newest = loop_pairs(store, loop_history(store), limit=4)
    assert newest.total == 12 and [r["iteration"] for r in newest.rows] == [4, 4, 4, 3]
    assert MAX_PAIRS >= 1000
