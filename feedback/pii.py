"""PII scrubbing before anything reaches the database.

Typed placeholders (``[EMAIL]``, ``[PHONE]``, ``[CARD]``, ``[IP]``) rather than deletion, so
the text still reads naturally for training and review.  Patterns aim for few false
positives on ordinary chat: a card number must pass the Luhn check, a phone number needs
7+ digits in phone-like grouping, an IPv4 address needs four octets of 0-255.
"""

from __future__ import annotations

import re

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\d.])")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])"
                  r"|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:?){1,6}(?![\w:])")
# dates and year ranges look like grouped digits; they are not phone numbers
DATE_LIKE = re.compile(r"(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{4}"
                       r"|(?:1[5-9]|20)\d{2}\s?-\s?(?:1[5-9]|20)\d{2})(?!\d)")
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\d[ .-])?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}(?![\w])")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(match: re.Match) -> str:
    digits = re.sub(r"\D", "", match.group())
    return "[CARD]" if 13 <= len(digits) <= 19 and _luhn_ok(digits) else match.group()


def _phone(match: re.Match) -> str:
    text = match.group()
    if DATE_LIKE.match(text):
        return text
    digits = re.sub(r"\D", "", text)
    if len(digits) < 7 or len(digits) > 15:
        return text
    separated = bool(re.search(r"[ .()-]", text)) or text.startswith("+")
    # a bare run of digits is more often a number than a phone; require phone-like shape
    if not separated and len(digits) < 10:
        return text
    return "[PHONE]"


def scrub(text: str) -> str:
    """Replaces e-mail addresses, card numbers, IP addresses and phone numbers."""
    if not text:
        return text
    text = EMAIL.sub("[EMAIL]", text)
    text = CARD.sub(_card, text)
    text = IPV4.sub("[IP]", text)
    text = IPV6.sub("[IP]", text)
    text = PHONE.sub(_phone, text)
    return text
