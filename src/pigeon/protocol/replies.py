"""SMTP replies: formatting and parsing (RFC 5321 section 4.2, RFC 3463 enhanced codes)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# An RFC 3463 enhanced code at the start of a reply line's text, then a space or the end.
_ENHANCED = re.compile(r"([245])\.\d{1,3}\.\d{1,3}(?: |\Z)")
_REPLY_LINE = re.compile(r"([2-5]\d\d)(?:[ -](.*))?", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply. ``text`` may hold several lines separated by ``\\n``."""

    code: int
    text: str
    enhanced: str | None = None

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def positive(self) -> bool:
        return self.code < 400

    @property
    def closes_session(self) -> bool:
        """421: the server closes the transmission channel after sending it (RFC 5321)."""
        return self.code == 421

    @classmethod
    def parse(cls, line: str) -> Reply:
        """Parse one reply line such as ``550 5.7.1 Go away`` (as filters return it).

        An enhanced code is recognised when the text starts with one whose class matches
        the reply's first digit. Raises ValueError when the line is not a reply.
        """
        match = _REPLY_LINE.fullmatch(line.rstrip("\r\n"))
        if match is None:
            raise ValueError(f"not an SMTP reply: {line!r}")
        return cls.from_lines(int(match.group(1)), [match.group(2) or ""])

    @classmethod
    def from_lines(cls, code: int, lines: Sequence[str]) -> Reply:
        """A reply from the texts of its lines (what follows ``NNN-`` or ``NNN ``).

        An enhanced code of the reply's class starting the first line is lifted out, and
        the enhanced code starting any line is then dropped from it (servers repeat it on
        every line); otherwise the text is kept as it is.
        """
        match = _ENHANCED.match(lines[0])
        if match is None or int(match.group(1)) != code // 100:
            return cls(code, "\n".join(lines), None)
        texts = []
        for text in lines:
            other = _ENHANCED.match(text)
            texts.append(text[other.end() :] if other else text)
        return cls(code, "\n".join(texts), match.group(0).rstrip(" "))

    def lines(self, enhanced_codes: bool = True) -> list[str]:
        parts = self.text.split("\n") if self.text else [""]
        prefix = f"{self.enhanced} " if (enhanced_codes and self.enhanced) else ""
        out = []
        for i, part in enumerate(parts):
            sep = " " if i == len(parts) - 1 else "-"
            out.append(
                f"{self.code}{sep}{prefix}{part}".rstrip(" ")
                if not part
                else f"{self.code}{sep}{prefix}{part}"
            )
        return out

    def to_bytes(self, enhanced_codes: bool = True) -> bytes:
        return "".join(line + "\r\n" for line in self.lines(enhanced_codes)).encode("utf-8")

    def __str__(self) -> str:
        return " ".join(self.lines())
