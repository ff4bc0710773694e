"""The one error type for SMTP outcomes, shared by filters, rules, tables and delivery."""

from __future__ import annotations

from pigeon.protocol.replies import Reply


class SMTPError(Exception):
    """An SMTP outcome that is not success: a reply code, an enhanced code and a text.

    4xx codes are temporary, 5xx permanent. Raised by rules, tables, filters and
    delivery agents alike; the session turns it into the reply the client sees.
    """

    def __init__(self, code: int, enhanced: str | None, text: str) -> None:
        super().__init__(f"{code} {enhanced + ' ' if enhanced else ''}{text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def reply(self) -> Reply:
        return Reply(self.code, self.text, self.enhanced)

    def line(self) -> str:
        """The reply as one log/errorline string, e.g. ``550 5.1.1 No such user``."""
        return f"{self.code} {self.enhanced + ' ' if self.enhanced else ''}{self.text}"


def temporary_failure(text: str = "Temporary failure", enhanced: str = "4.0.0") -> SMTPError:
    return SMTPError(451, enhanced, text)


def permanent_failure(text: str, enhanced: str = "5.0.0", code: int = 550) -> SMTPError:
    return SMTPError(code, enhanced, text)
