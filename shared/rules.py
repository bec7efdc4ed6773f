"""The rule language: a small, safe boolean expression language over DICOM tags.

Compatible with mercure notation: a tag is written `@Keyword@` or `tags.Keyword`; its value is a
string ('' when the instance does not have the tag; such tags are reported in `missing_tags`).

    float(tags.SliceThickness) < 2.0
    @Modality@ in ('MR', 'CT') and not @StudyDescription@.startswith('RESEARCH')
    'HEAD' in @SeriesDescription@.upper() or regex('(?i)brain', @ProtocolName@)

The expression is parsed with `ast` and evaluated by the interpreter below, which knows only the
node types, functions and string methods in its whitelists. Nothing is ever handed to
eval/exec/compile: a rule cannot reach attributes, modules or builtins it was not given. Everything
that could be abused is refused at compile time with a message naming the offending part
(column and source text), and operations that could blow up memory or time (string repetition,
replace, join, zfill, regexes) are bounded. docs/rules.md is the user reference.
"""

from __future__ import annotations

import ast
import difflib
import io
import math
import time
import tokenize
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import regex as _regex  # the `regex` module supports a match timeout, `re` does not

MAX_EXPRESSION_LENGTH = 4000
MAX_VALUE_LENGTH = 100_000       # most characters/items any string or list (all its contents) may hold
MAX_INT_BITS = 4096              # bigger integers are refused (no arithmetic bombs)
MAX_CONSTANT = 10**18            # largest integer literal
MAX_PATTERN_LENGTH = 500         # longest regular expression
REGEX_TIMEOUT_SECONDS = 0.25     # catastrophic backtracking ends as a run-time error
RULE_TIMEOUT_SECONDS = 1.0       # one evaluation in all: many regexes just under their timeout


# Not DICOM elements but facts of the association, added to every instance's tags by the receiver
# under mercure's names, so that mercure rules routing by sender keep working.
ASSOCIATION_TAGS = ("SenderAET", "ReceiverAET", "SenderAddress")


def association_tags(calling_aet: str, called_aet: str, peer_host: str) -> dict[str, str]:
    return dict(zip(ASSOCIATION_TAGS, (calling_aet, called_aet, peer_host), strict=True))


class RuleSyntaxError(ValueError):
    """A rule that cannot be compiled; the message says where and why."""

    def __init__(self, message: str, column: int | None = None, text: str = "") -> None:
        self.reason = message
        self.column = column
        self.text = text
        where = f"column {column}: " if column is not None else ""
        snippet = f" (at: {text})" if text else ""
        super().__init__(f"{where}{message}{snippet}")


class RuleRuntimeError(Exception):
    """An evaluation that failed (bad conversion, type mismatch, limits)."""


@dataclass
class RuleResult:
    matched: bool
    missing_tags: list[str] = field(default_factory=list)
    error: str | None = None
    used_tags: dict[str, str] = field(default_factory=dict)
    value: Any = None


# ------------------------------------------------------------------ whitelists

def _regex_search(pattern: Any, value: Any, *, timeout: float = REGEX_TIMEOUT_SECONDS) -> bool:
    return _compiled_pattern(_need_str(pattern, "regex pattern")).search(
        _need_str(value, "regex value"), timeout=timeout) is not None


def _regex_fullmatch(pattern: Any, value: Any, *, timeout: float = REGEX_TIMEOUT_SECONDS) -> bool:
    return _compiled_pattern(_need_str(pattern, "match pattern")).fullmatch(
        _need_str(value, "match value"), timeout=timeout) is not None


def _contains(value: Any, sub: Any) -> bool:
    return _need_str(sub, "contains() substring") in _need_str(value, "contains() value")


def _icontains(value: Any, sub: Any) -> bool:
    return (_need_str(sub, "icontains() substring").casefold()
            in _need_str(value, "icontains() value").casefold())


def _safe_str(value: Any = "") -> str:
    # str() of our own values (str, numbers, bools, None, tuples/lists of them) is harmless once
    # their size is bounded (a character becomes at most 10 in str() of a container).
    _check_size(value)
    return _check_size(str(value))


