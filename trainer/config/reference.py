"""Generate the config reference (markdown) from the schema's field descriptions.

``python -m trainer.config.reference`` prints it; the README embeds it between the
``<!-- config-reference -->`` markers, and a test fails when the two drift apart
(``python -m trainer.config.reference --write README.md`` refreshes it).
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from trainer.config.schema import RunConfig

BEGIN, END = "<!-- config-reference -->", "<!-- /config-reference -->"


def _models_in(tp) -> list[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    out = []
    for arg in typing.get_args(tp):
        out += _models_in(arg)
    return out


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(tp))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _default(field) -> str:
    if field.default is PydanticUndefined:
        if field.default_factory is None:
            return "**required**"
        value = field.default_factory()
        return "" if isinstance(value, BaseModel) else f"`{value}`"
    return f"`{field.default}`" if field.default is not None else "`null`"


def rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        nested = _models_in(field.annotation)
        if len(nested) == 1 and typing.get_origin(field.annotation) is not list:
            out.append(f"| `{path}` | section | | {field.description or ''} |")
            out += rows(nested[0], path + ".")
        elif nested and typing.get_origin(field.annotation) is list:
            out.append(f"| `{path}` | list | {_default(field)} | {field.description or ''} |")
            for m in nested:
                tag = m.model_fields.get("type")
                label = f"{path}[type={typing.get_args(tag.annotation)[0]}]" if tag else f"{path}[]"
                out += [r for r in rows(m, label + ".") if not r.startswith(f"| `{label}.type`")]
        else:
            desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
            out.append(f"| `{path}` | {_type_name(field.annotation)} | {_default(field)} | {desc} |")
    return out


def render() -> str:
    head = ["| key | type | default | description |", "|---|---|---|---|"]
    return "\n".join(head + rows(RunConfig)) + "\n"


def embed(readme: str) -> str:
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[:start] + "\n" + render() + readme[end:]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        path = Path(sys.argv[2])
        path.write_text(embed(path.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        sys.stdout.write(render())
