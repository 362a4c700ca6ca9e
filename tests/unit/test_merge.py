"""Model merging with known answers, on tiny safetensors folders written here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file

import flows.models
from alignment.merge import MergeConfig, MergeError, merge_models, slerp, ties, trim
from flows.cli import main
from storage import Store

TRAIN_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "train-demo.yaml"


def write_model(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """A model folder: config, tokenizer config and the tensors in `shards` files."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "dtype": "float32"}))
    (folder / "tokenizer_config.json").write_text("{}")
    names = list(tensors)
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[i::shards]}
        save_file(part, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def random_tensors(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(8, 4, generator=generator).to(dtype),
        "layer.weight": torch.randn(4, 4, generator=generator).to(dtype),
        "layer.bias": torch.randn(4, generator=generator).to(dtype),
        "position_ids": torch.arange(8),  # an integer buffer: copied from the first model
    }


def merged(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.fixture
def two_models(tmp_path: Path) -> tuple[Path, Path]:
    return write_model(tmp_path / "a", random_tensors(0)), write_model(
        tmp_path / "b", random_tensors(1)
    )


# --- known answers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        MergeConfig(method="linear"),
        MergeConfig(method="linear", weights=[0.3, 0.7]),
        MergeConfig(method="slerp", t=0.3),
    ],
    ids=["linear", "linear-0.3-0.7", "slerp"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_model_merged_with_itself_is_itself(
    tmp_path: Path, config: MergeConfig, dtype: torch.dtype
) -> None:
    model = write_model(tmp_path / "a", random_tensors(0, dtype))
    out = merge_models([model, model], tmp_path / "out", config)
    for name, tensor in merged(out).items():
        assert tensor.dtype == random_tensors(0, dtype)[name].dtype
        torch.testing.assert_close(tensor, merged(model)[name], rtol=1e-6, atol=0)
    assert json.loads((out / "config.json").read_text())["model_type"] == "toy"
    assert (out / "tokenizer_config.json").is_file()


def test_linear_weights_one_and_zero_give_the_first_model(two_models: tuple[Path, Path]) -> None:
    a, b = two_models
    out = merge_models([a, b], a.parent / "out", MergeConfig(weights=[1, 0]))
    first = merged(a)
    assert all(torch.equal(tensor, first[name]) for name, tensor in merged(out).items())


def test_linear_default_is_the_mean_and_weights_are_normalised(
    two_models: tuple[Path, Path],
) -> None:
    a, b = two_models
    mean = merged(merge_models([a, b], a.parent / "mean", MergeConfig()))
    scaled = merged(merge_models([a, b], a.parent / "scaled", MergeConfig(weights=[3, 3])))
    expected = (merged(a)["layer.weight"] + merged(b)["layer.weight"]) / 2
    torch.testing.assert_close(mean["layer.weight"], expected)
    assert torch.equal(scaled["layer.weight"], mean["layer.weight"])


def test_slerp_of_orthogonal_tensors_keeps_the_norm() -> None:
    a = torch.tensor([3.0, 0.0, 0.0, 0.0])
    b = torch.tensor([0.0, 0.0, 3.0, 0.0])
    middle = slerp(a, b, 0.5)
    torch.testing.assert_close(middle.norm(), torch.tensor(3.0))
    torch.testing.assert_close(middle, torch.tensor([3 / math.sqrt(2), 0, 3 / math.sqrt(2), 0]))
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    # A linear mean of the same two would shrink the norm to 3 / sqrt(2).
    torch.testing.assert_close(((a + b) / 2).norm(), torch.tensor(3 / math.sqrt(2)))


def test_slerp_of_colinear_tensors_is_linear() -> None:
    a = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(slerp(a, 2 * a, 0.5), 1.5 * a)
    assert torch.equal(slerp(a, torch.zeros(3), 0.25), 0.75 * a)  # no angle to a zero vector


def test_slerp_ends_of_two_folders(two_models: tuple[Path, Path]) -> None:
    a, b = two_models
    start = merged(merge_models([a, b], a.parent / "t0", MergeConfig(method="slerp", t=0)))
    end = merged(merge_models([a, b], a.parent / "t1", MergeConfig(method="slerp", t=1)))
    assert all(torch.equal(start[name], tensor) for name, tensor in merged(a).items())
    floats = {name: tensor for name, tensor in merged(b).items() if tensor.is_floating_point()}
    assert all(torch.equal(end[name], tensor) for name, tensor in floats.items())


def test_trim_keeps_the_largest_magnitudes() -> None:
    vector = torch.tensor([0.1, -3.0, 2.0, -0.5, 1.0])
    assert torch.equal(trim(vector, 0.4), torch.tensor([0.0, -3.0, 2.0, 0.0, 0.0]))
    assert torch.equal(trim(vector, 1.0), vector)


def test_ties_elects_signs_and_averages_the_agreeing_entries() -> None:
    parent = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    # Task vectors (model - parent); density 0.6 keeps the 3 largest magnitudes of 5.
    tau = torch.tensor(
        [
            [2.0, -1.0, 3.0, 0.5, -4.0],  # trimmed: [2, 0, 3, 0, -4]
            [-1.5, -2.0, 1.0, 0.1, 5.0],  # trimmed: [-1.5, -2, 0, 0, 5]
            [3.0, 4.0, -6.0, 0.2, -1.0],  # trimmed: [3, 4, -6, 0, 0]
        ]
    )
    # Summed trimmed vectors: [3.5, 2, -3, 0, 1] -> elected signs [+, +, -, 0, +].
    # Agreeing entries, averaged:  e0: (2 + 3) / 2 = 2.5;  e1: 4 / 1 = 4;  e2: -6 / 1 = -6;
    # e3: nothing kept, 0;  e4: 5 / 1 = 5 (the -4 disagrees).
    expected = parent + torch.tensor([2.5, 4.0, -6.0, 0.0, 5.0])
    result = ties(list(parent + tau), parent, [1 / 3] * 3, density=0.6)
    torch.testing.assert_close(result, expected)


def test_ties_through_folders_with_a_parent(tmp_path: Path) -> None:
    parent = write_model(tmp_path / "parent", {"w": torch.ones(5)})
    tau = [[2.0, -1.0, 3.0, 0.5, -4.0], [-1.5, -2.0, 1.0, 0.1, 5.0], [3.0, 4.0, -6.0, 0.2, -1.0]]
    models = [
        write_model(tmp_path / f"m{i}", {"w": 1 + torch.tensor(t)}) for i, t in enumerate(tau)
    ]
    out = merge_models(models, tmp_path / "out", MergeConfig(method="ties", density=0.6), parent)
    torch.testing.assert_close(merged(out)["w"], torch.tensor([3.5, 5.0, -5.0, 1.0, 6.0]))


def test_shards_and_index_keep_the_first_models_layout(tmp_path: Path) -> None:
    a = write_model(tmp_path / "a", random_tensors(0), shards=2)
    b = write_model(tmp_path / "b", random_tensors(1))  # one file: layouts may differ
    out = merge_models([a, b], tmp_path / "out", MergeConfig())
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(
        p.name for p in a.glob("*.safetensors")
    )
    assert (out / "model.safetensors.index.json").read_text() == (
        a / "model.safetensors.index.json"
    ).read_text()
    assert merged(out).keys() == random_tensors(0).keys()


# --- refusals ------------------------------------------------------------------------------


def test_mismatched_shapes_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    a = write_model(tmp_path / "a", random_tensors(0))
    other = {**random_tensors(1), "layer.weight": torch.zeros(4, 5)}
    b = write_model(tmp_path / "b", other)
    with pytest.raises(MergeError, match=r"tensor 'layer.weight' has shape \[4, 4\] in .*a but"):
        merge_models([a, b], tmp_path / "out", MergeConfig())
    assert not (tmp_path / "out").exists()


def test_a_missing_tensor_is_refused(tmp_path: Path) -> None:
    a = write_model(tmp_path / "a", random_tensors(0))
    b = write_model(
        tmp_path / "b", {k: v for k, v in random_tensors(1).items() if k != "layer.bias"}
    )
    with pytest.raises(MergeError, match="b has no tensor 'layer.bias'"):
        merge_models([a, b], tmp_path / "out", MergeConfig())


@pytest.mark.parametrize(
    ("models", "config", "parent", "message"),
    [
        (3, MergeConfig(method="slerp"), False, "slerp merges exactly two models, got 3"),
        (2, MergeConfig(weights=[1, 2, 3]), False, "got 3 weights for 2 models"),
        (2, MergeConfig(method="ties"), False, "ties needs the models' common parent"),
        (2, MergeConfig(), True, "a parent model is used by ties only"),
        (1, MergeConfig(), False, "merging needs at least two models"),
    ],
)
def test_bad_settings_are_refused(
    tmp_path: Path, models: int, config: MergeConfig, parent: bool, message: str
) -> None:
    folder = write_model(tmp_path / "a", random_tensors(0))
    with pytest.raises(MergeError, match=message):
        merge_models([folder] * models, tmp_path / "out", config, folder if parent else None)
    assert not (tmp_path / "out").exists()


def test_negative_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="weights must be >= 0"):
        MergeConfig(weights=[1, -1])


# --- the command ----------------------------------------------------------------------------


def rlaif(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="rlaif")


@pytest.fixture
def cli_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str, str]:
    """Two model folders and a store path; file hashes cached in tmp_path."""
    monkeypatch.setattr(flows.models, "hash_cache_path", lambda: tmp_path / "hashes.json")
    a = write_model(tmp_path / "a", random_tensors(0))
    b = write_model(tmp_path / "b", random_tensors(1))
    return str(a), str(b), str(tmp_path / "store")


