"""A judgment with the same answer in both orders, for tests of what is read from judgments."""

from __future__ import annotations

from alignment.judge import Judgment


def judgment(
    p_a: float | None,
    status: str = "ok",
    mode: str = "pairwise",
    consistent: bool | None = True,
    a: str = "a",
    b: str | None = "b",
    prompt: str = "p",
) -> Judgment:
    return Judgment(
        judgment_id="j", prompt_id=prompt, response_a_id=a, response_b_id=b, principle_id="x",
        constitution_id="c", judge_model="judge", mode=mode, p_a_first=p_a, p_a_second=p_a,
        p_a=p_a, position_consistent=consistent, option_mass=0.9, status=status, rationale=None,
    )  # fmt: skip
