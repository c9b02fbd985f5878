"""The configuration reference (docs/configuration.md), written from the config files themselves.

    python -m fmnas_jax.conf_reference > docs/configuration.md

Every group's options with their opening comment (what the option is, the command that uses it), and every key a
file sets with its value and the comment beside it. Generated, so it stays what the files say (a test compares it
with docs/configuration.md). Imports nothing beyond the standard library.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

GROUPS = ("search_space", "trainer", "data", "search", "search/fidelity", "backend", "tracking", "experiment")
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.]*):(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")


def _conf_dir() -> Path:
    return Path(str(resources.files("fmnas_jax.conf")))


def _keys(lines: list[str]) -> list[tuple[str, str, str]]:
    """(dotted key, value, comment) for every `key: value  # comment` line outside `defaults:`."""
    out, stack, skip, above = [], [], False, []
    opening = next((i for i, ln in enumerate(lines) if not ln.startswith("#")), len(lines))  # the file's own comment
    for line in lines[opening:]:
        if line.lstrip().startswith("#"):
            above.append(line.lstrip()[1:].strip())
            continue
        m = _KEY.match(line)
        if not m:
            above = [] if not line.strip() else above
            continue
        indent, key, value = len(m["indent"]), m["key"], m["value"].strip()
        if indent == 0:
            skip = key in ("defaults", "hydra")  # the defaults list; Hydra's own settings (help text, callbacks)
        stack = [(i, k) for i, k in stack if i < indent] + [(indent, key)]
        if value and not skip:
            out.append((".".join(k for _, k in stack), value, (m["comment"] or " ".join(above)).strip()))
        above = []
    return out


def _option(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    opening = lines[: next((i for i, ln in enumerate(lines) if not ln.startswith("#")), len(lines))]
    header = [ln[1:].strip() for ln in opening if not ln.startswith("# @package")]
    out = [f"### `{path.stem}`", ""]
    out += [f"`{ln}`  " if ln.startswith("python ") else ln for ln in header] + [""]
    keys = _keys(lines)
    if keys:
        out += ["| key | value | meaning |", "|---|---|---|"]
        out += [f"| `{k}` | `{v}` | {c.replace('|', '&#124;')} |" for k, v, c in keys]
        out.append("")
    return out


def markdown() -> str:
    """The whole reference, as docs/configuration.md holds it."""
    conf = _conf_dir()
    out = [
        "# Configuration reference",
        "",
        "Generated from the config files (`python -m fmnas_jax.conf_reference > docs/configuration.md`; a test keeps",
        "it current). Choose an option with `<group>=<option>`, set a key with `<group>.<key>=<value>`; `--cfg job` prints",
        "the composed config, and a wrong key or type is refused while Hydra composes, naming it.",
        "",
        "## The primary config (`conf/config.yaml`)",
        "",
    ]
    out += _option(conf / "config.yaml")[2:]
    out += ["## Keys every strategy shares (`conf/search_shared.yaml`)", "", *_option(conf / "search_shared.yaml")[2:]]
    for group in GROUPS:
        out += [f"## `{group}`", ""]
        for path in sorted((conf / group).glob("*.yaml")):
            out += _option(path)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
