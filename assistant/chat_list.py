"""The sidebar's chat list, for ``assistant.ui``: this browser's chats in date groups (Today,
Yesterday, Previous 7 days, Previous 30 days, Older, by the browser's own clock), each a
one-line title cut with an ellipsis, a chat branched by an edit marked "(edited)" at the
start so the cut never hides it, and the open chat's Rename and Delete.

Each group is a header and a ``gr.Radio`` (only one of them holds the open chat); the page
keeps the group layout fixed and shows the groups that have chats.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import gradio as gr

EDITED_BADGE = "(edited) · "
GROUPS = ("Today", "Yesterday", "Previous 7 days", "Previous 30 days", "Older")

CSS = """
.chat-group .wrap { flex-direction: column; align-items: stretch; gap: 2px; }
.chat-group label { width: 100%; min-width: 0; }
.chat-group label > span { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; min-width: 0;
    flex: 1 1 auto; }
.chat-group-title { margin: 8px 0 0 0 !important; font-size: var(--text-sm); opacity: 0.7; }
.chat-group-title p { margin: 0 !important; }
#chat-actions { gap: 6px; flex-wrap: wrap; }
#chat-actions > button { flex: 1 1 0; min-width: 6em; }
"""


def group_of(updated_at: str | None, now: datetime, offset_minutes: int = 0) -> int:
    """The index in ``GROUPS`` of a chat last active at ``updated_at`` (ISO, UTC), by the
    calendar of a browser ``offset_minutes`` east of UTC; an unreadable time is Older."""
    try:
        when = datetime.fromisoformat(updated_at or "")
    except ValueError:
        return len(GROUPS) - 1
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    local = timezone(timedelta(minutes=offset_minutes))
    days = (now.astimezone(local).date() - when.astimezone(local).date()).days
    for index, limit in enumerate((0, 1, 7, 30)):
        if days <= limit:
            return index
    return len(GROUPS) - 1


def label(chat: dict) -> str:
    """The chat's line in the list: its title, "(edited)" first for a branch (the API's title
    ends with it, where a cut would hide it)."""
    title = chat["title"]
    if chat.get("branch_of"):
        title = EDITED_BADGE + title.removesuffix(" (edited)")
    return title


def offset_of(value: object) -> int:
    """The browser's UTC offset in minutes as the page sends it (clamped; anything else is 0)."""
    try:
        minutes = int(value)
    except (TypeError, ValueError, OverflowError):
        return 0
    return max(-14 * 60, min(14 * 60, minutes))


def view(chats: list[dict], current: str | None, offset_minutes: int = 0, now: datetime | None = None) -> tuple:
    """The list's updates: per group its header and its Radio, then the list itself, the "no
    chats" line and the open chat's actions (shown when the open chat is listed)."""
    now = now or datetime.now(timezone.utc)
    grouped: list[list[dict]] = [[] for _ in GROUPS]
    for chat in chats:
        grouped[group_of(chat["updated_at"], now, offset_minutes)].append(chat)
    listed = current is not None and any(c["id"] == current for c in chats)
    updates: list = []
    for members in grouped:
        mine = any(c["id"] == current for c in members)
        updates += [gr.update(visible=bool(members)),
                    gr.Radio(choices=[(label(c), c["id"]) for c in members], value=current if mine else None,
                             visible=bool(members))]
    return (*updates, gr.update(visible=bool(chats)), gr.update(visible=not chats), gr.update(visible=listed))


def title_of(chats: list[dict], conversation_id: str | None) -> str:
    """The open chat's title as the rename box starts with it ("" when not listed)."""
    chat = next((c for c in chats if c["id"] == conversation_id), None)
    return chat["name"] if chat else ""
