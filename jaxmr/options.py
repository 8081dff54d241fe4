"""`key=value` options: the one parser behind source specs (`shapes:n=1000,size=48`), ANN settings
(`--ann leaves_to_search=64`), config overrides (`--set batch_size=512`, `config.py:smoke,steps=10`) and the
benchmarks' `name=path` flags."""

from __future__ import annotations

from collections.abc import Iterable


def split_items(text: str) -> list[str]:
    """Splits 'a=1,b=(1, 2),c=x' at the commas that are not inside brackets or quotes; empty items go."""
    items, depth, start, quote = [], 0, 0, None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [i for i in items if i.strip()]


def key_value(item: str, what: str = "option", error: type[Exception] = ValueError) -> tuple[str, str]:
    """'key = value' -> ('key', 'value'), both stripped; an item without '=' is an `error` naming `what`."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise error(f"{what}: {item!r} is not key=value")
    return key.strip(), value.strip()


def typed_options(items: str | Iterable[str], allowed: dict[str, type], what: str,
                  error: type[Exception] = ValueError) -> dict:  # fmt: skip
    """Items (or a comma-separated string of them) -> {key: allowed[key](value)}; an unknown key or a value of
    the wrong type is an `error` naming `what` and the keys that exist."""
    options = {}
    for item in split_items(items) if isinstance(items, str) else items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            raise error(f"{what}: unknown option {item!r}; options are {', '.join(allowed)} (as key=value)")
        try:
            options[key] = allowed[key](value.strip())
        except ValueError:
            raise error(f"{what}: option {key} needs a {allowed[key].__name__}, got {value.strip()!r}") from None
    return options
