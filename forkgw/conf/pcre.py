"""nginx's regexes (PCRE) as Python `re` patterns: the one place conf regexes are compiled.

`location ~ …`, `location ~* …` and `server_name ~…` are compiled here once,
while the conf is read, so that a bad regex is reported with its file:line
like any other conf error.  The compiled pattern is kept in the model and the
Router matches with that very object; nothing compiles a conf regex again,
and workers inherit the patterns across fork.

Python's `re` is close enough to PCRE for the patterns nginx confs use; the
one spelling that differs and is common in them is the named group, so
`(?<name>…)` and `(?'name'…)` are rewritten to `(?P<name>…)`.  Lookbehinds
`(?<=…)` and `(?<!…)` are left alone.
"""

from __future__ import annotations

import re

_NAMED_GROUP = re.compile(r"\(\?<(?=[A-Za-z_])|\(\?'([A-Za-z_]\w*)'")


def compile_pcre(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    """Compile an nginx (PCRE) regex; raises re.error, which the caller words as a conf error."""
    pattern = _NAMED_GROUP.sub(lambda m: f"(?P<{m.group(1)}>" if m.group(1) else "(?P<", pattern)
    return re.compile(pattern, re.IGNORECASE if ignore_case else 0)
