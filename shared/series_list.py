"""Study completion by series list: `'Axial T2' and ('Sag T1 GRE' or 'Sag T1 TSE')`.

A rule's `study_required_series` names the series descriptions a study needs before it counts as complete.
Quoted names combine with and / or / not and parentheses, nothing else; a name is present when a
received series description contains it, case-insensitively: mercure's notation, whose names "can be
substrings of the full names", so that its lists complete here too ('T2' is there once 'Axial T2
FLAIR' arrived). Parsed with `ast`, evaluated by walking the tree.
"""

from __future__ import annotations

import ast
from typing import Any

from shared.rules import MAX_EXPRESSION_LENGTH, RuleSyntaxError


class SeriesList:
    """`'Axial T2' and ('Sag T1 GRE' or 'Sag T1 TSE')`: which series descriptions a study needs."""

    def __init__(self, source: str, tree: ast.Expression, names: list[str]) -> None:
        self.source = source
        self._tree = tree
        self.names = names

    def __repr__(self) -> str:
        return f"SeriesList({self.source!r})"

    def satisfied(self, received: Any) -> bool:
        """True when the received series descriptions fulfil the expression (case-insensitive)."""
        have = [str(name).casefold() for name in received]
        return bool(self._eval(self._tree.body, have))

    def _eval(self, node: ast.expr, have: list[str]) -> bool:
        if isinstance(node, ast.Constant):
            wanted = str(node.value).strip().casefold()
            return any(wanted in description for description in have)
        if isinstance(node, ast.UnaryOp):
            return not self._eval(node.operand, have)
        assert isinstance(node, ast.BoolOp)
        results = (self._eval(v, have) for v in node.values)
        return all(results) if isinstance(node.op, ast.And) else any(results)


def compile_series_list(expr: str) -> SeriesList:
    """Parse a required-series expression: quoted names combined with and/or/not and parentheses."""
    if not isinstance(expr, str) or not expr.strip():
        raise RuleSyntaxError("series list is empty")
    if len(expr) > MAX_EXPRESSION_LENGTH:
        raise RuleSyntaxError(f"series list is too long (limit {MAX_EXPRESSION_LENGTH})")
    flat = expr.replace("\r", " ").replace("\n", " ").replace("\t", " ").strip()
    try:
        tree = ast.parse(flat, mode="eval")
    except SyntaxError as exc:
        raise RuleSyntaxError(f"syntax error: {exc.msg}", column=exc.offset,
                              text=flat[(exc.offset or 1) - 1:(exc.offset or 1) + 19]) from None
    names: list[str] = []

    def check(node: ast.AST) -> None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.strip() and node.value not in names:
                names.append(node.value)
            if not node.value.strip():
                raise _error(flat, node, "empty series description")
        elif isinstance(node, ast.BoolOp):
            for value in node.values:
                check(value)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            check(node.operand)
        else:
            raise _error(flat, node, "a series list is quoted series descriptions combined "
                                         "with and / or / not and parentheses")
    try:
        check(tree.body)
    except RecursionError:
        raise RuleSyntaxError("series list is nested too deeply") from None
    return SeriesList(flat, tree, names)


def _error(source: str, node: ast.AST, message: str) -> RuleSyntaxError:
    text = ast.get_source_segment(source, node) or ""
    offset = getattr(node, "col_offset", None)
    column = None if offset is None else len(source.encode()[:offset].decode(errors="ignore")) + 1
    return RuleSyntaxError(message, column=column, text=text[:57] + "..." if len(text) > 60 else text)
