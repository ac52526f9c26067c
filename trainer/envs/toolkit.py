"""Tool classes of tool-using domains: discovery, JSON schemas, validated calls, DB copies and hashes.

A domain's tools are the methods of one class, named in the config as ``module:Class``
(``environment.tools``). The class takes the domain's database in its constructor and its tool methods
read and change ``self.db``. Tools are recognised the way tau2-bench's ``ToolKitType`` metaclass does
(``src/tau2/environment/toolkit.py``): a method carrying the attribute ``__tool__``, set by tau2's
``@is_tool`` or by our ``@tool``; ``__mutates_state__`` says whether it may change the DB and
``__discoverable__`` hides it from the agent. So tau2's own ``AirlineTools`` / ``RetailTools`` plug in
unchanged, duck-typed: nothing here imports tau2.

    kit = Toolkit.load("trainer.envs.domains.bookshop.tools:BookshopTools")
    box = kit.open(db)                      # one episode's tool box over its own copy of the DB
    content, error = box.call("get_order", {"order_id": "B1001"})   # never raises
    box.db_hash()                           # tau2's get_db_hash: sha256 of the sorted JSON dump

The DB is either the parsed ``db.json`` (a dict) or, with ``environment.db_model`` (e.g. tau2's
``tau2.domains.airline.data_model:FlightDB``), that pydantic model validated from it, as tau2's
``DB.load`` does. Schemas and argument validation follow tau2's ``Tool`` (``src/tau2/environment/tool.py``):
the JSON schema of a pydantic model built from the method's signature, described by its Google-style
docstring. A call passes the agent's arguments to the method as they are (tau2's ``ToolKitBase.use_tool``);
a failure of any kind comes back as ``"Error: <message>"`` like tau2's ``Environment.get_response``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import json
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from trainer.errors import UserError

TOOL_ATTR = "__tool__"
TOOL_TYPE_ATTR = "__tool_type__"
MUTATES_ATTR = "__mutates_state__"
DISCOVERABLE_ATTR = "__discoverable__"


def tool(kind: str = "read", mutates: bool | None = None) -> Callable[[Callable], Callable]:
    """Mark a method as a tool: ``kind`` is ``read``, ``write``, ``think`` or ``generic``; ``mutates`` (default:
    ``kind == "write"``) whether it may change the DB. The same attributes tau2's ``@is_tool`` sets."""

    def mark(fn: Callable) -> Callable:
        setattr(fn, TOOL_ATTR, True)
        setattr(fn, TOOL_TYPE_ATTR, kind)
        setattr(fn, MUTATES_ATTR, kind == "write" if mutates is None else mutates)
        return fn

    return mark


def import_ref(ref: str, what: str) -> Any:
    """The object ``package.module:Name`` names; a ``UserError`` naming ``what`` (the config key) otherwise."""
    module, _, attr = ref.partition(":")
    if not module or not attr:
        raise UserError(what, f"{ref!r} is not a 'package.module:Name' reference")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        hint = (
            "install tau2-bench (Python 3.12+; `pip install -e .` in its checkout)"
            if module.startswith("tau2.")
            else "check the module path and that the package is installed"
        )
        raise UserError(what, f"cannot import {module}: {e}", hint=hint) from e
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise UserError(what, f"module {module} has no attribute {attr!r}") from None


# ----------------------------------------------------------------------------- schemas


@dataclass(frozen=True)
class ToolSpec:
    name: str
    mutates: bool
    params: Any  # the pydantic model class the schema's parameters come from
    schema: dict[str, Any]  # OpenAI function schema, for apply_chat_template(tools=...)


