"""The conf tokenizer and statement grouping, by nginx's rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forkgw.conf.lexer import CLOSE, EOF, OPEN, SEMICOLON, WORD, Source, parse_statements, tokenize
from forkgw.errors import ConfError

SRC = Source("t.conf")


def words(text: str) -> list[list[str]]:
    """Each statement's words (name first), flattening blocks in order."""
    out = []

    def visit(statements):
        for s in statements:
            out.append([s.name, *s.args])
            if s.block is not None:
                visit(s.block)

    visit(parse_statements(text, SRC))
    return out


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a b c;", [["a", "b", "c"]]),
        ("a 'b c' \"d e\";", [["a", "b c", "d e"]]),
        ('a "";', [["a", ""]]),
        (r'a "x\"y" ' + r"'x\'y';", [["a", 'x"y', "x'y"]]),
        (r'a "t\tn\nr\r\\";', [["a", "t\tn\nr\r\\"]]),
        (r"a ~ \.php$;", [["a", "~", r"\.php$"]]),  # other escapes are kept as written
        (r"a x\ y;", [["a", r"x\ y"]]),  # an escaped space stays in the word, backslash kept
        ("a b; # comment ; {\nc;", [["a", "b"], ["c"]]),
        ("a b#c;", [["a", "b#c"]]),  # `#` inside a word is text
        ("a '#not';", [["a", "#not"]]),
        ("a ${host}x;", [["a", "${host}x"]]),
        ("a $var;", [["a", "$var"]]),
        ("a{b;}", [["a"], ["b"]]),
        ("a b{ c d; }", [["a", "b"], ["c", "d"]]),
        ("a b}c;", [["a", "b}c"]]),  # `}` does not end a word, as in nginx
        ("a 'x'{ }", [["a", "x"]]),
        ("a\n  b\n  c;", [["a", "b", "c"]]),
        ('a "multi\nline";', [["a", "multi\nline"]]),
        ("", []),
        ("# only a comment", []),
    ],
)
def test_statements(text, expected):
    assert words(text) == expected


def test_token_kinds_and_lines():
    tokens = list(tokenize("a {\n  'b' ;\n}\n", SRC))
    assert [(t.kind, t.text, t.line) for t in tokens] == [
        (WORD, "a", 1), (OPEN, "{", 1), (WORD, "b", 2), (SEMICOLON, ";", 2), (CLOSE, "}", 3), (EOF, "", 4),
    ]  # fmt: skip


def test_quoted_braces_are_words():
    assert words('a "{" "}" ";";') == [["a", "{", "}", ";"]]


def test_statement_where_is_the_line_of_its_name():
    statements = parse_statements("\n\nhttp {\n  server {\n    listen\n      80;\n  }\n}\n", SRC)
    http = statements[0]
    server = http.block[0]
    listen = server.block[0]
    assert (http.where, server.where, listen.where) == ("t.conf:3", "t.conf:4", "t.conf:5")
    assert listen.args == ("80",) and listen.block is None


def test_command_line_source_has_no_line():
    statement = parse_statements("worker_processes 2;", Source("command line", numbered=False))[0]
    assert statement.where == "command line"


@pytest.mark.parametrize(
    "text, message, line",
    [
        ("}", 'unexpected "}"', 1),
        ("a {\n}\n}", 'unexpected "}"', 3),
        ("a b }", 'unexpected "}"', 1),
        ("a {\n b;\n", 'unexpected end of file, expecting "}"', 3),
        ("a b", 'unexpected end of file, expecting ";" or "}"', 1),
        ("a 'b", 'unexpected end of file, expecting ";" or "}"', 1),
        ("{", 'unexpected "{"', 1),
        ("a;\n;", 'unexpected ";"', 2),
        ("a 'b'c;", 'unexpected "c"', 1),
        ('a "b"#;', 'unexpected "#"', 1),
    ],
)
def test_structural_errors(text, message, line):
    with pytest.raises(ConfError) as caught:
        parse_statements(text, SRC)
    assert caught.value.message == message
    assert caught.value.where == f"t.conf:{line}"
    assert str(caught.value) == f"{message} in t.conf:{line}"


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(alphabet=st.sampled_from(list("ab $#;{}'\"\\\n\t)")) | st.characters(), max_size=60))
def test_random_text_raises_only_conf_errors(text):
    try:
        parse_statements(text, SRC)
    except ConfError:
        pass
