"""Evaluation arithmetic: intervals, win rates (raw and length-controlled), violation and
degenerate rates, and the exact KL at the sampling temperature against closed forms."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from alignment.constitution import from_dict
from alignment.evaluation import (
    Metric,
    degenerate_rates,
    is_repetitive,
    kl_metrics,
    kl_to_baseline,
    lc_win_rate,
    sequence_kls,
    token_kl,
    violation_rates,
    wilson_interval,
    win_rate,
)
from alignment.judge import Judgment
from tests.unit.judgments import judgment

# --- win rate -------------------------------------------------------------------------------


def test_wilson_interval_known_values():
    # 8 of 10 at 95 %: the textbook interval (0.490, 0.943)
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(1 - high) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(8, 10, confidence=0.99)[0] < wilson_interval(8, 10)[0]


def test_win_rate_counts_ties_and_inconsistent_orders_as_half_and_skips_failed_judgments():
    js = [
        judgment(0.8),
        judgment(0.3),
        judgment(0.5, mode="checks"),
        judgment(None, status="refusal", consistent=None),
        judgment(0.9, consistent=False),  # the two orders disagreed: a tie, not a win
    ]
    metrics = {m.metric: m for m in win_rate(js)}
    assert metrics["win_rate"].value == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    assert metrics["win_rate"].n == 4
    assert metrics["win_rate"].ci_low < metrics["win_rate"].value < metrics["win_rate"].ci_high
    # The soft rate on the same comparisons: the inconsistent one is 1/2 there too.
    assert metrics["mean_p_win"].value == pytest.approx((0.8 + 0.3 + 0.5 + 0.5) / 4)
    assert (
        metrics["mean_p_win"].ci_low < metrics["mean_p_win"].value < metrics["mean_p_win"].ci_high
    )
    assert metrics["judge_position_consistency"].value == pytest.approx(2 / 3)  # checks excluded
    assert metrics["judge_not_ok"].value == 1


def rates(js: list[Judgment], lengths: dict[str, int], **kwargs) -> dict[str, Metric]:
    """All four rates by name: win_rate and mean_p_win, raw and length-controlled."""
    return {m.metric: m for m in [*win_rate(js), *lc_win_rate(js, lengths, **kwargs)]}


RATES = ("win_rate", "mean_p_win", "lc_win_rate", "lc_mean_p_win")


def test_a_judge_that_always_says_a_gives_exactly_one_half_on_every_rate():
    # Order 1 reads "A" as the candidate, order 2 as the baseline: P1 high, P2 low, and
    # their mean leans either way; neither order carries a preference (fooled-metric check).
    js = []
    for i, (p1, p2) in enumerate([(0.95, 0.25), (0.9, 0.05), (0.99, 0.4), (0.8, 0.3)]):
        js.append(
            Judgment(
                f"j{i}", "p", f"a{i}", f"b{i}", "x", "c", "judge", "pairwise", p1, p2,
                (p1 + p2) / 2, (p1 > 0.5) == (p2 > 0.5), 0.9, "ok", None,
            )
        )  # fmt: skip
    lengths = {f"a{i}": 10 + 5 * i for i in range(4)} | {f"b{i}": 12 for i in range(4)}
    found = rates(js, lengths)
    assert [found[name].value for name in RATES] == pytest.approx([0.5] * 4, abs=1e-9)


# --- length-controlled rates ----------------------------------------------------------------


def comparisons(outcomes, diffs) -> tuple[list[Judgment], dict[str, int]]:
    """Judgments with p_a = outcome, candidate a{i} diffs[i] tokens longer than b{i}."""
    js = [judgment(float(y), a=f"a{i}", b=f"b{i}") for i, y in enumerate(outcomes)]
    lengths = {f"a{i}": 100 + int(d) for i, d in enumerate(diffs)} | {
        f"b{i}": 100 for i in range(len(diffs))
    }
    return js, lengths


def tanh_z(diffs) -> np.ndarray:
    """The GLM's length feature: tanh of the difference over its sample sd (not centred)."""
    diffs = np.asarray(diffs, float)
    return np.tanh(diffs / diffs.std(ddof=1))