def test_cli_merge_registers_once(cli_models: tuple[str, str, str]) -> None:
    a, b, store = cli_models
    args = ("merge", a, b, "--method", "linear", "--weights", "1,3", "--config", str(TRAIN_CONFIG))
    first = rlaif(*args, "--store", store)
    assert (first.exit_code, first.stderr) == (0, "")
    rows = Store(store).query("SELECT * FROM models")
    assert len(rows) == 1
    row = rows[0]
    assert first.stdout == f"merge model {row['model_id']} registered\n"
    # Unregistered folders: no parent model_id; lineage follows base_model (as training).
    assert row["stage"] == "merge" and row["parent_model_id"] is None
    config = json.loads(row["config"]) if isinstance(row["config"], str) else row["config"]
    assert row["base_model"] == config["parents"][0]
    assert config["method"] == "linear" and config["weights"] == [0.25, 0.75]
    assert config["parent"] is None and config["t"] is None and len(config["parents"]) == 2
    assert Path(row["path"]).name == f"merge-{row['model_id'][:12]}"
    expected = (
        0.25 * load_file(Path(a) / "model.safetensors")["layer.weight"]
        + 0.75 * load_file(Path(b) / "model.safetensors")["layer.weight"]
    )
    torch.testing.assert_close(merged(Path(row["path"]))["layer.weight"], expected)

    again = rlaif(*args, "--store", store)
    assert again.stdout == f"merge model {row['model_id']} already registered\n"
    assert Store(store).count("models") == 1

    # The merged model is a name `rlaif merge` (and train, eval) accept.
    chained = rlaif("merge", row["model_id"], a, "--config", str(TRAIN_CONFIG), "--store", store)
    assert chained.exit_code == 0, chained.output
    assert Store(store).count("models") == 2


