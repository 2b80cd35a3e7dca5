"""The records a request travels as (mltasks.serving.records): typed, and unchanged on
the wire."""

from __future__ import annotations

from typing import get_args

from kombu.serialization import dumps

from mltasks.serving.records import Answer, Claimed, Row, Status, as_row, traditional

STATE = [0.5] * 64
WIRE = bytes(532)  # what the claim gives: the real[]'s array_send bytes


def test_a_row_travels_as_the_same_msgpack_array_as_a_list() -> None:
    claimed = Claimed(7, "tank", 1002, WIRE, 11, False, 1.5, None)
    ours = [[claimed.row()], 3, 1.5, [1.5], "token"]
    plain = [[[7, "tank", 1002, WIRE, 11]], 3, 1.5, [1.5], "token"]
    assert dumps(ours, serializer="msgpack")[2] == dumps(plain, serializer="msgpack")[2]


def test_a_worker_types_what_msgpack_hands_it() -> None:
    assert as_row([7, "tank", 1002, STATE, 11]) == Row(7, "tank", 1002, STATE, 11)
    assert as_row([7, "tank", 1002, STATE]).monster_id is None  # older bridges: four values
    # A mob or monster id that is not an int is dropped, as inference always did.
    assert as_row([7, "tank", "1002", STATE, True, "extra"]) == Row(7, "tank", None, STATE, None)
    row = Row(7, "tank", 1002, STATE, 11)
    assert as_row(row) is row


def test_answer_statuses_are_the_ones_the_schema_allows() -> None:
    assert set(get_args(Status)) == {"completed", "invalid", "expired"}
    assert traditional(3, "deadline", status="expired") == Answer(
        3, 255, 0.0, "bridge", "expired", None, "deadline"
    )