def _safe_int(value: Any = 0, base: Any = None) -> int:
    if base is None:
        result = int(value)
    else:
        result = int(value, base)
    return _check_size(result)


def _safe_sum(values: Any, start: Any = 0) -> Any:
    # Numbers only: sum() of lists or tuples copies the growing result once per item (quadratic).
    items = list(values)
    if not all(isinstance(v, int | float) for v in [start, *items]):
        raise RuleRuntimeError("sum() adds numbers only")
    return sum(items, start)


def _safe_round(value: Any, ndigits: Any = None) -> Any:
    if ndigits is not None and (not isinstance(ndigits, int) or abs(ndigits) > 100):
        raise RuleRuntimeError("round(): ndigits must be an integer between -100 and 100")
    return round(value) if ndigits is None else round(value, ndigits)


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "len": len, "min": min, "max": max, "any": any, "all": all, "sum": _safe_sum,
    "round": _safe_round, "float": float, "int": _safe_int, "str": _safe_str, "abs": abs,
    "bool": bool, "chr": chr, "ord": ord, "sorted": sorted,
    "regex": _regex_search, "search": _regex_search, "match": _regex_fullmatch,
    "contains": _contains, "icontains": _icontains,
}
# Functions whose first argument is a regular expression (checked at compile time if literal).
PATTERN_FUNCTIONS = {"regex", "search", "match"}

# String methods a rule may call on a value. Padding methods (center, ljust, rjust, expandtabs)
# and format/format_map (attribute access through '{0.__class__}') are deliberately absent.
STRING_METHODS = frozenset({
    "lower", "upper", "strip", "lstrip", "rstrip", "startswith", "endswith", "replace", "split",
    "rsplit", "splitlines", "count", "find", "rfind", "index", "rindex", "title", "capitalize",
    "casefold", "swapcase", "isdigit", "isalpha", "isalnum", "isnumeric", "isdecimal", "isspace",
    "islower", "isupper", "istitle", "removeprefix", "removesuffix", "zfill", "join", "partition",
    "rpartition",
})

_BINARY_OPS: dict[type[ast.operator], str] = {
    ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
    # mercure rules are Python, where (a == b) | (c == d) works: existing rules use & and |.
    ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^",
}
_BIT_OPS: dict[type[ast.operator], Callable[[int, int], int]] = {
    ast.BitAnd: lambda a, b: a & b, ast.BitOr: lambda a, b: a | b, ast.BitXor: lambda a, b: a ^ b,
}
_COMPARE_OPS: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b,
    ast.Lt: lambda a, b: a < b, ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}


# ------------------------------------------------------------------ compiling

_TAG_PREFIX = "_tag_"  # internal name for @Keyword@ references; never visible to users


def _rewrite_at_tags(expr: str) -> tuple[str, dict[str, str]]:
    """Replace each `@Keyword@` outside string literals by an internal name.

    Returns the rewritten source and a map internal-name -> keyword. Done with a tiny scanner
    (not a regex) so that '@' inside quoted strings is left alone.
    """
    out: list[str] = []
    names: dict[str, str] = {}
    i, n = 0, len(expr)
    quote: str | None = None
    while i < n:
        ch = expr[i]
        if quote:
            out.append(ch)
            if ch == "\\" and i + 1 < n:
                out.append(expr[i + 1])
                i += 2
                continue
            if expr.startswith(quote, i):
                out.append(expr[i + 1:i + len(quote)])
                i += len(quote)
                quote = None
                continue
            i += 1
            continue
        if ch in "'\"":
            quote = expr[i:i + 3] if expr[i:i + 3] in ("'''", '"""') else ch
            out.append(quote)
            i += len(quote)
            continue
        if ch == "@":
            end = expr.find("@", i + 1)
            keyword = expr[i + 1:end] if end > 0 else ""
            if end < 0 or not keyword or not all(c.isascii() and (c.isalnum() or c == "_") for c in keyword):
                raise RuleSyntaxError("'@' must enclose a tag keyword, like @Modality@",
                                      column=i + 1, text=expr[i:i + 20])
            internal = f"{_TAG_PREFIX}{keyword}"
            names[internal] = keyword
            out.append(internal)
            i = end + 1
            continue
        out.append(ch)
        i += 1
    return "".join(out), names