_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Returns?|Raises|Yields|Examples?|Notes?):\s*$")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """``(description, {argument: description})`` of a Google-style docstring: the text before its first
    section (its paragraphs joined by a blank line, as tau2's ``Tool._get_description`` joins the short and the
    long description) and the entries of its ``Args:`` section (continuation lines joined)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    desc: list[str] = []
    args: dict[str, str] = {}
    section: str | None = None
    current: str | None = None
    indent: int | None = None  # of the section's entries; deeper lines continue the entry above
    for line in lines:
        m = _SECTION.match(line)
        if m:
            section, current, indent = m.group(1).lower(), None, None
            continue
        if section is None:
            desc.append(line)
        elif section in ("args", "arguments", "parameters") and line.strip():
            depth = len(line) - len(line.lstrip())
            entry = re.match(r"^\s*(\*{0,2}\w+)(?:\s*\(.*?\))?:\s*(.*)$", line)
            if entry and (indent is None or depth <= indent):
                indent = depth
                current = entry.group(1).lstrip("*")
                args[current] = entry.group(2).strip()
            elif current is not None:
                args[current] = (args[current] + " " + line.strip()).strip()
    paragraphs = [p.strip().replace("\n", " ") for p in "\n".join(desc).split("\n\n") if p.strip()]
    return "\n\n".join(paragraphs), args


def _spec(name: str, fn: Callable) -> ToolSpec:
    from pydantic import Field, create_model

    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: fall back to the raw ones (or Any)
        hints = {}
    description, arg_docs = parse_docstring(fn.__doc__)
    fields: dict[str, Any] = {}
    for pname, p in list(sig.parameters.items())[1:]:  # [0] is self
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        anno = hints.get(pname, p.annotation if p.annotation is not p.empty else Any)
        default = ... if p.default is p.empty else p.default
        fields[pname] = (anno, Field(default, description=arg_docs[pname]) if pname in arg_docs else default)
    params = create_model("parameters", **fields)
    schema = {"type": "function", "function": {"name": name, "description": description or name,
                                                "parameters": params.model_json_schema()}}  # fmt: skip
    return ToolSpec(name, bool(getattr(fn, MUTATES_ATTR, True)), params, schema)


# ----------------------------------------------------------------------------- the toolkit


class Toolkit:
    """A tool class and the specs of its tools (built once per run)."""

    def __init__(self, cls: type, ref: str = ""):
        self.cls = cls
        self.ref = ref or f"{cls.__module__}:{cls.__qualname__}"
        self.specs: dict[str, ToolSpec] = {}
        # Own class first, then its bases (tau2's metaclass merges a class's tools over its parents' the same way).
        for klass in cls.__mro__:
            for name, member in vars(klass).items():
                fn = member.fget if isinstance(member, property) else member
                if name in self.specs or not getattr(fn, TOOL_ATTR, False):
                    continue
                if getattr(fn, DISCOVERABLE_ATTR, False):
                    continue  # tau2: discoverable tools stay out of the agent's prompt
                self.specs[name] = _spec(name, fn)
        if not self.specs:
            raise UserError("environment.tools", f"{self.ref} has no tool methods",
                            hint="mark them with trainer.envs.toolkit.tool (or tau2's @is_tool)")  # fmt: skip

    @classmethod
    def load(cls, ref: str) -> Toolkit:
        obj = import_ref(ref, "environment.tools")
        if not isinstance(obj, type):
            raise UserError("environment.tools", f"{ref} is not a class", hint="point at the tool class")
        return cls(obj, ref)

    def schemas(self, include: list[str] | None = None) -> list[dict[str, Any]]:
        return [s.schema for n, s in self.specs.items() if include is None or n in include]

    def open(self, db: Any, copy_on_write: bool = True) -> ToolBox:
        return ToolBox(self, db, copy_on_write)


def _to_jsonable(value: Any) -> Any:
    """tau2's ``Environment.to_json_str`` conversion of a tool's return value."""
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (int, float, bool)):
        return str(value)
    return value


