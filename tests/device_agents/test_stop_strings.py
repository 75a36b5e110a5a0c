"""StopMatcher: a stream ends at the first stop string, text that may begin one is held back."""

from __future__ import annotations

from disco.device_agents.engines.stop_strings import StopMatcher
from disco.scheduler.types import TokenEvent

TURN = ("\nuser:", "\nassistant:")


def ev(i: int, text: str, finish: str | None = None) -> TokenEvent:
    return TokenEvent(i, text, float(i), 100 + i, None, finish)


def feed(m: StopMatcher, texts: list[str], last: str | None = "length") -> list[list[str]]:
    """What each push released (texts), the last event finishing with ``last``."""
    n = len(texts)
    return [[e.text for e in m.push(ev(i, t, last if i == n - 1 else None))]
            for i, t in enumerate(texts)]  # fmt: skip


def test_a_turn_header_split_over_tokens_ends_the_stream_before_it():
    m = StopMatcher(TURN)
    out = [e for i, t in enumerate([" Paris", ".", "\n", "user", ":", " hi"])
           for e in m.push(ev(i, t))]  # fmt: skip
    assert [e.text for e in out] == [" Paris", ".", ""]
    # the token in which the stop string starts is the last one: empty, "stop", its own index
    assert (out[-1].index, out[-1].token_id, out[-1].finish_reason) == (2, 102, "stop")
    assert m.stopped and m.push(ev(9, "more")) == []


def test_held_text_goes_out_whole_once_the_next_token_rules_a_stop_out():
    m = StopMatcher(TURN)
    released = feed(m, ["A", "\n", "us", "ually", "!"], last=None)
    assert released == [["A"], [], [], ["\n", "us", "ually"], ["!"]]
    assert not m.stopped and m.flush() == []


def test_a_stop_inside_one_token_cuts_that_token():
    m = StopMatcher(TURN)
    out = m.push(ev(0, "Yes.\nassistant: again"))
    assert [(e.text, e.finish_reason) for e in out] == [("Yes.", "stop")]


def test_the_earliest_stop_wins_and_the_last_token_releases_everything():
    m = StopMatcher(("lo", "el"))
    assert [e.text for e in m.push(ev(0, "hello"))] == ["h"]
    m = StopMatcher(TURN)
    assert feed(m, ["ok", "\n"]) == [["ok"], ["\n"]]  # the stream ended: nothing to wait for
    assert not m.stopped


def test_no_stop_strings_pass_every_token_through():
    m = StopMatcher(["", ""])
    assert feed(m, ["a", "\n", "user:"], last=None) == [["a"], ["\n"], ["user:"]]
