"""PII scrubbing before anything reaches the database.

Typed placeholders (``[EMAIL]``, ``[PHONE]``, ``[CARD]``, ``[IBAN]``, ``[IP]``) rather than
deletion, so the text still reads naturally for training and review.  Stored model answers
become PPO-ptx targets, so a false positive teaches the model to emit placeholders: every
detector therefore validates its candidate with a well-kept library instead of trusting a
digit pattern.

- phone numbers: Google's libphonenumber (``phonenumbers``), leniency VALID, so a number must
  be a real, allocated format for its country (decimals, epochs, ISBNs, UUIDs are not);
- IBANs: ``stdnum.iban`` (country format and mod-97 check);
- cards: ``stdnum.luhn`` on card-shaped digit groups with a card issuer's leading digit;
- IPs: a regex finds candidates, ``ipaddress`` validates them.  Loopback/unspecified
  addresses and dotted versions (``version 1.2.3.4``, ``Chrome/120.0.0.0``) are kept.
- e-mail: a regex (no validation library is needed to recognise the shape).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import phonenumbers
from stdnum import iban, luhn


@dataclass(frozen=True)
class ScrubConfig:
    """Which countries' national phone formats are recognised.

    Numbers written with ``+`` or an international prefix are found whatever the region;
    the regions only decide how a number *without* a country code is read.  Each region
    is one more pass of the matcher, and regions whose national formats look like ISBN-10s
    (FR, DE: ``0306406152``) add false positives, hence a short default list.
    """

    phone_regions: tuple[str, ...] = ("US", "GB")
    phone_leniency: phonenumbers.Leniency = phonenumbers.Leniency.VALID
    min_phone_digits: int = 7  # shortest national number worth a matcher pass (cheap pre-check)


DEFAULT = ScrubConfig()

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# candidates only; _iban trims trailing words and validates with stdnum
IBAN = re.compile(r"(?<!\w)[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]){11,30}(?!\w)")
# card-shaped groups: 4-4-4-4(-3), 4-6-5 (Amex), 4-6-4 (Diners) or 13-19 contiguous digits;
# never the fraction of a decimal ("3.14159265358979")
CARD = re.compile(r"(?<!\w)(?<!\d[.,])(?:\d{4}(?P<s1>[ -])\d{4}(?P=s1)\d{4}(?P=s1)\d{1,4}(?:(?P=s1)\d{1,3})?"
                  r"|\d{4}(?P<s2>[ -])\d{6}(?P=s2)\d{4,5}|\d{13,19})(?!\w|[.,]\d)")
CARD_ISSUER_DIGITS = "23456"  # ISO/IEC 7812 major industry identifiers used by payment cards
IPV4 = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?!\w|\.\d)")
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\w)")
# digits with the separators phone numbers are written with; _phone_windows counts the digits
PHONE_RUN = re.compile(r"\+?\(?\d[\d \u00a0().\-/]*\d")
# a dotted quad right after one of these is a version number, not an address
VERSION_CONTEXT = re.compile(r"(?:\b(?:version|ver|release|build|firmware|v)\.?:?\s*|[A-Za-z][\w.-]*/)$",
                             re.IGNORECASE)


def _iban(match: re.Match) -> str:
    """Longest run of whole space-separated groups that is a valid IBAN; the rest is kept."""
    text = match.group()
    cut = len(text)
    while cut > 0:
        if iban.is_valid(text[:cut]):
            return "[IBAN]" + text[cut:]
        cut = text.rfind(" ", 0, cut)
    return text


def _card(match: re.Match) -> str:
    """Luhn alone passes one random number in ten; the issuer digit removes timestamps and ISBNs."""
    digits = re.sub(r"\D", "", match.group())
    if 13 <= len(digits) <= 19 and digits[0] in CARD_ISSUER_DIGITS and luhn.is_valid(digits):
        return "[CARD]"
    return match.group()


def _is_identifying(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """127.0.0.1, ::1 and 0.0.0.0 are the same on every machine and common in technical chat."""
    return not (address.is_loopback or address.is_unspecified)


def _ipv4(match: re.Match) -> str:
    text = match.group()
    if VERSION_CONTEXT.search(match.string, max(0, match.start() - 24), match.start()):
        return text
    try:  # int() first: ipaddress refuses zero-padded octets (192.168.001.001), people write them
        address = ipaddress.IPv4Address(".".join(str(int(octet)) for octet in text.split(".")))
    except ValueError:
        return text
    return "[IP]" if _is_identifying(address) else text


def _ipv6(match: re.Match) -> str:
    """Compressed all-decimal candidates (``1::2``) are Python slices, not addresses."""
    text = match.group()
    groups = text.split(":")
    looks_like_address = ("::" not in text or "." in text or any(len(g) == 4 for g in groups)
                          or re.search(r"[A-Fa-f]", text) is not None)
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        return text
    return "[IP]" if looks_like_address and _is_identifying(address) else text


def _phone_windows(text: str, min_digits: int) -> list[tuple[int, int]]:
    """Stretches of text worth showing libphonenumber, each with some context either side.

    The matcher costs ~0.2 ms per candidate it parses; most numbers in an answer (years,
    decimals, versions) have too few digits to be a phone number in any country, so only
    runs with ``min_digits`` digits are handed over.  The context keeps the matcher's
    own checks (a letter or ``$`` next to the number, an ``ext. 12`` after it) intact.
    """
    windows: list[tuple[int, int]] = []
    for run in PHONE_RUN.finditer(text):
        if sum(ch.isdigit() for ch in run.group()) < min_digits:
            continue
        start, end = max(0, run.start() - 8), min(len(text), run.end() + 16)
        if windows and start <= windows[-1][1]:
            windows[-1] = (windows[-1][0], end)
        else:
            windows.append((start, end))
    return windows


def _phones(text: str, config: ScrubConfig) -> str:
    """One libphonenumber pass per region; later passes see earlier replacements."""
    for region in config.phone_regions:
        for w_start, w_end in reversed(_phone_windows(text, config.min_phone_digits)):
            window = text[w_start:w_end]
            matches = phonenumbers.PhoneNumberMatcher(window, region, leniency=config.phone_leniency)
            for m in reversed(list(matches)):
                window = window[:m.start] + "[PHONE]" + window[m.end:]
            text = text[:w_start] + window + text[w_end:]
    return text


def scrub(text: str, config: ScrubConfig = DEFAULT) -> str:
    """Replaces e-mail addresses, IBANs, card numbers, IP addresses and phone numbers.

    Order matters: IBANs and cards are long digit runs that the phone matcher would
    otherwise take a piece of, and e-mails can contain digits.
    """
    if not text:
        return text
    text = EMAIL.sub("[EMAIL]", text)
    text = IBAN.sub(_iban, text)
    text = CARD.sub(_card, text)
    text = IPV6.sub(_ipv6, text)
    text = IPV4.sub(_ipv4, text)
    return _phones(text, config)