UNKNOWN = (
    "error: unknown model 'nowhere': not an embedded model (tiny, smollm2, ...), a model_id "
    "registered in {store}, or a model folder\n"
)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--method", "slerp", "{a}"), "error: slerp merges exactly two models, got 3\n"),
        (("--weights", "1,2,3"), "error: got 3 weights for 2 models\n"),
        (
            ("--weights", "1,x"),
            "error: --weights: expected numbers separated by commas, got '1,x'\n",
        ),
        (
            ("--weights", "1,-2"),
            "error: --weights: weights must be >= 0 with a positive sum, got [1.0, -2.0]\n",
        ),
        (("--method", "ties"), "error: ties needs the models' common parent (--parent)\n"),
        (("--parent", "{a}"), "error: a parent model is used by ties only, not by linear\n"),
        (("--parent", "nowhere", "--method", "ties"), UNKNOWN),
    ],
)
def test_cli_refuses_bad_input_and_writes_nothing(
    cli_models: tuple[str, str, str], extra: tuple[str, ...], message: str
) -> None:
    a, b, store = cli_models
    extra = tuple(arg.format(a=a) for arg in extra)
    result = rlaif("merge", a, b, *extra, "--config", str(TRAIN_CONFIG), "--store", store)
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == message.format(store=Path(store).resolve())
    assert not Path(store).exists()


