"""The syntax of the conf language: text -> tokens -> a tree of statements.

Theory of operation.  The rules are nginx's (ngx_conf_read_token), so a conf
that nginx splits one way splits the same way here:

- Whitespace separates words.  `;` ends a statement, `{` opens a block, `}`
  closes one.  Inside a word only whitespace, `;` and `{` end it (so `a}` is
  one word, as in nginx), except that `{` right after `$` stays in the word
  (`${host}`).
- `'...'` and `"..."` quote a word; after the closing quote only whitespace,
  `;`, `{` or `)` may follow.
- A backslash makes the next character literal while scanning.  When the word
  is stored, `\\"` `\\'` `\\\\` `\\n` `\\t` `\\r` are unescaped and every other
  escape is kept as written, so regexes such as `\\.php$` reach the directive
  intact.
- `#` starts a comment only where a token could start; in a word it is text.
- `$variables` are plain text here; directives decide what they mean.

Every token remembers the line it started on; a statement's `where`
("file:line") is its name's line.  Nothing in this module opens files or knows
directive names: `include` is an ordinary statement, expanded by the parser.
The only exception raised is ConfError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from forkgw.errors import ConfError

WORD = "word"
SEMICOLON = ";"
OPEN = "{"
CLOSE = "}"
EOF = "eof"

_SPACE = " \t\r\n"
_UNESCAPED = {'"': '"', "'": "'", "\\": "\\", "n": "\n", "t": "\t", "r": "\r"}


@dataclass(frozen=True)
class Token:
    kind: str  # WORD, SEMICOLON, OPEN, CLOSE or EOF
    text: str
    line: int


@dataclass(frozen=True)
class Statement:
    """One directive: its words and, for a block directive, the statements inside."""

    name: str
    args: tuple[str, ...]
    where: str
    block: tuple["Statement", ...] | None  # None: ended by ";"


class Source:
    """Names a piece of conf text in error messages: "file:line", or "command line"."""

    def __init__(self, name: str, numbered: bool = True):
        self.name = name
        self.numbered = numbered

    def where(self, line: int) -> str:
        return f"{self.name}:{line}" if self.numbered else self.name


def _unescape(raw: str) -> str:
    if "\\" not in raw:
        return raw
    out = []
    i, n = 0, len(raw)
    while i < n:
        ch = raw[i]
        if ch == "\\" and i + 1 < n and raw[i + 1] in _UNESCAPED:
            out.append(_UNESCAPED[raw[i + 1]])
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def tokenize(text: str, source: Source) -> Iterator[Token]:
    """Yield the tokens of `text`, ending with one EOF token."""
    i, n, line = 0, len(text), 1
    while True:
        i, line = _skip_blank(text, i, line)
        if i >= n:
            yield Token(EOF, "", line)
            return
        ch = text[i]
        if ch in ";{}":
            yield Token(ch, ch, line)
            i += 1
        elif ch in "\"'":
            token, i, line = _quoted(text, i, line, source)
            yield token
            i = _after_quote(text, i, line, source)
        else:
            token, i, line = _word(text, i, line)
            yield token


def _skip_blank(text: str, i: int, line: int) -> tuple[int, int]:
    """Whitespace and comments between tokens: where the next token starts, and its line."""
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
            i += 1
        elif ch in _SPACE:
            i += 1
        elif ch == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
        else:
            break
    return i, line


def _quoted(text: str, i: int, line: int, source: Source) -> tuple[Token, int, int]:
    """The word quoted at `i`; returns it, the index after its closing quote, and the line there."""
    quote = text[i]
    start_line = line
    n = len(text)
    i += 1
    start = i
    while True:
        if i >= n:
            raise ConfError('unexpected end of file, expecting ";" or "}"', source.where(line))
        ch = text[i]
        if ch == "\\" and i + 1 < n:
            if text[i + 1] == "\n":
                line += 1
            i += 2
            continue
        if ch == "\n":
            line += 1
        elif ch == quote:
            break
        i += 1
    return Token(WORD, _unescape(text[start:i]), start_line), i + 1, line


def _after_quote(text: str, i: int, line: int, source: Source) -> int:
    """After a closing quote only whitespace, `;`, `{` or `)` may follow; a `)` is consumed."""
    n = len(text)
    if i < n and text[i] not in _SPACE and text[i] not in ";{)":
        raise ConfError(f'unexpected "{text[i]}"', source.where(line))
    if i < n and text[i] == ")":
        i += 1
    return i


def _word(text: str, i: int, line: int) -> tuple[Token, int, int]:
    """The unquoted word at `i`; returns it, the index where it ends, and the line there."""
    start_line = line
    n = len(text)
    start = i
    while i < n:
        ch = text[i]
        if ch == "\\":
            if i + 1 < n and text[i + 1] == "\n":
                line += 1
            i += 2
            continue
        if ch in _SPACE or ch == ";":
            break
        if ch == "{" and not (i > start and text[i - 1] == "$"):
            break
        i += 1
    i = min(i, n)  # a backslash at the very end steps past it
    return Token(WORD, _unescape(text[start:i]), start_line), i, line


def parse_statements(text: str, source: Source) -> list[Statement]:
    """Group tokens into statements and blocks; reports nginx's structural errors."""
    tokens = tokenize(text, source)
    stack: list[tuple[list[Statement], list[Token]]] = []  # enclosing blocks: (body, header words)
    body: list[Statement] = []
    words: list[Token] = []
    for token in tokens:
        if token.kind == WORD:
            words.append(token)
        elif token.kind == SEMICOLON:
            if not words:
                raise ConfError('unexpected ";"', source.where(token.line))
            body.append(_statement(words, source, None))
            words = []
        elif token.kind == OPEN:
            if not words:
                raise ConfError('unexpected "{"', source.where(token.line))
            stack.append((body, words))
            body, words = [], []
        elif token.kind == CLOSE:
            if words or not stack:
                raise ConfError('unexpected "}"', source.where(token.line))
            inner = body
            body, header = stack.pop()
            body.append(_statement(header, source, tuple(inner)))
        else:
            if words:
                raise ConfError('unexpected end of file, expecting ";" or "}"', source.where(token.line))
            if stack:
                raise ConfError('unexpected end of file, expecting "}"', source.where(token.line))
    return body


def _statement(words: list[Token], source: Source, block: tuple[Statement, ...] | None) -> Statement:
    return Statement(
        name=words[0].text,
        args=tuple(w.text for w in words[1:]),
        where=source.where(words[0].line),
        block=block,
    )