def test_a_judge_that_only_prefers_the_longer_answer_gives_lc_one_half():
    # Hard: the longer answer always wins; the candidate is longer in 36 of 48, by 1 to 36
    # tokens, shorter in 12 by 1 to 12. At equal length this judge has no preference.
    diffs = [*range(1, 37), *range(-1, -13, -1)]
    found = rates(*comparisons([float(d > 0) for d in diffs], diffs))
    assert found["win_rate"].value == found["mean_p_win"].value == 0.75
    assert found["lc_win_rate"].value == pytest.approx(0.5, abs=0.01)
    assert found["lc_mean_p_win"].value == pytest.approx(0.5, abs=0.01)
    assert found["lc_win_rate"].n == 48
    assert found["lc_win_rate"].ci_low <= 0.5 <= found["lc_win_rate"].ci_high
    # Soft: p_a is exactly the GLM with no model term, σ(2 tanh z).
    found = rates(*comparisons(1 / (1 + np.exp(-2 * tanh_z(diffs))), diffs))
    assert found["mean_p_win"].value > 0.6
    assert found["lc_mean_p_win"].value == pytest.approx(0.5, abs=0.01)
    # Hard outcomes drawn from it: the LC rate finds 0.5 within its sampling error.
    rng = np.random.default_rng(4)
    diffs = rng.integers(-20, 60, 600)
    wins = rng.random(600) < 1 / (1 + np.exp(-3 * tanh_z(diffs)))
    found = rates(*comparisons(wins, diffs))
    assert found["win_rate"].ci_low > 0.65
    assert found["lc_win_rate"].value == pytest.approx(0.5, abs=0.03)
    assert found["lc_win_rate"].ci_low < 0.5 < found["lc_win_rate"].ci_high


def test_a_judge_that_prefers_the_candidate_at_every_length_gives_lc_equal_to_raw():
    # At each of 8 length differences, 7 of 10 comparisons are candidate wins: the outcome
    # does not depend on length, so the fitted slope is 0 and LC is the raw rate exactly.
    diffs = np.repeat([-25, -12, -4, 0, 3, 9, 20, 40], 10)
    wins = np.tile([1.0] * 7 + [0.0] * 3, 8)
    found = rates(*comparisons(wins, diffs))
    assert found["win_rate"].value == pytest.approx(0.7)
    assert found["lc_win_rate"].value == pytest.approx(0.7, abs=1e-6)
    found = rates(*comparisons(np.full(80, 0.7), diffs))  # soft: p_a = 0.7 at every length
    assert found["lc_mean_p_win"].value == pytest.approx(0.7, abs=1e-6)
    found = rates(*comparisons(np.ones(80), diffs))  # the candidate wins every comparison
    assert found["lc_win_rate"].value == pytest.approx(1.0, abs=1e-6)
    # Random outcomes blind to length: LC and raw agree within sampling error.
    rng = np.random.default_rng(2)
    found = rates(*comparisons(rng.random(64) < 0.7, rng.integers(-30, 30, 64)))
    assert found["lc_win_rate"].value == pytest.approx(found["win_rate"].value, abs=0.05)
    assert found["lc_win_rate"].ci_low < found["win_rate"].value < found["lc_win_rate"].ci_high


def test_a_shorter_but_equally_good_candidate_gives_one_half_raw_and_lc():
    # The candidate is the baseline's answer cut 4 to 30 tokens shorter, and the judge is
    # blind to length: at every difference it prefers each side once (hard), or gives the
    # pair p_a = q and 1 - q (soft). Truth: 0.5 on every rate, although z is never 0.
    diffs = np.repeat(-np.arange(4, 31), 2)
    found = rates(*comparisons(np.tile([1.0, 0.0], 27), diffs))
    assert [found[name].value for name in RATES] == pytest.approx([0.5] * 4, abs=1e-6)
    q = np.linspace(0.55, 0.9, 27)
    found = rates(*comparisons(np.column_stack([q, 1 - q]).ravel(), diffs))
    assert found["lc_mean_p_win"].value == pytest.approx(0.5, abs=1e-6)
    assert found["mean_p_win"].value == pytest.approx(0.5)


def test_near_hard_labels_give_the_hard_rates_and_mid_labels_only_the_soft_ones_shrink():
    # One pattern of who wins (with a length preference), judged with near-hard labels
    # (0.99 / 0.01) and with a contrast-like judge's mid labels (0.6 / 0.4).
    rng = np.random.default_rng(5)
    diffs = rng.integers(-30, 40, 200)
    wins = rng.random(200) < 1 / (1 + np.exp(-(0.8 + 1.5 * tanh_z(diffs))))
    sharp = rates(*comparisons(np.where(wins, 0.99, 0.01), diffs))
    mild = rates(*comparisons(np.where(wins, 0.6, 0.4), diffs))
    assert sharp["mean_p_win"].value == pytest.approx(0.01 + 0.98 * sharp["win_rate"].value)
    assert sharp["lc_mean_p_win"].value == pytest.approx(sharp["lc_win_rate"].value, abs=0.02)
    # The hard rates read the same winners, whatever the judge's confidence ...
    for name in ("win_rate", "lc_win_rate"):
        assert mild[name] == sharp[name]
    # ... the soft ones move 0.2 / 0.98 as far from 0.5 (the LC fit is near-linear there).
    assert mild["lc_win_rate"].value > 0.6
    assert mild["lc_mean_p_win"].value - 0.5 == pytest.approx(
        (sharp["lc_mean_p_win"].value - 0.5) * 0.2 / 0.98, abs=0.01
    )


