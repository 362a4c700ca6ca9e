"""Evaluation arithmetic: intervals, win rates (raw and length-controlled), violation and
degenerate rates, and the exact KL at the sampling temperature against closed forms."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from alignment.constitution import from_dict
from alignment.evaluation import (
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


def judgment(
    p_a: float | None,
    status: str = "ok",
    mode: str = "pairwise",
    consistent: bool | None = True,
    a: str = "a",
    b: str = "b",
) -> Judgment:
    return Judgment(
        judgment_id="j", prompt_id="p", response_a_id=a, response_b_id=b, principle_id="x",
        constitution_id="c", judge_model="judge", mode=mode, p_a_first=p_a, p_a_second=p_a,
        p_a=p_a, position_consistent=consistent, option_mass=0.9, status=status, rationale=None,
    )  # fmt: skip


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
    assert metrics["mean_p_win"].value == pytest.approx((0.8 + 0.3 + 0.5 + 0.9) / 4)
    assert metrics["judge_position_consistency"].value == pytest.approx(2 / 3)  # checks excluded
    assert metrics["judge_not_ok"].value == 1


def test_a_judge_that_always_says_a_gives_exactly_one_half():
    # Order 1 reads "A" as the candidate, order 2 as the baseline: P1 high, P2 low, and
    # their mean may lean either way; neither order carries a preference.
    js = []
    for i, (p1, p2) in enumerate([(0.95, 0.25), (0.9, 0.05), (0.99, 0.4), (0.8, 0.3)]):
        js.append(
            Judgment(
                f"j{i}", "p", f"a{i}", f"b{i}", "x", "c", "judge", "pairwise", p1, p2,
                (p1 + p2) / 2, (p1 > 0.5) == (p2 > 0.5), 0.9, "ok", None,
            )
        )  # fmt: skip
    lengths = {f"a{i}": 10 + 5 * i for i in range(4)} | {f"b{i}": 12 for i in range(4)}
    assert {m.metric: m.value for m in win_rate(js)}["win_rate"] == 0.5
    [lc] = lc_win_rate(js, lengths)
    assert lc.value == pytest.approx(0.5, abs=1e-9)


# --- length-controlled win rate -------------------------------------------------------------


def comparisons(outcomes: list[float], diffs: list[int]) -> tuple[list[Judgment], dict[str, int]]:
    """Judgments with p_a = outcome, candidate a{i} diffs[i] tokens longer than b{i}."""
    js = [judgment(y, a=f"a{i}", b=f"b{i}") for i, y in enumerate(outcomes)]
    lengths = {f"a{i}": 50 + d for i, d in enumerate(diffs)} | {
        f"b{i}": 50 for i in range(len(diffs))
    }
    return js, lengths


def test_a_judge_that_only_prefers_the_longer_answer_gives_lc_one_half():
    rng = np.random.default_rng(1)
    diffs = [*rng.integers(1, 30, 36).tolist(), *(-rng.integers(1, 30, 12)).tolist()]
    js, lengths = comparisons([1.0 if d > 0 else 0.0 for d in diffs], diffs)
    raw = {m.metric: m for m in win_rate(js)}["win_rate"]
    [lc] = lc_win_rate(js, lengths)
    assert raw.value == 0.75  # the candidate is longer in 36 of 48
    assert lc.value == pytest.approx(0.5, abs=0.05)
    assert lc.n == 48 and lc.ci_low <= lc.value <= lc.ci_high
    # A soft preference for length (p_a a smooth function of the difference) fits exactly.
    sd = np.std(diffs)
    js, lengths = comparisons([float(1 / (1 + np.exp(-2 * d / sd))) for d in diffs], diffs)
    assert lc_win_rate(js, lengths)[0].value == pytest.approx(0.5, abs=0.01)


def test_a_judge_blind_to_length_gives_lc_close_to_the_raw_rate():
    rng = np.random.default_rng(2)
    diffs = rng.integers(-30, 30, 64).tolist()
    js, lengths = comparisons([0.99 if u < 0.7 else 0.01 for u in rng.random(64)], diffs)
    raw = {m.metric: m for m in win_rate(js)}["win_rate"]
    [lc] = lc_win_rate(js, lengths)
    assert lc.value == pytest.approx(raw.value, abs=0.05)
    assert lc.ci_low < raw.value < lc.ci_high


def test_lc_bootstrap_repeats_and_equal_lengths_need_no_slope():
    js, lengths = comparisons([0.9, 0.8, 0.2, 0.7], [0, 0, 0, 0])  # sd 0: z = 0
    first, second = lc_win_rate(js, lengths, seed=3), lc_win_rate(js, lengths, seed=3)
    assert first == second
    assert first[0].value == pytest.approx((0.9 + 0.8 + 0.2 + 0.7) / 4, abs=1e-6)
    assert lc_win_rate([judgment(None, status="refusal")], lengths) == []


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
