"""The whole collect-preferences flow on the real tiny model, real Prefect, real store."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.pipeline import collect_preferences
from storage import Store

pytestmark = pytest.mark.integration

TABLES = (
    "runs",
    "constitutions",
    "prompts",
    "responses",
    "critiques",
    "judgments",
    "preference_pairs",
)


def counts(store: Store) -> dict[str, int]:
    return {table: store.count(table) for table in TABLES}


def shard_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in (root / "parquet").rglob("*.parquet")}


def stdout_of(*command: str) -> str:
    """What a command prints; a non-zero exit fails the test."""
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def test_flow_fills_every_table(collected):
    config, store, run_id = collected
    n = counts(store)
    train = store.query("SELECT count(*) AS n FROM prompts WHERE split = 'train'")[0]["n"]
    assert n["runs"] == 1 and n["constitutions"] == 1 and n["prompts"] == 10
    assert n["responses"] == train * 3
    assert n["critiques"] == n["responses"]  # one round
    assert n["judgments"] == train * 3  # all pairs of 3 responses
    assert 0 < n["preference_pairs"] <= n["judgments"]
    assert store.query("SELECT status FROM runs")[0]["status"] == "completed"


def test_pairs_carry_lineage(collected):
    _, store, run_id = collected
    orphans = store.query(
        "SELECT count(*) AS n FROM preference_pairs p "
        "LEFT JOIN responses c ON c.response_id = p.chosen_response_id "
        "LEFT JOIN responses r ON r.response_id = p.rejected_response_id "
        "LEFT JOIN judgments j ON j.judgment_id = p.judgment_ids[1] "
        "LEFT JOIN constitutions k ON k.constitution_id = p.constitution_id "
        "WHERE c.text <> p.chosen OR r.text <> p.rejected OR j.judgment_id IS NULL "
        "OR k.constitution_id IS NULL OR p.principle_ids[1] <> j.principle_id"
    )[0]["n"]
    assert orphans == 0
    bad = store.query(
        "SELECT count(*) AS n FROM preference_pairs WHERE p_chosen < 0.5 OR p_chosen > 1 "
        "OR chosen_response_id = rejected_response_id OR run_id <> ?",
        [run_id],
    )[0]["n"]
    assert bad == 0


def test_judgments_follow_the_protocol(collected):
    _, store, _ = collected
    rows = store.query("SELECT * FROM judgments WHERE status = 'ok' AND mode = 'logprob'")
    assert rows, "the demo constitution has model-judged principles"
    for j in rows:
        assert j["p_a"] == pytest.approx((j["p_a_first"] + j["p_a_second"]) / 2)
        assert j["position_consistent"] == ((j["p_a_first"] > 0.5) == (j["p_a_second"] > 0.5))
        assert 0 < j["option_mass"] <= 1
    checked = store.query("SELECT DISTINCT principle_id FROM judgments WHERE mode = 'checks'")
    assert {r["principle_id"] for r in checked} <= {"concise", "no_insults"}


def test_rerun_adds_no_rows(collected):
    config, store, run_id = collected
    before, files = counts(store), shard_files(store.root)
    result = collect_preferences(config=config)
    assert result.run_id == run_id
    assert [c.stage for c in result.stages] == ["prompts", "sample", "critique", "judge", "pairs"]
    assert all(c.computed == 0 and c.reused == c.expected > 0 for c in result.stages)
    assert counts(store) == before
    assert shard_files(store.root) == files


def test_rerun_resumes_after_a_crash(collected):
    config, store, run_id = collected
    before = counts(store)
    responses = {f for f in shard_files(store.root) if f.startswith("parquet/responses")}
    # the crash: judging, pairing and finishing never happened
    for table in ("judgments", "preference_pairs"):
        shutil.rmtree(store.root / "parquet" / table)
    for shard in (store.root / "parquet" / "runs").rglob("*.parquet"):
        if (
            "completed"
            in Store(store.root).query(f"SELECT status FROM read_parquet('{shard}')")[0]["status"]
        ):
            shard.unlink()
    assert store.query("SELECT status FROM runs")[0]["status"] == "running"
    collect_preferences(config=config)
    assert counts(store) == before
    assert {f for f in shard_files(store.root) if f.startswith("parquet/responses")} == responses
    assert store.query("SELECT status FROM runs")[0]["status"] == "completed"


def test_sql_from_another_process(collected):
    _, store, _ = collected
    out = stdout_of(
        sys.executable,
        "-m",
        "flows.cli",
        "sql",
        "--store",
        str(store.root),
        "--format",
        "csv",
        "SELECT count(*) AS n FROM preference_pairs",
    )
    assert out == f"n\n{store.count('preference_pairs')}\n"
    plain = stdout_of(
        sys.executable,
        "-c",
        "import duckdb, sys; con = duckdb.connect(sys.argv[1], read_only=True); "
        "print(con.execute('SELECT count(*) FROM judgments').fetchall()[0][0])",
        str(store.db_path),
    )
    assert int(plain) == store.count("judgments")


def test_the_duckdb_cli_opens_the_same_file(collected):
    _, store, _ = collected
    duckdb_cli = Path(sys.executable).parent / "duckdb"  # from the duckdb-cli package
    out = stdout_of(
        str(duckdb_cli),
        "-readonly",
        "-csv",
        str(store.db_path),
        "-c",
        "SELECT count(*) AS n FROM preference_pairs",
    )
    assert out == f"n\n{store.count('preference_pairs')}\n"


# --- Incremental re-labelling: an edit recomputes only what used the edited part -------


def _run_judgments(store: Store, run_id: str) -> dict[str, set[str]]:
    """The run's judgment ids (its run_rows), by principle."""
    rows = store.query(
        "SELECT principle_id, judgment_id FROM judgments WHERE judgment_id IN "
        "(SELECT row_id FROM run_rows WHERE run_id = ? AND table_name = 'judgments')",
        [run_id],
    )
    found: dict[str, set[str]] = {}
    for row in rows:
        found.setdefault(row["principle_id"], set()).add(row["judgment_id"])
    return found