def test_lc_bootstrap_repeats_and_equal_lengths_need_no_slope():
    js, lengths = comparisons([0.9, 0.8, 0.2, 0.7], [0, 0, 0, 0])  # sd 0: z = 0
    first, second = lc_win_rate(js, lengths, seed=3), lc_win_rate(js, lengths, seed=3)
    assert first == second
    found = {m.metric: m.value for m in first}
    assert found["lc_win_rate"] == pytest.approx(3 / 4, abs=1e-6)  # the raw hard rate
    assert found["lc_mean_p_win"] == pytest.approx((0.9 + 0.8 + 0.2 + 0.7) / 4, abs=1e-6)
    assert win_rate(js, seed=3) == win_rate(js, seed=3)
    assert lc_win_rate([judgment(None, status="refusal")], lengths) == []


# --- the peer's own code: AlpacaEval 0.6.6 ---------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("glm", ["length_controlled_noreg", "length_controlled_minimal"])
@pytest.mark.parametrize("soft", [False, True])
def test_lc_matches_alpaca_eval_get_length_controlled_winrate(glm, soft, tmp_path, monkeypatch):
    """Our LC rate against alpaca_eval.metrics.get_length_controlled_winrate (the `peers` extra).

    Its annotations: one row per instruction, the row label indexing instruction_difficulty;
    output_1 the baseline's text, output_2 the model's (length = characters, .str.len());
    preference 1 (baseline wins) to 2 (model wins), 0 or 1.5 a tie, fractions allowed;
    generator_1 and generator_2 one name each. Its model: logistic regression of preference - 1
    on tanh((len_1 - len_2) / sd), instruction_difficulty and a model term (no intercept),
    L1 with C by 5-fold CV; LC = mean prediction with the length term 0. It downloads the
    difficulties (tatsu-lab/alpaca_eval df_gamed.csv); here hf_hub_download is stubbed by a
    file of synthetic ones. The "noreg" formula uses them, "minimal" does not (our default).
    """
    pd = pytest.importorskip("pandas")
    pytest.importorskip("alpaca_eval")
    from alpaca_eval.metrics import glm_winrate

    n, rng = 805, np.random.default_rng(7)  # 805: AlpacaEval's own instruction count
    hardness = rng.normal(0, 1, n)
    gamed = tmp_path / "df_gamed.csv"
    pd.DataFrame({"model": "m", "index": range(n), "instruction_difficulty": hardness}).to_csv(
        gamed, index=False
    )
    monkeypatch.setattr(glm_winrate, "hf_hub_download", lambda **kwargs: str(gamed))
    base, cand = rng.integers(200, 2000, n), rng.integers(200, 2500, n)
    uses_difficulty = glm == "length_controlled_noreg"
    eta = 0.3 + 1.0 * tanh_z(cand - base) + (0.6 * hardness if uses_difficulty else 0.0)
    p = 1 / (1 + np.exp(-eta))
    y = p if soft else (rng.random(n) < p).astype(float)
    annotations = pd.DataFrame(
        {"output_1": ["b" * k for k in base], "output_2": ["c" * k for k in cand],
         "preference": 1 + y, "generator_1": "start", "generator_2": "candidate"}
    )  # fmt: skip
    theirs = glm_winrate.get_length_controlled_winrate(
        annotations, glm_name=glm, save_weights_dir=None, is_warn_extreme_changes=False
    )
    js = [
        judgment(y[i], a=f"c{i}", b=f"b{i}", prompt=f"p{i}") for i in range(n)
    ]  # the candidate is side A; lengths in characters, as AlpacaEval counts them
    lengths = {f"c{i}": len(annotations.output_2[i]) for i in range(n)} | {
        f"b{i}": len(annotations.output_1[i]) for i in range(n)
    }
    difficulty = {f"p{i}": float(hardness[i]) for i in range(n)} if uses_difficulty else None
    ours = rates(js, lengths, difficulty=difficulty, resamples=20)
    raw, lc = ("mean_p_win", "lc_mean_p_win") if soft else ("win_rate", "lc_win_rate")
    assert ours[raw].value == pytest.approx(theirs["win_rate"] / 100, abs=1e-9)
    assert ours[lc].value == pytest.approx(theirs["length_controlled_winrate"] / 100, abs=0.01)
    assert abs(ours[lc].value - ours[raw].value) > 0.02  # the length term mattered