@dataclass
class _Ctx:
    source: str
    at_tags: dict[str, str]
    tags: set[str] = field(default_factory=set)


def _node_error(ctx: _Ctx, node: ast.AST, message: str) -> RuleSyntaxError:
    text = ast.get_source_segment(ctx.source, node) or ""
    # Give the column in the user's own notation: map internal names back to @Keyword@.
    for internal in sorted(ctx.at_tags, key=len, reverse=True):
        text = text.replace(internal, f"@{ctx.at_tags[internal]}@")
    column = getattr(node, "col_offset", None)
    if column is not None:
        line = ctx.source.encode()[:column].decode(errors="ignore")
        column = _user_column(ctx, line) + 1
    if len(text) > 60:
        text = text[:57] + "..."
    return RuleSyntaxError(message, column=column, text=text)


def _user_column(ctx: _Ctx, prefix: str) -> int:
    # Every internal name is 3 characters longer than its @Keyword@ spelling.
    return len(prefix) - prefix.count(_TAG_PREFIX) * (len(_TAG_PREFIX) - 2)


def _check(ctx: _Ctx, node: ast.AST, call_func: bool = False) -> None:
    """Refuse anything outside the whitelist; collect the referenced tags."""
    if isinstance(node, ast.Expression):
        _check(ctx, node.body)
    elif isinstance(node, ast.BoolOp):
        for value in node.values:
            _check(ctx, value)
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, ast.Not | ast.USub | ast.UAdd):
            raise _node_error(ctx, node, "operator '~' is not allowed")
        _check(ctx, node.operand)
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY_OPS:
            symbol = {ast.Pow: "**", ast.LShift: "<<", ast.RShift: ">>", ast.BitAnd: "&", ast.BitOr: "|",
                      ast.BitXor: "^", ast.MatMult: "@"}.get(type(node.op), type(node.op).__name__)
            hint = " (write tags as @Keyword@)" if symbol == "@" else ""
            raise _node_error(ctx, node, f"operator '{symbol}' is not allowed{hint}")
        _check(ctx, node.left)
        _check(ctx, node.right)
    elif isinstance(node, ast.Compare):
        for op in node.ops:
            if type(op) not in _COMPARE_OPS:
                raise _node_error(ctx, node, "'is' / 'is not' are not allowed, use == / !=")
        _check(ctx, node.left)
        for comparator in node.comparators:
            _check(ctx, comparator)
    elif isinstance(node, ast.IfExp):
        for part in (node.test, node.body, node.orelse):
            _check(ctx, part)
    elif isinstance(node, ast.Constant):
        _check_constant(ctx, node)
    elif isinstance(node, ast.Tuple | ast.List | ast.Set):
        for element in node.elts:
            if isinstance(element, ast.Starred):
                raise _node_error(ctx, element, "starred expressions are not allowed")
            _check(ctx, element)
    elif isinstance(node, ast.Name):
        _check_name(ctx, node, call_func)
    elif isinstance(node, ast.Attribute):
        _check_attribute(ctx, node, call_func)
    elif isinstance(node, ast.Subscript):
        _check_subscript(ctx, node)
    elif isinstance(node, ast.Slice):
        for bound in (node.lower, node.upper, node.step):
            if bound is not None:
                _check(ctx, bound)
    elif isinstance(node, ast.Call):
        _check_call(ctx, node)
    else:
        raise _node_error(ctx, node, f"{_describe(node)} is not allowed in a rule")


def _describe(node: ast.AST) -> str:
    names = {
        ast.Lambda: "lambda", ast.ListComp: "a list comprehension", ast.SetComp: "a set comprehension",
        ast.DictComp: "a dict comprehension", ast.GeneratorExp: "a generator expression",
        ast.JoinedStr: "an f-string", ast.FormattedValue: "an f-string", ast.NamedExpr: "assignment (:=)",
        ast.Dict: "a dict literal", ast.Await: "await", ast.Yield: "yield", ast.YieldFrom: "yield",
        ast.Starred: "a starred expression",
    }
    return names.get(type(node), type(node).__name__)


