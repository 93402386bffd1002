"""Errors that stop a start or a reload, worded as nginx words them."""


class ConfError(Exception):
    """A bad conf (or a module it names): `message in file:line`, exit 1, old conf keeps serving."""

    def __init__(self, message: str, where: str = ""):
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        return f"{self.message} in {self.where}" if self.where else self.message