# --- violations and degenerate output -------------------------------------------------------


def test_violation_rates_per_checked_principle_and_overall():
    constitution = from_dict(
        {
            "name": "t",
            "version": 1,
            "principles": [
                {
                    "id": "short",
                    "principle": "p",
                    "critique": "c",
                    "revision": "r",
                    "checks": [{"max_words": 3}],
                },
                {
                    "id": "polite",
                    "principle": "p",
                    "critique": "c",
                    "revision": "r",
                    "checks": [{"regex_must_not": "(?i)idiot"}],
                },
                {"id": "model", "principle": "p", "critique": "c", "revision": "r"},
            ],
        }
    )
    rates = {
        m.metric: m.value
        for m in violation_rates(
            constitution, ["ok", "one two three four", "idiot", "idiot one two three"], "x/"
        )
    }
    assert rates == {
        "x/violation_rate/short": 0.5,
        "x/violation_rate/polite": 0.5,
        "x/violation_rate": 0.75,
    }


@pytest.mark.parametrize(
    ("text", "repetitive"),
    [
        ("yes yes yes", True),  # one word repeated
        ("Yes yes", False),  # too few words to call it a loop
        ("the cat sat on the mat and the dog sat too", False),
        ("I am here. I am here. I am here. I am here.", True),  # 3 distinct 3-grams of 10
        ("one two three four five six seven", False),
    ],
)
def test_is_repetitive(text: str, repetitive: bool) -> None:
    assert is_repetitive(text) is repetitive


def test_degenerate_rates() -> None:
    texts = ["", "  ", "Ok.", "Paris is the capital.", "go go go go", "A full sentence here."]
    reasons = ["stop", "stop", "stop", "length", "length", "stop"]
    rates = {m.metric: m.value for m in degenerate_rates(texts, reasons, prefix="baseline/")}
    assert rates == {
        "baseline/degenerate/empty": pytest.approx(2 / 6),
        "baseline/degenerate/short": pytest.approx(3 / 6),
        "baseline/degenerate/repetitive": pytest.approx(1 / 6),
        "baseline/degenerate/no_stop": pytest.approx(2 / 6),
        "baseline/degenerate_rate": pytest.approx(4 / 6),
    }
    assert degenerate_rates([], []) == []
    assert {m.metric: m.value for m in degenerate_rates(["a b"], ["stop"], min_words=2)}[
        "degenerate/short"
    ] == 0.0


# --- KL -------------------------------------------------------------------------------------


def closed_form_kl(candidate: np.ndarray, baseline: np.ndarray) -> float:
    """KL(softmax(candidate) ‖ softmax(baseline)) in plain numpy."""
    p = np.exp(candidate - np.logaddexp.reduce(candidate))
    log_q = baseline - np.logaddexp.reduce(baseline)
    return float(np.sum(p * (np.log(p) - log_q)))


def test_token_kl_matches_the_closed_form_with_the_temperature_on_both_sides():
    c, b = np.array([2.0, 0.0, -1.0]), np.array([0.0, 1.0, 0.5])
    cand, base = torch.from_numpy(c[None]), torch.from_numpy(b[None])
    both, one_side = closed_form_kl(c / 0.5, b / 0.5), closed_form_kl(c / 0.5, b)
    assert token_kl(cand, base, 0.5).item() == pytest.approx(both, rel=1e-12)
    assert abs(both - one_side) > 0.1  # a temperature on one side only would be caught
    assert token_kl(cand, base, 0.0).item() == pytest.approx(closed_form_kl(c, b), rel=1e-12)
    assert token_kl(cand, cand, 0.7).item() == pytest.approx(0, abs=1e-12)


def test_token_kl_is_non_negative_and_zero_only_for_equal_distributions():
    torch.manual_seed(0)
    cand, base = 3 * torch.randn(50, 1000), 3 * torch.randn(50, 1000)
    assert (token_kl(cand, base, 0.7) > 0).all()
    # Shifting every logit by a constant leaves the distribution, and a KL of 0.
    assert token_kl(cand, cand + 4.0, 0.7) == pytest.approx(torch.zeros(50), abs=1e-12)
    with pytest.raises(ValueError, match="share one tokenizer"):
        token_kl(cand, base[:, :999], 1.0)