def render_result(value: Any) -> str:
    """A tool's return value as the tool message's content: strings as they are, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(_to_jsonable(value), default=str)


def db_hash(db: Any) -> str:
    """tau2's ``ToolKitBase.get_db_hash``: ``get_dict_hash(db.model_dump())``, i.e. the sha256 of
    ``json.dumps(..., sort_keys=True, default=str)`` (``src/tau2/utils/utils.py``); a plain dict is dumped as is."""
    dump = db.model_dump() if hasattr(db, "model_dump") else db
    return hashlib.sha256(json.dumps(dump, sort_keys=True, default=str).encode()).hexdigest()


class ToolBox:
    """One episode's tools over one DB. With ``copy_on_write`` the DB given is shared (the pristine one of its
    task) until the first call of a tool that may change it, which first takes a private deep copy: read-only
    calls cost no copy of a large DB (airline's is megabytes). Sound for the same reason tau2's own replay is
    (``Environment.set_state`` skips non-mutating tools): a tool marked read-only does not change the DB."""

    def __init__(self, kit: Toolkit, db: Any, copy_on_write: bool = True):
        self.kit = kit
        self.db = db
        self._shared = copy_on_write
        self.instance = kit.cls(db)
        self.writes = 0  # calls of mutating tools that returned without an error

    def _own_copy(self) -> None:
        if self._shared:
            self.db = copy.deepcopy(self.db)
            self.instance = self.kit.cls(self.db)
            self._shared = False

    def call(self, name: str, arguments: dict[str, Any]) -> tuple[str, str | None]:
        """``(tool message content, error or None)``; never raises."""
        spec = self.kit.specs.get(name)
        if spec is None:
            error = f"Tool '{name}' not found."  # tau2's ToolKitBase.use_tool message
            return f"Error: {error}", error
        try:
            if spec.mutates:
                self._own_copy()
            # The arguments as the agent wrote them, like tau2's ToolKitBase.use_tool (it calls the bound method,
            # not the validating Tool wrapper): a missing or wrong argument is the tool's own error.
            result = getattr(self.instance, name)(**arguments)
        except Exception as e:  # tau2's Environment.get_response: any failure is the tool's answer
            error = _one_line(e)
            return f"Error: {error}", error
        if spec.mutates:
            self.writes += 1
        # A tool class may replace self.db (tau2's update_db does): follow it, or the hash would be of a stale DB.
        self.db = getattr(self.instance, "db", self.db)
        return render_result(result), None

    def call_function(self, name: str, arguments: dict[str, Any]) -> Any:
        """Call any method (not only tools) with plain arguments: env assertions and initialization actions."""
        self._own_copy()
        fn = getattr(self.instance, name, None)
        if fn is None or not callable(fn):
            raise ValueError(f"function {name} not found in {self.kit.ref}")
        out = fn(**arguments)
        self.db = getattr(self.instance, "db", self.db)
        return out

    def db_hash(self) -> str:
        return db_hash(self.db)


def _one_line(e: Exception) -> str:
    text = str(e) or type(e).__name__
    if type(e).__name__ == "ValidationError":  # pydantic: keep the first problem, it names the argument
        text = " ".join(text.split("\n")[:3])
    return " ".join(text.split())


# ----------------------------------------------------------------------------- databases


def read_db(path: Path) -> Any:
    """``db.json`` (or tau2's ``db.toml``) as plain data."""
    try:
        if path.suffix == ".toml":
            import tomllib  # Python 3.11+

            return tomllib.loads(path.read_text(encoding="utf-8"))
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(str(path), f"invalid JSON: line {e.lineno}, column {e.colno}: {e.msg}") from None
    except ModuleNotFoundError:
        raise UserError(str(path), "reading TOML needs Python 3.11+", hint="convert it to db.json") from None


def build_db(raw: Any, db_model: Any | None, source: str) -> Any:
    """The episode DB: ``raw`` itself, or ``db_model.model_validate(raw)`` (tau2's ``DB.load``)."""
    if db_model is None:
        return raw
    try:
        return db_model.model_validate(raw)
    except Exception as e:
        raise UserError(source, f"does not validate as {db_model.__name__}: {_one_line(e)}",
                        hint="check environment.db_model names this domain's DB class") from None  # fmt: skip


def deep_merge(base: Any, update: dict[str, Any]) -> Any:
    """tau2's ``update_pydantic_model_with_dict`` (an addict ``Dict.update``): nested dicts merge, other values
    replace. Returns a new object of the same kind as ``base``."""

    def merge(into: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        for k, v in new.items():
            into[k] = merge(dict(into[k]), v) if isinstance(v, dict) and isinstance(into.get(k), dict) else v
        return into

    if hasattr(base, "model_dump"):
        return type(base).model_validate(merge(base.model_dump(), copy.deepcopy(update)))
    return merge(copy.deepcopy(base), copy.deepcopy(update))
