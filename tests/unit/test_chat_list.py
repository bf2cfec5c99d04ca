"""The sidebar's chat list: date groups by the browser's clock, the "(edited)" badge first, and
one selection across the groups."""

from __future__ import annotations

from datetime import datetime, timezone

from assistant import chat_list

NOW = datetime(2026, 12, 4, 10, 30, tzinfo=timezone.utc)


def chat(cid: str, updated_at: str, title: str = "A chat", branch_of: str | None = None) -> dict:
    return {"id": cid, "title": title, "updated_at": updated_at, "branch_of": branch_of}


def test_group_by_calendar_day():
    names = [chat_list.GROUPS[chat_list.group_of(t, NOW)] for t in (
        "2026-12-04T00:01:00.000+00:00", "2026-12-03T23:59:00.000+00:00", "2026-11-28T12:00:00.000+00:00",
        "2026-11-27T12:00:00.000+00:00", "2026-11-04T12:00:00.000+00:00", "2026-11-03T12:00:00.000+00:00")]
    assert names == ["Today", "Yesterday", "Previous 7 days", "Previous 7 days", "Previous 30 days", "Older"]


def test_group_follows_the_browsers_clock():
    late = "2026-12-03T23:00:00.000+00:00"  # 23:00 UTC is already 4 December at UTC+2
    assert chat_list.GROUPS[chat_list.group_of(late, NOW)] == "Yesterday"
    assert chat_list.GROUPS[chat_list.group_of(late, NOW, offset_minutes=120)] == "Today"
    # 10:30 UTC is still 3 December at UTC-11, and so is 23:00 UTC the day before
    assert chat_list.GROUPS[chat_list.group_of(late, NOW, offset_minutes=-660)] == "Today"


def test_unreadable_times_are_older_and_offsets_are_clamped():
    assert chat_list.GROUPS[chat_list.group_of(None, NOW)] == "Older"
    assert chat_list.GROUPS[chat_list.group_of("yesterday", NOW)] == "Older"
    assert chat_list.offset_of("60") == 60 and chat_list.offset_of(None) == 0
    assert chat_list.offset_of("x") == 0 and chat_list.offset_of(10_000) == 14 * 60
    assert chat_list.offset_of(float("inf")) == 0


def test_label_puts_the_edited_badge_first():
    assert chat_list.label(chat("1", "", "Plan a trip")) == "Plan a trip"
    assert chat_list.label(chat("2", "", "Plan a trip (edited)", branch_of="1")) == "(edited) · Plan a trip"


def test_view_groups_and_selects_the_open_chat_once():
    chats = [chat("new", "2026-12-04T09:00:00+00:00", "Today's"),
             chat("old", "2026-10-01T09:00:00+00:00", "Old one"),
             chat("older", "2026-09-01T09:00:00+00:00", "Older one", branch_of="old")]
    updates = chat_list.view(chats, "old", now=NOW)
    heads, radios = updates[0:10:2], updates[1:10:2]
    assert [h["visible"] for h in heads] == [True, False, False, False, True]
    assert radios[0].choices == [("Today's", "new")] and radios[0].value is None
    assert radios[4].choices == [("Old one", "old"), ("(edited) · Older one", "older")]
    assert radios[4].value == "old"
    listed, none, actions = updates[10:]
    assert listed["visible"] and not none["visible"] and actions["visible"]


def test_view_without_chats_or_with_an_unlisted_chat():
    *_, listed, none, actions = chat_list.view([], None, now=NOW)
    assert not listed["visible"] and none["visible"] and not actions["visible"]
    *_, listed, none, actions = chat_list.view([chat("a", "2026-12-04T09:00:00+00:00")], "gone", now=NOW)
    assert listed["visible"] and not actions["visible"]


def test_title_of():
    chats = [chat("a", "", "Plan a trip…", branch_of="b") | {"name": "Plan a trip to Lisbon"}]
    assert chat_list.title_of(chats, "a") == "Plan a trip to Lisbon" and chat_list.title_of(chats, "x") == ""
