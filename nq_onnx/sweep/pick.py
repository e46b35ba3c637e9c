"""Choosing a trial: a constraint on its metrics, an objective, and the Pareto front they trade along.

A pick expression is comparisons joined by ``and``::

    top1 >= fp32 - 0.3                      # at most 0.3 points of top-1 below FP32
    latency_ms <= 0.6 * fp32.latency_ms and mse < 0.01

Names are metrics (:data:`METRICS`); ``fp32.NAME`` is the FP32 model's value, and a bare ``fp32`` is FP32's value
of the one metric its comparison names. Numbers, ``+ - * /`` and parentheses; nothing is evaluated as
Python.
"""

from __future__ import annotations

import dataclasses
import operator
import re

from nq_onnx.core.errors import ConfigError

METRICS = {
    "top1": "top-1 on the labelled set, percent",
    "agreement": "share of inputs whose arg-max agrees with FP32's, percent",
    "mse": "output MSE against FP32",
    "sqnr_db": "output SQNR against FP32, dB",
    "cosine": "output cosine similarity to FP32",
    "size_mb": "model file size, MB",
    "convert_s": "conversion wall time, s",
    "latency_ms": "median latency at the sweep's batch, ms",
    "latency_ratio": "latency over FP32's, measured interleaved",
}
HIGHER_IS_BETTER = {"top1", "agreement", "sqnr_db", "cosine"}
COMPARE = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
TOKEN = re.compile(r"\s*(?:((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"  # a number
                   r"|(fp32\.[a-z_0-9]+|[a-z_][a-z_0-9]*)"  # a name
                   r"|(>=|<=|==|[<>()+\-*/]))")


@dataclasses.dataclass(frozen=True)
class Condition:
    left: tuple  # expression trees: ("num", x) | ("metric", name) | ("fp32", name) | (op, a, b) | ("neg", a)
    op: str
    right: tuple

    def holds(self, metrics: dict[str, float], fp32: dict[str, float]) -> bool:
        return COMPARE[self.op](_value(self.left, metrics, fp32), _value(self.right, metrics, fp32))


def _value(node: tuple, metrics: dict, fp32: dict) -> float:
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind in ("metric", "fp32"):
        table = metrics if kind == "metric" else fp32
        value = table.get(node[1])
        return float("nan") if value is None else value  # a missing figure fails every comparison
    if kind == "neg":
        return -_value(node[1], metrics, fp32)
    a, b = _value(node[1], metrics, fp32), _value(node[2], metrics, fp32)
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else float("nan")}[kind]


def parse_pick(text: str, available: set[str] | None = None) -> tuple[Condition, ...]:
    """Parse a pick expression; an unknown metric, or one the sweep does not measure (``available``), is an error."""
    tokens = _tokens(text)
    parser = _Parser(tokens, text)
    conditions = [parser.condition()]
    while parser.peek() == "and":
        parser.take()
        conditions.append(parser.condition())
    if parser.peek() is not None:
        raise ConfigError(f"--pick {text!r}: unexpected {parser.peek()!r}")
    out = tuple(_bind_fp32(c, text) for c in conditions)
    for name in sorted({n for c in out for n in _names(c.left) + _names(c.right)}):
        if name not in METRICS:
            raise ConfigError(f"--pick {text!r}: unknown metric {name!r}; metrics are {', '.join(METRICS)}")
        if available is not None and name not in available:
            raise ConfigError(f"--pick {text!r}: this sweep does not measure {name!r} (it measures "
                              f"{', '.join(m for m in METRICS if m in available)})")
    return out


def _tokens(text: str) -> list[str]:
    tokens, position, stripped = [], 0, text.rstrip()
    while position < len(stripped):
        match = TOKEN.match(stripped, position)
        if match is None:
            raise ConfigError(f"--pick {text!r}: cannot read {stripped[position:].strip()!r}")
        tokens.append(match.group(match.lastindex))
        position = match.end()
    return tokens


class _Parser:
    """condition := sum CMP sum; sum := term (('+'|'-') term)*; term := factor (('*'|'/') factor)*;
    factor := NUMBER | NAME | '-' factor | '(' sum ')'."""

    def __init__(self, tokens: list[str], text: str) -> None:
        self.tokens, self.text, self.at = tokens, text, 0

    def peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ConfigError(f"--pick {self.text!r}: ends too early")
        self.at += 1
        return token

    def condition(self) -> Condition:
        left = self.sum()
        op = self.take()
        if op not in COMPARE:
            raise ConfigError(f"--pick {self.text!r}: expected a comparison (>=, <=, >, <, ==), got {op!r}")
        return Condition(left, op, self.sum())

    def sum(self) -> tuple:
        node = self.term()
        while self.peek() in ("+", "-"):
            node = (self.take(), node, self.term())
        return node

    def term(self) -> tuple:
        node = self.factor()
        while self.peek() in ("*", "/"):
            node = (self.take(), node, self.factor())
        return node

    def factor(self) -> tuple:
        token = self.take()
        if token == "-":
            return ("neg", self.factor())
        if token == "(":
            node = self.sum()
            if self.take() != ")":
                raise ConfigError(f"--pick {self.text!r}: a '(' is not closed")
            return node
        if token[0].isdigit() or token[0] == ".":
            return ("num", float(token))
        if token in ("and", ")") or token in COMPARE or token in "+*/":
            raise ConfigError(f"--pick {self.text!r}: expected a number or a metric, got {token!r}")
        return ("fp32", token[5:]) if token.startswith("fp32.") else ("metric", token)


def _names(node: tuple) -> list[str]:
    if node[0] in ("metric", "fp32"):
        return [node[1]]
    return [n for child in node[1:] if isinstance(child, tuple) for n in _names(child)]


def _bind_fp32(condition: Condition, text: str) -> Condition:
    """A bare ``fp32`` is FP32's value of the one metric its comparison names."""
    names = set(_metric_names(condition.left) + _metric_names(condition.right))
    metric = next(iter(names)) if len(names) == 1 else None

    def bind(node: tuple) -> tuple:
        if node == ("metric", "fp32"):
            if metric is None:
                raise ConfigError(f"--pick {text!r}: a bare fp32 needs exactly one metric in its comparison "
                                  "(write fp32.METRIC)")
            return ("fp32", metric)
        return (node[0], *[bind(c) if isinstance(c, tuple) else c for c in node[1:]])

    return Condition(bind(condition.left), condition.op, bind(condition.right))


def _metric_names(node: tuple) -> list[str]:
    if node[0] == "metric":
        return [] if node[1] == "fp32" else [node[1]]
    return [n for child in node[1:] if isinstance(child, tuple) for n in _metric_names(child)]


def choose(records: list[dict], fp32: dict[str, float], conditions: tuple[Condition, ...], objective: str,
           maximize: bool) -> dict | None:
    """The record that meets every condition with the best ``objective`` (ties: the first in sweep order)."""
    best, best_value = None, None
    for record in records:
        metrics = record["metrics"]
        if not all(c.holds(metrics, fp32) for c in conditions) or metrics.get(objective) is None:
            continue
        value = metrics[objective] if maximize else -metrics[objective]
        if best_value is None or value > best_value:
            best, best_value = record, value
    return best


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, each point ``(cost, quality)``: lower cost and higher
    quality are better; a point dominates another when it is no worse in both and better in one."""
    front = []
    for i, (cost, quality) in enumerate(points):
        dominated = any(c <= cost and q >= quality and (c < cost or q > quality)
                        for j, (c, q) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))
