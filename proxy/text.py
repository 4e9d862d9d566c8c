"""What makes agent-supplied text unsafe to show a person or put in a header.

One definition serves every place that admits agent text (the intent, token names, transaction names)
and every operator view that escapes it: C0 and C1 controls, DEL, line and paragraph separators, bidi
embeddings/overrides/isolates and marks (U+061C, U+200E/F, U+202A–202E, U+2066–2069), the BOM, and
lone surrogates (undecodable header bytes). Any of them could split a header, forge a field in a
journal line, or make a reviewer read something other than what was sent.
"""

from __future__ import annotations

import re

UNSAFE_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                         "\u2066-\u2069\ufeff\ud800-\udfff]")


def unsafe_char(text: str) -> str | None:
    """The first unsafe character of ``text`` as ``'U+202E'``, or None when the text is inert."""
    m = UNSAFE_TEXT.search(text)
    return None if m is None else f"U+{ord(m.group()):04X}"