def _check_constant(ctx: _Ctx, node: ast.Constant) -> None:
    value = node.value
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        if abs(value) > MAX_CONSTANT:
            raise _node_error(ctx, node, f"integer literal too large (limit {MAX_CONSTANT:.0e})")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _node_error(ctx, node, "number literal out of range")
        return
    raise _node_error(ctx, node, f"{type(value).__name__} literals are not allowed")


def _check_name(ctx: _Ctx, node: ast.Name, call_func: bool) -> None:
    if node.id in ctx.at_tags:
        ctx.tags.add(ctx.at_tags[node.id])
        return
    if call_func:
        if node.id not in FUNCTIONS:
            raise _node_error(ctx, node, f"function '{node.id}' is not allowed "
                                         f"(allowed: {', '.join(sorted(FUNCTIONS))})")
        return
    if node.id in FUNCTIONS:
        raise _node_error(ctx, node, f"'{node.id}' can only be called")
    if node.id == "tags":
        raise _node_error(ctx, node, "write a tag as tags.Keyword or @Keyword@")
    if node.id.startswith(_TAG_PREFIX):
        raise _node_error(ctx, node, f"unknown name '{node.id}'")
    raise _node_error(ctx, node, f"unknown name '{node.id}' (quote text: '{node.id}'; "
                                 f"tags are written @{node.id}@ or tags.{node.id})")


def _check_attribute(ctx: _Ctx, node: ast.Attribute, call_func: bool) -> None:
    if node.attr.startswith("_"):
        raise _node_error(ctx, node, f"access to '{node.attr}' is not allowed")
    if isinstance(node.value, ast.Name) and node.value.id == "tags":
        if call_func:
            raise _node_error(ctx, node, f"tags.{node.attr} is a value, not a function")
        ctx.tags.add(node.attr)
        return
    if not call_func:
        raise _node_error(ctx, node, "attribute access is only allowed as tags.Keyword "
                                     "or to call a string method")
    _check(ctx, node.value)  # report the innermost offending part first
    if node.attr not in STRING_METHODS:
        raise _node_error(ctx, node, f"method '{node.attr}' is not allowed "
                                     f"(allowed: {', '.join(sorted(STRING_METHODS))})")


def _check_subscript(ctx: _Ctx, node: ast.Subscript) -> None:
    # tags['Keyword'] is a tag reference; other subscripts index or slice a value.
    if isinstance(node.value, ast.Name) and node.value.id == "tags":
        key = node.slice
        if not (isinstance(key, ast.Constant) and isinstance(key.value, str)
                and key.value and not key.value.startswith("_")):
            raise _node_error(ctx, node, "tags[...] needs a quoted keyword, like tags['Modality']")
        ctx.tags.add(key.value)
        return
    _check(ctx, node.value)
    _check(ctx, node.slice)


def _check_call(ctx: _Ctx, node: ast.Call) -> None:
    if node.keywords:
        raise _node_error(ctx, node, "keyword arguments are not allowed")
    if not isinstance(node.func, ast.Name | ast.Attribute):
        raise _node_error(ctx, node, "only named functions and string methods can be called")
    _check(ctx, node.func, call_func=True)
    for arg in node.args:
        if isinstance(arg, ast.Starred):
            raise _node_error(ctx, arg, "starred arguments are not allowed")
        _check(ctx, arg)
    if isinstance(node.func, ast.Name) and node.func.id in PATTERN_FUNCTIONS and node.args:
        pattern = node.args[0]
        if isinstance(pattern, ast.Constant) and isinstance(pattern.value, str):
            try:
                _compiled_pattern(pattern.value)
            except RuleRuntimeError as exc:
                raise _node_error(ctx, pattern, str(exc)) from None


