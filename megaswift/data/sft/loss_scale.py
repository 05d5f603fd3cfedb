"""Loss-scale configs: regex rules that give characters of assistant text a training weight.

A config is a JSON file:

    {"description": "...",
     "rules": [{"pattern": "<Python regex>", "weights": [w1, w2, ...]}, ...]}

Every rule runs over the rendered text of each trained assistant turn. For each match, weights[i]
is the weight of capture group i+1 (a rule without groups uses weights[0] for the whole match).
Characters no rule matches weigh 1.0; rules apply in order, so a later match overrides an earlier
one. Weight 0 means "never trained": those tokens also get label -100. Token weights come from the
characters a token covers (see template.py). Built-in configs live in loss_scales/*.json (`default`,
`agent`); pass a path to use your own.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BUILTIN_DIR = Path(__file__).parent / "loss_scales"


@dataclass(frozen=True)
class LossScaleRule:
    pattern: re.Pattern
    weights: tuple[float, ...]


@dataclass(frozen=True)
class LossScaleConfig:
    name: str
    rules: tuple[LossScaleRule, ...] = ()

    def char_weights(self, text: str) -> np.ndarray:
        """float32 weight per character of `text` (one assistant turn)."""
        weights = np.ones(len(text), dtype=np.float32)
        for rule in self.rules:
            groups = range(1, len(rule.weights) + 1) if rule.pattern.groups else (0,)
            for match in rule.pattern.finditer(text):
                for group, weight in zip(groups, rule.weights):
                    start, end = match.span(group)
                    if start >= 0:  # a group that did not take part spans (-1, -1)
                        weights[start:end] = weight
        return weights


def builtin_loss_scales() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.json"))


def _parse_rule(rule, index: int, source: str) -> LossScaleRule:
    where = f"{source}: rules[{index}]"
    if not isinstance(rule, dict) or not isinstance(rule.get("pattern"), str):
        raise ValueError(f"{where}: expected an object with a string 'pattern' and a list 'weights', found {rule!r}")
    try:
        pattern = re.compile(rule["pattern"])
    except re.error as err:
        raise ValueError(f"{where}: expected a valid Python regex, found {rule['pattern']!r} ({err})") from None
    weights = rule.get("weights")
    if (not isinstance(weights, list) or not weights
            or not all(isinstance(w, (int, float)) and w >= 0 for w in weights)):
        raise ValueError(f"{where}: expected 'weights' to be a non-empty list of numbers >= 0, found {weights!r}")
    if len(weights) > max(pattern.groups, 1):
        raise ValueError(f"{where}: expected at most {max(pattern.groups, 1)} weights (one per capture group "
                         f"of {rule['pattern']!r}), found {len(weights)}")
    return LossScaleRule(pattern, tuple(float(w) for w in weights))


def loss_scale_path(name_or_path: str) -> Path:
    """A built-in name (`default`, `agent`) wins over a same-named folder in the working directory;
    anything else must be a JSON file."""
    if name_or_path in builtin_loss_scales():
        return BUILTIN_DIR / f"{name_or_path}.json"
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"loss scale {name_or_path!r}: expected a built-in name {builtin_loss_scales()} "
                         f"or a path to a JSON config file, found neither")
    return path


def load_loss_scale(name_or_path: str) -> LossScaleConfig:
    """A built-in config by name (`default`, `agent`) or a JSON file by path."""
    path = loss_scale_path(name_or_path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"loss scale config {path}: expected a readable JSON file, found {err}") from None
    rules = spec.get("rules") if isinstance(spec, dict) else None
    if not isinstance(rules, list):
        raise ValueError(f"{path}: expected an object with a 'rules' list, found {str(spec)[:80]!r}")
    return LossScaleConfig(path.stem, tuple(_parse_rule(r, i, str(path)) for i, r in enumerate(rules)))