def test_cli_refuses_mismatched_models(cli_models: tuple[str, str, str], tmp_path: Path) -> None:
    a, _, store = cli_models
    c = write_model(tmp_path / "c", {**random_tensors(1), "embed.weight": torch.zeros(9, 4)})
    result = rlaif("merge", a, str(c), "--config", str(TRAIN_CONFIG), "--store", store)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: tensor 'embed.weight' has shape [8, 4] in ")
    assert not Path(store).exists()


# --- mergekit, where it is installed --------------------------------------------------------


def test_agrees_with_mergekit(two_models: tuple[Path, Path]) -> None:
    pytest.importorskip("mergekit")
    from mergekit.merge_methods.slerp import slerp as mergekit_slerp

    a, b = (load_file(folder / "model.safetensors") for folder in two_models)
    for name in ("embed.weight", "layer.weight", "layer.bias"):
        ours = slerp(a[name], b[name], 0.3)
        # mergekit (0.1.5) interpolates each row of the leading axis on its own; one row
        # holding the whole flattened tensor is the per-tensor SLERP this project does.
        whole = (x.reshape(1, -1) for x in (a[name], b[name]))
        theirs = mergekit_slerp(torch.tensor([0.3]), *whole).reshape(a[name].shape)
        torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-5, atol=1e-6)
        mean = merged(merge_models(list(two_models), two_models[0].parent / name, MergeConfig()))
        torch.testing.assert_close(mean[name], 0.5 * a[name] + 0.5 * b[name])


def test_weighted_sum_in_chunks_equals_the_whole_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    import alignment.merge as merge

    a, b = torch.randn(7, 5).to(torch.bfloat16), torch.randn(7, 5).to(torch.bfloat16)
    whole = (0.3 * a.float() + 0.7 * b.float()).to(torch.bfloat16)
    monkeypatch.setattr(merge, "CHUNK", 4)  # 35 elements: 9 chunks, the last one short
    assert torch.equal(merge.weighted_sum([a, b], [0.3, 0.7], torch.bfloat16), whole)
    coef = merge.slerp_coefficients(a, b, 0.4)
    expected = merge.slerp(a.float(), b.float(), 0.4)
    assert torch.equal(merge.weighted_sum([a, b], coef, torch.float32), expected)


def test_the_streamed_writer_writes_what_safetensors_reads(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from alignment.merge import write_safetensors

    tensors = {"w": torch.arange(6, dtype=torch.bfloat16).view(2, 3), "n": torch.tensor(3)}
    layout = {"w": ("BF16", [2, 3]), "n": ("I64", [])}
    write_safetensors(tmp_path / "m.safetensors", layout, iter(tensors.values()))
    loaded = load_file(tmp_path / "m.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with pytest.raises(MergeError, match="w: merged as torch.float32"):
        write_safetensors(tmp_path / "x.safetensors", layout, iter([torch.zeros(2, 3)]))
