from __future__ import annotations

import json
from pathlib import Path

import pytest

from disco.scheduler.traces import TraceFormatError, TraceRecord, default_trace_path, load_trace


def test_shipped_azure_trace_loads_whole() -> None:
    recs = load_trace(default_trace_path())
    assert len(recs) == 19366
    assert recs[0] == TraceRecord(0.0, 374, 44)
    assert recs[1].arrival == pytest.approx(4.314579, abs=1e-6)
    assert all(b.arrival >= a.arrival for a, b in zip(recs, recs[1:], strict=False))
    assert load_trace(default_trace_path(), limit=10) == recs[:10]


def test_azure_format_detected_by_content_not_name(tmp_path: Path) -> None:
    p = tmp_path / "trace.jsonl"  # misleading suffix on purpose
    p.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 23:59:59.5,10,5\n"
        "2023-11-17 00:00:00.25,20,0\n"  # zero output: dropped
        "2023-11-17 00:00:01.1234567,30,7\n"
    )
    recs = load_trace(p)
    assert [(r.prompt_tokens, r.output_tokens) for r in recs] == [(10, 5), (30, 7)]
    assert recs[1].arrival == pytest.approx(1.6234567)


def test_burstgpt_drops_failures_and_keeps_sessions(tmp_path: Path) -> None:
    p = tmp_path / "b.txt"
    p.write_text(
        "Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "45,s2,0.9,ChatGPT,1087,0,1087,Conversation log\n"
        "7,s1,1.2,ChatGPT,472,18,490,Conversation log\n"
        "5,,1.0,GPT-4,100,50.0,150,API log\n"
    )
    recs = load_trace(p)
    assert recs == [TraceRecord(0.0, 100, 50, None), TraceRecord(2.0, 472, 18, "s1")]


def test_mooncake_jsonl_milliseconds(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    lines = [
        {"timestamp": 1000, "input_length": 6000, "output_length": 20, "hash_ids": [1, 2]},
        {"timestamp": 3500, "input_length": 300, "output_length": 4, "hash_ids": []},
    ]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert load_trace(p) == [TraceRecord(0.0, 6000, 20), TraceRecord(2.5, 300, 4)]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("", "empty"),
        ("\n\n", "empty"),
        ("a,b,c\n1,2,3\n", "unknown format"),
        ('{"foo": 1}\n', "unknown format"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\nnot-a-date,1,2\n", "malformed Azure row at line 2"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 10:00:00,x,2\n", "malformed"),
        ('{"timestamp": 1, "input_length": 2, "output_length": 3}\n{"timestamp": 2}\n', "line 2"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 10:00:00,5,0\n", "no request"),
    ],
)
def test_bad_traces_raise_one_line_errors(tmp_path: Path, content: str, needle: str) -> None:
    p = tmp_path / "t.csv"
    p.write_text(content)
    with pytest.raises(TraceFormatError) as e:
        load_trace(p)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file_and_bad_limit(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match="not found"):
        load_trace(tmp_path / "nope.csv")
    with pytest.raises(TraceFormatError, match="limit"):
        load_trace(default_trace_path(), limit=0)