VOCAB = "<>abcd"  # one token per character; "<" and ">" are the chat template's


class CharTokenizer:
    """A chat template "<prompt>" then the response, one token per character."""

    def apply_chat_template(
        self, chat: list[dict], tokenize: bool, add_generation_prompt: bool
    ) -> str:
        assert not tokenize and add_generation_prompt
        return f"<{chat[0]['content']}>"

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return [VOCAB.index(c) for c in text]


class Bigram:
    """A model whose next-token logits depend on the current token only: table[token]."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


def test_sequence_kl_sums_the_response_positions_and_the_stop():
    torch.manual_seed(1)
    cand, base = torch.randn(len(VOCAB), len(VOCAB)), torch.randn(len(VOCAB), len(VOCAB))
    prompts, responses, stopped = ["ab", "a", "dcba"], ["ca", "bbbd", ""], [True, False, True]
    found = sequence_kls(
        Bigram(cand), Bigram(base), CharTokenizer(), prompts, responses, stopped, 0.7,
        batch_size=2,
    )  # fmt: skip

    def by_hand(previous: str) -> float:  # one term per sampled position, keyed by its context
        rows = [VOCAB.index(c) for c in previous]
        return sum(closed_form_kl(cand[r].numpy() / 0.7, base[r].numpy() / 0.7) for r in rows)

    # "<ab>ca" stopped: positions after ">", "c" and "a" (where the stop was sampled)
    # "<a>bbbd" cut off: after ">", "b", "b", "b"; "<dcba>" with an empty answer: after ">"
    expected = [(by_hand(">ca"), 3), (by_hand(">bbb"), 4), (by_hand(">"), 1)]
    assert [n for _, n in found] == [n for _, n in expected]
    assert [kl for kl, _ in found] == pytest.approx([kl for kl, _ in expected], rel=1e-6)


def tiny_llama(seed: int, vocab: int = len(VOCAB)) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_sequence_kl_of_random_llamas_is_positive_zero_for_itself_and_batch_free():
    one, two = tiny_llama(0), tiny_llama(1)
    prompts, responses, stopped = ["ab", "a", "dcba"], ["ca", "bbbdacd", "d"], [True, False, True]
    args = (CharTokenizer(), prompts, responses, stopped, 0.7)
    assert all(kl > 0 for kl, _ in sequence_kls(one, two, *args))
    # Two forward passes of one model: 0 up to float rounding (exact on some CPUs only).
    assert all(kl == pytest.approx(0, abs=1e-6) for kl, _ in sequence_kls(one, one, *args))
    # Right padding with a mask: a response's KL does not depend on its batch.
    batched = [kl for kl, _ in sequence_kls(one, two, *args, batch_size=3)]
    alone = [kl for kl, _ in sequence_kls(one, two, *args, batch_size=1)]
    assert batched == pytest.approx(alone, rel=1e-5)


def save_checkpoint(folder, seed: int, words: list[str]) -> str:
    """A tiny Llama with a word-level tokenizer and chat template, as from_pretrained reads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "user:", "assistant:", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", unk_token="<unk>",
        chat_template="{{ bos_token }} user: {{ messages[0]['content'] }} assistant:",
    )  # fmt: skip
    tokenizer.save_pretrained(folder)
    tiny_llama(seed, vocab=len(vocab)).save_pretrained(folder)
    return str(folder)


def test_kl_to_baseline_loads_both_checkpoints_and_refuses_different_tokenizers(tmp_path):
    words = ["hello", "world", "again"]
    cand = save_checkpoint(tmp_path / "cand", 0, words)
    base = save_checkpoint(tmp_path / "base", 1, words)
    args = (["hello world"], ["world again hello"], [True], 0.7)
    [(kl, positions)] = kl_to_baseline(cand, base, *args)
    assert kl > 0 and positions == 4  # three words and the stop
    assert kl_to_baseline(cand, cand, *args) == [(0.0, 4)]
    other = save_checkpoint(tmp_path / "other", 1, ["bonjour", "monde", "encore"])
    with pytest.raises(ValueError, match="different tokenizers"):
        kl_to_baseline(cand, other, *args)


def test_kl_metrics_mean_per_response_and_per_token():
    kl, per_token = kl_metrics([(3.0, 2), (1.0, 6)])
    assert (kl.metric, kl.value, kl.n) == ("kl", 2.0, 2)
    assert (per_token.metric, per_token.value, per_token.n) == ("kl_per_token", 0.5, 8)
    assert kl_metrics([]) == []
