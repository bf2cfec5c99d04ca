"""PII scrubbing: what is replaced, and ordinary numbers that must be left alone."""

from __future__ import annotations

import pytest

from feedback.pii import scrub


@pytest.mark.parametrize("text, expected", [
    ("write to john.doe+x@example.co.uk today", "write to [EMAIL] today"),
    ("call +1 (555) 123-4567 now", "call [PHONE] now"),
    ("or 555-123-4567", "or [PHONE]"),
    ("mobile +33 6 12 34 56 78", "mobile [PHONE]"),
    ("+44 20 7946 0958", "[PHONE]"),
    ("tel 0612345678", "tel [PHONE]"),
    ("card 4111 1111 1111 1111 ok", "card [CARD] ok"),
    ("card 4111-1111-1111-1111", "card [CARD]"),
    ("server 192.168.1.20 is down", "server [IP] is down"),
    ("v6 2001:db8:0:0:8a2e:370:7334:1", "v6 [IP]"),
])
def test_pii_is_replaced(text, expected):
    assert scrub(text) == expected


@pytest.mark.parametrize("text", [
    "On 2024-03-15 at 10:30 I paid 1500 dollars",
    "the meeting is on 12.05.2024 or 15/03/2024",
    "On 2024-03-15 10:30 sharp",
    "from 2023-2024, between 10-20 people",
    "in 1999 there were 42 of them; pi is 3.14159",
    "order number 12345678",
    "a card-like number failing Luhn: 4111 1111 1111 1112",
    "not an ip: 999.1.1.1",
    "I have 5 10 20 30 apples",
    "time 12:30:45, price 1,234,567",
])
def test_ordinary_numbers_are_left_alone(text):
    assert scrub(text) == text


def test_empty_text():
    assert scrub("") == ""
