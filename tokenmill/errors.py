"""ParamError: bad user input that names the field at fault."""
from __future__ import annotations


class ParamError(ValueError):
    """An invalid value of one request field. The message starts with the field's name, and `param`
    holds it, so the server can report the field (as the client spelled it) without parsing text."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
