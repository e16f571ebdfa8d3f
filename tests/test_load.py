"""The load test's short variant: 100 concurrent streams across 10 conversations through
real processes; every turn stored exactly once, next to its answer, store consistent.
(The full run, ``python -m benchmarks.load``, is 1000 across 100; see RELIABILITY.md.)"""

from __future__ import annotations

from pathlib import Path

from benchmarks.load import report, run


async def test_short_load_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    result = await run(streams=100, conversations=10, rounds=1, pause_s=0, workdir=tmp_path)
    summary = report(result)
    assert [(r.completed, r.failed) for r in result.rounds] == [(100, 0)], summary
    assert result.expected_turns == result.stored_turns == 100, summary
    assert (result.lost_turns, result.duplicated_turns, result.misplaced_answers) == (0, 0, 0)
    assert result.integrity_problems == []
    assert result.ok