def _known_keywords() -> set[str]:
    try:
        from pydicom.datadict import keyword_dict
    except ImportError:  # pragma: no cover - pydicom is a dependency
        return set()
    return set(keyword_dict)


@lru_cache(maxsize=1)
def _keywords() -> frozenset[str]:
    return frozenset(_known_keywords()) | frozenset(ASSOCIATION_TAGS)


def _unknown_keywords(tags: set[str]) -> list[str]:
    known = _keywords()
    return [tag for tag in sorted(tags) if known and tag not in known]


def _keyword_warning(tag: str) -> str:
    close = difflib.get_close_matches(tag, _keywords(), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"'{tag}' is not a DICOM keyword{hint}"


class CompiledRule:
    """A checked rule, ready to evaluate against the tags of an instance."""

    def __init__(self, source: str, tree: ast.Expression, at_tags: dict[str, str], tags: set[str]) -> None:
        self.source = source
        self._tree = tree
        self._at_tags = at_tags
        self.tags = sorted(tags)
        self.unknown_tags = _unknown_keywords(tags)
        self.warnings = [_keyword_warning(tag) for tag in self.unknown_tags]

    def __repr__(self) -> str:
        return f"CompiledRule({self.source!r})"

    def evaluate(self, tags: dict[str, str]) -> RuleResult:
        used = {tag: str(tags.get(tag, "")) for tag in self.tags}
        missing = [tag for tag in self.tags if tag not in tags or tags.get(tag) in (None, "")]
        try:
            value = _Evaluator(tags, self._at_tags).eval(self._tree.body)
            return RuleResult(matched=bool(value), missing_tags=missing, used_tags=used, value=value)
        except RecursionError:
            return RuleResult(False, missing, "expression too deeply nested", used)
        except _regex.error as exc:
            return RuleResult(False, missing, f"regex error: {exc}", used)
        except TimeoutError:
            return RuleResult(False, missing, "regex took too long (timeout)", used)
        except (RuleRuntimeError, ValueError, TypeError, ZeroDivisionError, OverflowError,
                IndexError, AttributeError, KeyError, MemoryError) as exc:
            return RuleResult(False, missing, f"{type(exc).__name__}: {exc}", used)


def _blank_comments(expr: str) -> str:
    """Blank out '# ...' comments: once the lines are joined, a comment would swallow the rest."""
    lines = io.StringIO(expr).readlines()
    try:
        for token in tokenize.generate_tokens(io.StringIO(expr).readline):
            if token.type == tokenize.COMMENT:
                (row, start), (_, end) = token.start, token.end
                lines[row - 1] = lines[row - 1][:start] + " " * (end - start) + lines[row - 1][end:]
    except (tokenize.TokenError, SyntaxError):
        return expr  # unbalanced brackets or quotes: the parser reports them
    return "".join(lines)


def compile_rule(expr: str) -> CompiledRule:
    """Parse and check a rule; raise RuleSyntaxError with the offending part if it is not allowed."""
    if not isinstance(expr, str):
        raise RuleSyntaxError("a rule must be a string")
    if len(expr) > MAX_EXPRESSION_LENGTH:
        raise RuleSyntaxError(f"rule is too long ({len(expr)} characters, limit {MAX_EXPRESSION_LENGTH})")
    # Line breaks (from YAML block scalars) are spaces here, so columns refer to one flat line.
    flat = _blank_comments(expr).replace("\r\n", "  ").replace("\n", " ").replace("\r", " ").replace("\t", " ").strip()
    if not flat:
        raise RuleSyntaxError("rule is empty")
    source, at_tags = _rewrite_at_tags(flat)
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        column = exc.offset
        if column is not None:
            column = _user_column(_Ctx(source, at_tags), source[:column - 1]) + 1
        raise RuleSyntaxError(f"syntax error: {exc.msg}", column=column,
                              text=flat[(column or 1) - 1:(column or 1) + 19]) from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise RuleSyntaxError(f"cannot parse rule: {exc}") from None
    ctx = _Ctx(source, at_tags)
    try:
        _check(ctx, tree)
    except RecursionError:
        raise RuleSyntaxError("rule is nested too deeply") from None
    return CompiledRule(flat, tree, at_tags, ctx.tags)


# ------------------------------------------------------------------ evaluating

def _need_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RuleRuntimeError(f"{what} must be text, got {type(value).__name__}")
    return value


@lru_cache(maxsize=256)
def _compiled_pattern(pattern: str) -> Any:
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise RuleRuntimeError(f"regular expression too long ({len(pattern)} characters, "
                               f"limit {MAX_PATTERN_LENGTH})")
    try:
        return _regex.compile(pattern)
    except _regex.error as exc:
        raise RuleRuntimeError(f"invalid regular expression: {exc}") from None


def _weight(value: Any) -> int:
    """Characters and items a value holds, counting every reference: what str() or a comparison of
    it walks through. ['x' * 99999] * 100000 is short as a list but 10 GB as text."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list | tuple | frozenset):
        return len(value) + sum(_weight(item) for item in value)
    return 1


def _check_size(value: Any) -> Any:
    if isinstance(value, str | list | tuple | frozenset) and _weight(value) > MAX_VALUE_LENGTH:
        raise RuleRuntimeError(f"value too long ({_weight(value)} > {MAX_VALUE_LENGTH})")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise RuleRuntimeError("number too large")
    return value


class _Evaluator:
    def __init__(self, tags: dict[str, str], at_tags: dict[str, str]) -> None:
        self.tags = tags
        self.at_tags = at_tags
        # The router evaluates rules on its event loop: a rule may not hold it for long.
        self.deadline = time.monotonic() + RULE_TIMEOUT_SECONDS

    def tag(self, keyword: str) -> str:
        value = self.tags.get(keyword)
        return "" if value is None else str(value)

    def eval(self, node: ast.expr) -> Any:
        if time.monotonic() > self.deadline:
            raise RuleRuntimeError(f"rule took longer than {RULE_TIMEOUT_SECONDS:g} s")
        method = getattr(self, f"_{type(node).__name__}", None)
        if method is None:  # cannot happen after _check; refuse rather than guess
            raise RuleRuntimeError(f"{type(node).__name__} is not allowed")
        return method(node)

    def _BoolOp(self, node: ast.BoolOp) -> Any:
        value: Any = None
        for operand in node.values:
            value = self.eval(operand)
            if isinstance(node.op, ast.And) and not value:
                return value
            if isinstance(node.op, ast.Or) and value:
                return value
        return value

    def _UnaryOp(self, node: ast.UnaryOp) -> Any:
        operand = self.eval(node.operand)
        if isinstance(node.op, ast.Not):
            return not operand
        if not isinstance(operand, int | float):
            raise RuleRuntimeError(f"unary minus/plus needs a number, got {type(operand).__name__}")
        return -operand if isinstance(node.op, ast.USub) else +operand

    def _BinOp(self, node: ast.BinOp) -> Any:
        left, right = self.eval(node.left), self.eval(node.right)
        op = type(node.op)
        if op in _BIT_OPS:
            # Between booleans (and integers, which cannot grow here); a set or string is refused.
            if not (isinstance(left, int) and isinstance(right, int)):
                raise RuleRuntimeError(f"'{_BINARY_OPS[op]}' needs True/False or integers, got "
                                       f"{type(left).__name__} and {type(right).__name__}")
            return _BIT_OPS[op](left, right)
        if op is ast.Mult:
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(count, int):
                    if _weight(seq) * max(count, 0) > MAX_VALUE_LENGTH:
                        raise RuleRuntimeError("repetition result too long")
            return _check_size(left * right)
        if op is ast.Mod and not (isinstance(left, int | float) and isinstance(right, int | float)):
            raise RuleRuntimeError("'%' is only allowed between numbers (no string formatting)")
        if op is ast.Add:
            return _check_size(left + right)
        if op is ast.Sub:
            return _check_size(left - right)
        if op is ast.Div:
            return left / right
        if op is ast.FloorDiv:
            return _check_size(left // right)
        return _check_size(left % right)

    def _Compare(self, node: ast.Compare) -> bool:
        left = self.eval(node.left)
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = self.eval(comparator)
            if not _COMPARE_OPS[type(op)](left, right):
                return False
            left = right
        return True

    def _IfExp(self, node: ast.IfExp) -> Any:
        return self.eval(node.body) if self.eval(node.test) else self.eval(node.orelse)

    def _Constant(self, node: ast.Constant) -> Any:
        return node.value

    def _Tuple(self, node: ast.Tuple) -> tuple[Any, ...]:
        return tuple(self.eval(e) for e in node.elts)

    def _List(self, node: ast.List) -> list[Any]:
        return [self.eval(e) for e in node.elts]

    def _Set(self, node: ast.Set) -> frozenset[Any]:
        return frozenset(self.eval(e) for e in node.elts)

    def _Name(self, node: ast.Name) -> Any:
        if node.id in self.at_tags:
            return self.tag(self.at_tags[node.id])
        raise RuleRuntimeError(f"unknown name '{node.id}'")

    def _Attribute(self, node: ast.Attribute) -> Any:
        if isinstance(node.value, ast.Name) and node.value.id == "tags" and not node.attr.startswith("_"):
            return self.tag(node.attr)
        raise RuleRuntimeError("attribute access is not allowed")

    def _Subscript(self, node: ast.Subscript) -> Any:
        if isinstance(node.value, ast.Name) and node.value.id == "tags":
            key = node.slice
            assert isinstance(key, ast.Constant) and isinstance(key.value, str)
            return self.tag(key.value)
        value = self.eval(node.value)
        if not isinstance(value, str | list | tuple):
            raise RuleRuntimeError(f"cannot index a {type(value).__name__}")
        index = self.eval(node.slice)
        if not isinstance(index, int | slice) or isinstance(index, bool):
            raise RuleRuntimeError("an index must be an integer or a slice")
        return value[index]

    def _Slice(self, node: ast.Slice) -> slice:
        parts = [None if p is None else self.eval(p) for p in (node.lower, node.upper, node.step)]
        for part in parts:
            if part is not None and (not isinstance(part, int) or isinstance(part, bool)):
                raise RuleRuntimeError("slice bounds must be integers")
        return slice(*parts)

    def _Call(self, node: ast.Call) -> Any:
        args = [self.eval(a) for a in node.args]
        func = node.func
        if isinstance(func, ast.Name):
            if func.id not in FUNCTIONS:
                raise RuleRuntimeError(f"function '{func.id}' is not allowed")
            if func.id in PATTERN_FUNCTIONS:
                remaining = max(0.001, self.deadline - time.monotonic())
                return FUNCTIONS[func.id](*args, timeout=min(REGEX_TIMEOUT_SECONDS, remaining))
            return _check_size(FUNCTIONS[func.id](*args))
        assert isinstance(func, ast.Attribute)
        target = self.eval(func.value)
        return _check_size(_call_string_method(target, func.attr, args))


def _call_string_method(target: Any, name: str, args: list[Any]) -> Any:
    if name not in STRING_METHODS:
        raise RuleRuntimeError(f"method '{name}' is not allowed")
    if not isinstance(target, str):
        raise RuleRuntimeError(f".{name}() needs text, got {type(target).__name__}")
    # Bound the operations whose result can be much larger than their inputs.
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = target.count(args[0]) if args[0] else len(target) + 1
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            count = min(count, args[2])
        if len(target) + count * max(0, len(args[1]) - len(args[0])) > MAX_VALUE_LENGTH:
            raise RuleRuntimeError("replace() result too long")
    elif name == "zfill" and args and isinstance(args[0], int) and args[0] > MAX_VALUE_LENGTH:
        raise RuleRuntimeError("zfill() width too large")
    elif name == "join" and args and isinstance(args[0], str | list | tuple | frozenset):
        items = list(args[0])  # a string joins its characters
        total = sum(len(i) for i in items if isinstance(i, str)) + len(target) * max(0, len(items) - 1)
        if total > MAX_VALUE_LENGTH:
            raise RuleRuntimeError("join() result too long")
    return getattr(target, name)(*args)
