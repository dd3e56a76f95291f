"""One config mechanism for every training script: a YAML file of argparse defaults, overridden by the CLI."""

from __future__ import annotations

import argparse
import ast
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class ParseKwargs(argparse.Action):
    """`--model-kwargs a=1 b=linear c=[1,2]` -> {"a": 1, "b": "linear", "c": [1, 2]}."""

    def __call__(self, parser, namespace, values, option_string=None):
        out = {}
        for item in values:
            if "=" not in item:
                raise argparse.ArgumentError(self, f"expected key=value, got {item!r}")
            key, value = item.split("=", 1)
            try:
                out[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                out[key] = value
        setattr(namespace, self.dest, out)


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `argv`; a `--config FILE.yaml` sets defaults (keys are argument names), the command line wins."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        cfg = load_yaml(known.config)
        dests = {a.dest for a in parser._actions}
        unknown = sorted(k.replace("-", "_") for k in cfg if k.replace("-", "_") not in dests)
        if unknown:
            raise SystemExit(f"{known.config}: unknown keys {unknown}")
        actions = {a.dest: a for a in parser._actions}
        parser.set_defaults(**{k.replace("-", "_"): _checked(actions[k.replace("-", "_")], v, known.config)
                               for k, v in cfg.items()})
    return parser.parse_args(argv)


def _checked(action: argparse.Action, value: Any, source: str) -> Any:
    """A YAML value through the flag's own type and choices, as if typed on the command line (`epochs: 1.5`
    is refused for an integer flag instead of being taken as is)."""
    if value is None or isinstance(action, ParseKwargs):
        return value
    values = value if isinstance(value, list) else [value]
    try:
        out = [action.type(str(v)) for v in values] if action.type else values
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        flag = action.option_strings[0]
        raise SystemExit(f"{source}: {action.dest}: {value!r} is not valid for {flag} ({e})") from None
    if action.choices is not None and any(v not in action.choices for v in out):
        raise SystemExit(f"{source}: {action.dest}: {value!r}; {action.option_strings[0]} takes one of "
                         f"{list(action.choices)}")
    return out if isinstance(value, list) else out[0]


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a clear error for a missing file or a non-mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SystemExit(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


def dump_yaml(data: dict[str, Any], path: str | Path) -> None:
    """Write a mapping as YAML (used to record the config beside a checkpoint)."""
    import yaml

    from mhla_core.checkpoint import atomic_write

    def write(tmp):
        Path(tmp).write_text(yaml.safe_dump(data, sort_keys=False))

    atomic_write(path, write)