def _rerun_edited(collected, tmp_path: Path, edit) -> tuple[Store, str, object]:
    """Rerun the collected config on a copy of its store with an edited constitution."""
    import yaml

    config, store, _ = collected
    root = tmp_path / "store"
    shutil.copytree(store.root, root)
    doc = yaml.safe_load(Path(config.constitution).read_text(encoding="utf-8"))
    edit({p["id"]: p for p in doc["principles"]})
    path = tmp_path / "constitution.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    edited = config.model_copy(update={"store": str(root), "constitution": str(path)})
    return Store(root), edited, collect_preferences(config=edited)


def test_editing_one_principle_text_relabels_only_its_judgments(collected, tmp_path):
    _, _, run_id = collected

    def edit(principles: dict) -> None:
        principles["honest"]["principle"] += " Say so when you are unsure."

    store, _, result = _rerun_edited(collected, tmp_path, edit)
    before, after = _run_judgments(store, run_id), _run_judgments(store, result.run_id)
    assert result.run_id != run_id and before["honest"]
    # The text does not decide which comparisons a principle gets, only their labels.
    assert {p: len(ids) for p, ids in after.items()} == {p: len(ids) for p, ids in before.items()}
    for principle in before:
        if principle == "honest":
            assert after[principle].isdisjoint(before[principle])
        else:
            assert after[principle] == before[principle]
    stages = {c.stage: c for c in result.stages}
    assert stages["sample"].computed == 0 and stages["critique"].computed == 0
    assert stages["judge"].computed == len(before["honest"])
    assert stages["judge"].reused == sum(map(len, before.values())) - len(before["honest"])


def test_raising_one_weight_moves_only_comparisons_to_that_principle(collected, tmp_path):
    _, _, run_id = collected

    def edit(principles: dict) -> None:
        principles["harmless"]["weight"] = 4

    store, _, result = _rerun_edited(collected, tmp_path, edit)
    before, after = _run_judgments(store, run_id), _run_judgments(store, result.run_id)
    gained = after["harmless"] - before.get("harmless", set())
    assert gained, "a fourfold weight wins some comparisons"
    assert before.get("harmless", set()) <= after["harmless"]
    for principle in before.keys() - {"harmless"}:
        assert after.get(principle, set()) <= before[principle]
    stages = {c.stage: c for c in result.stages}
    assert stages["judge"].computed == len(gained)
    assert stages["pairs"].computed <= len(gained)
