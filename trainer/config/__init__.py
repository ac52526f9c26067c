"""Load a run config: YAML file -> ``${ENV}`` interpolation -> ``--set`` overrides -> typed ``RunConfig``.

Every failure is a ``ConfigError`` whose lines name the field path, the bad value and what is
allowed; the CLI prints them without a traceback and exits 2. Imports nothing heavy (the launcher
uses this module).
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from trainer.config.api_keys import hide_keys, unset_api_keys
from trainer.config.schema import RunConfig
from trainer.errors import UserError

__all__ = ["ConfigError", "RunConfig", "load_config", "parse_config", "check_paths", "dump_config"]


class ConfigError(UserError):
    """A config that cannot be used; each problem names the field path, the bad value and what is allowed.

    Values are quoted, and a value may be an API key that ``${VAR}`` pulled in: keys are hidden."""

    def __init__(self, source: str, problems: list[str] | str, hint: str | None = None):
        problems = [problems] if isinstance(problems, str) else problems
        super().__init__(
            hide_keys(source),
            [hide_keys(p) for p in problems],
            hint=None if hint is None else hide_keys(hint),
        )


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path`` and apply ``overrides`` (``dotted.key=yaml_value``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            str(path), ["file not found"], hint="check the path; example configs are in configs/"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise ConfigError(
            str(path), [f"not UTF-8 text: byte 0x{e.object[e.start]:02x} on line {line}"],
            hint="save the config as UTF-8",
        ) from None  # fmt: skip
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read the file: {e.strerror}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(str(path), [f"invalid YAML: {_yaml_problem(e)}"]) from None
    if raw is None:
        raise ConfigError(str(path), ["the file is empty"], hint="start from configs/quickstart.yaml")
    if not isinstance(raw, dict):
        raise ConfigError(
            str(path), [f"expected a mapping of settings at the top level, got {type(raw).__name__}"]
        )
    return parse_config(raw, overrides, source=str(path))


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's problem with its line, plus where the construct it was parsing began: an unclosed
    bracket is reported at the end of the file, and the opening line is the one to fix."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    text = f"{where}{getattr(e, 'problem', None) or e}"
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and cmark is not None and (mark is None or cmark.line != mark.line):
        text += f" ({context} that starts on line {cmark.line + 1}, column {cmark.column + 1})"
    return text


def parse_config(
    raw: dict[str, Any], overrides: list[str] | None = None, source: str = "config"
) -> RunConfig:
    raw = _interpolate_env(raw, (), source)
    for item in overrides or []:
        _apply_override(raw, item, source)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(source, [_describe(err) for err in e.errors()]) from None
    return _expand_templates(cfg, source)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (what checkpoints and the ConfigMap carry)."""
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=False)


def check_paths(cfg: RunConfig, api_keys: bool = True) -> None:
    """Fail early on what a run needs from this machine and will not create: input files, and (``api_keys``)
    the environment variables ``api_key_env`` names. ``launcher validate`` passes ``api_keys=False`` and only
    warns (``unset_api_keys``): the config may be meant for ``launcher submit``, whose pod gets the key from
    the cluster's Secret."""
    problems = []
    if (
        cfg.model.create_if_missing is None
        and not _looks_like_hub_id(cfg.model.path)
        and not Path(cfg.model.path).exists()
    ):
        problems.append(f"model.path: {cfg.model.path!r}: directory not found")
    critic = cfg.algorithm.critic_path
    if critic is not None and not _looks_like_hub_id(critic) and not (Path(critic) / "config.json").is_file():
        problems.append(f"algorithm.critic_path: {critic!r}: not a model directory (no config.json)")
    missing_data = False
    if cfg.data.generate is None:
        for split in ("train", "val"):
            ds = getattr(cfg.data, split)
            if ds is not None and not Path(ds.path).is_file():
                problems.append(f"data.{split}.path: {ds.path!r}: file not found")
                missing_data = True
    # The seat-booking task writes the intention JSON too, when the run starts.
    generated = cfg.data.generate is not None and cfg.data.generate.task == "seat-booking"
    for field in ("intentions", "val_intentions"):
        path = getattr(cfg.environment, field)
        missing = path is not None and not generated and not Path(path).is_file()
        if missing and cfg.environment.name == "intentiongym":
            problems.append(f"environment.{field}: {path!r}: file not found")
            missing_data = True
    for role in ("user_simulator", "judge"):
        section = getattr(cfg, role)
        if section is None or section.backend != "local":
            continue
        built_by_run = cfg.model.create_if_missing is not None and section.path == cfg.model.path
        if not built_by_run and not Path(section.path).exists():
            problems.append(f"{role}.path: {section.path!r}: directory not found")
    if cfg.checkpoint.resume not in ("auto", "never") and not Path(cfg.checkpoint.resume).is_dir():
        problems.append(
            f"checkpoint.resume: {cfg.checkpoint.resume!r}: not auto, never, or an existing checkpoint directory"
        )
    hints = []
    if problems:
        hints.append("fix the paths (relative paths are relative to the working directory)")
    if missing_data and cfg.environment.name == "intentiongym":
        hints.append(_intentiongym_data_hint(cfg))
    keys = unset_api_keys(cfg) if api_keys else {}
    if keys:
        problems += [f"{field}: {problem}" for field, problem in keys.items()]
        names = dict.fromkeys(getattr(cfg, f.split(".")[0]).api_key_env for f in keys)
        hints.append(f"export {' and '.join(f'{n}=...' for n in names)} before starting the run")
    if problems:
        raise ConfigError("config", problems, hint="; ".join(hints))


# Where UserRL's files sit below the folder `python -m trainer.envs.intentiongym_sample --out DIR` writes.
_SAMPLE_LAYOUT = {
    "data.train.path": "intention_multiturn/train.parquet",
    "data.val.path": "intention_multiturn/test.parquet",
    "environment.intentions": "intentiongym/all_intentions_train.json",
    "environment.val_intentions": "intentiongym/all_intentions_test.json",
}


def _intentiongym_data_hint(cfg: RunConfig) -> str:
    """Where IntentionGym data comes from, with the sample command for the folder the config reads."""
    paths = {
        "data.train.path": cfg.data.train.path if cfg.data.train else None,
        "data.val.path": cfg.data.val.path if cfg.data.val else None,
        "environment.intentions": cfg.environment.intentions,
        "environment.val_intentions": cfg.environment.val_intentions,
    }
    roots = set()
    for field, path in paths.items():
        if path is None:
            continue
        posix, tail = Path(path).as_posix(), _SAMPLE_LAYOUT[field]
        roots.add("." if posix == tail else posix[: -len(tail) - 1] if posix.endswith("/" + tail) else None)
    root = roots.pop() if len(roots) == 1 else None
    if root:
        sample = f"`python -m trainer.envs.intentiongym_sample --out {root}`"
    else:
        sample = (
            "`python -m trainer.envs.intentiongym_sample --out DIR` (then point data.*.path and "
            "environment.*intentions at DIR/intention_multiturn/{train,test}.parquet and "
            "DIR/intentiongym/all_intentions_{train,test}.json)"
        )
    return (
        "the real IntentionGym files are in UserRL's release (github.com/SalesforceAIResearch/UserRL): its "
        "data/intention_multiturn/{train,test}.parquet and data/intentiongym/all_intentions_{train,test}.json; "
        f"or write a small sample in the same format: {sample}"
    )


def _looks_like_hub_id(path: str) -> bool:
    # "Qwen/Qwen3-0.6B": one slash, no leading ./ or /; such names are resolved by from_pretrained.
    return (
        bool(re.fullmatch(r"[\w.-]+/[\w.-]+", path)) and not Path(path).exists() and not path.startswith(".")
    )


# ----------------------------------------------------------------------------- env and overrides


def _interpolate_env(node: Any, loc: tuple, source: str) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate_env(v, (*loc, k), source) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate_env(v, (*loc, i), source) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        ref = _ENV.fullmatch(node.strip())
        if loc and loc[-1] == "api_key_env" and ref and ref.group(2) is None:
            # `${VAR}` would put the key itself here (set or not, the intent was the name).
            name = ref.group(1)
            raise ConfigError(
                source,
                [f"{_dotted(loc)}: `${{{name}}}` would put the key itself in the config: api_key_env wants the "
                 f"name of the environment variable that holds the key; write `api_key_env: {name}`, not "
                 f"`${{{name}}}`"],
                hint=f"export {name}=... (the key stays in the environment; the config is saved in checkpoints, "
                "ConfigMaps and logs)",
            )  # fmt: skip

        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(
                source,
                [f"{_dotted(loc)}: environment variable {name} is not set"],
                hint=f"export {name}=... or write ${{{name}:-default}}",
            )

        return _ENV.sub(sub, node)
    return node


def _apply_override(raw: dict, item: str, source: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(source, [f"--set {item!r}: expected dotted.key=value"])
    if any(not part.strip() for part in key.split(".")):
        raise ConfigError(
            source, [f"--set {item!r}: {key.strip()!r} has an empty part; expected dotted.key=value"]
        )
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, parts, source)
            continue
        if node.get(part) is None:
            node[part] = {}
        elif not isinstance(node[part], (dict, list)):
            # Replacing a value with a section would only surface later as a confusing type error.
            done = ".".join(parts[: depth + 1])
            raise ConfigError(
                source, [f"--set {key.strip()}: {done} is a value ({node[part]!r}), not a section with keys"]
            )
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        idx = _list_index(node, last, parts, source)
        node[idx] = parsed
    else:
        node[last] = parsed


def _list_index(node: list, part: str, parts: list[str], source: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(
            source, [f"--set {'.'.join(parts)}: {part!r} is not an index of a list of {len(node)}"]
        )
    return int(part)


def _list_item(node: list, part: str, parts: list[str], source: str) -> Any:
    return node[_list_index(node, part, parts, source)]


# ----------------------------------------------------------------------------- templates


def _expand_templates(cfg: RunConfig, source: str) -> RunConfig:
    """Replace ``{name}`` in path-like string fields."""
    values = {"name": cfg.name}

    def fill(loc: str, text: str) -> str:
        try:
            return text.format_map(values)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                source, [f"{loc}: {text!r}: unknown template field {e}; only {{name}} is allowed"]
            ) from None

    cfg.output_dir = fill("output_dir", cfg.output_dir)
    cfg.model.path = fill("model.path", cfg.model.path)
    for split in ("train", "val"):
        ds = getattr(cfg.data, split)
        if ds is not None:
            ds.path = fill(f"data.{split}.path", ds.path)
    return cfg


# ----------------------------------------------------------------------------- error messages


# Unknown keys with these names are secrets written inline (`cluster.api_key: sk-...`).
_SECRET_KEYS = frozenset({"api_key", "apikey", "api_token", "token", "secret", "password", "access_token"})


def _dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _describe(err: dict) -> str:
    loc = tuple(err["loc"])
    etype = err["type"]
    if etype == "extra_forbidden":
        parent, key = loc[:-1], loc[-1]
        allowed = _allowed_keys(parent)
        guess = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        did_you_mean = f" (did you mean {guess[0]!r}?)" if guess else ""
        where = _field_path(parent)
        dotted = f"{where + '.' if where else ''}{key}"
        if str(key).lower() in _SECRET_KEYS:
            # Configs are copied into checkpoints, ConfigMaps and logs: say why, not just "unknown".
            return (
                f"{dotted}: unknown key; secrets must not be written in the config (it is saved in checkpoints, "
                "ConfigMaps and logs): put an API key in an environment variable named by api_key_env, and on "
                "Kubernetes in the Secret named by cluster.api_key_secret"
            )
        return f"{dotted}: unknown key{did_you_mean}; allowed here: {', '.join(sorted(allowed))}"
    path = _field_path(loc)
    msg = err["msg"]
    if etype == "missing":
        return f"{path}: required field is missing"
    if etype == "value_error":
        msg = msg.removeprefix("Value error, ")
        return f"{path}: {msg}" if path else msg
    if etype == "union_tag_invalid":
        tags = err.get("ctx", {}).get("expected_tags", "")
        return f"{path}.type: {err['input'].get('type')!r} is not a known type; allowed: {tags}"
    if etype == "union_tag_not_found":
        return f"{path}: each entry needs a `type`"
    value = err.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    if etype in ("model_type", "model_attributes_type", "dict_type"):
        # pydantic says "a valid dictionary or instance of DatasetConfig": the class name means nothing here.
        return f"{path}: {shown}: expected a section (a mapping of settings, e.g. `{path.rsplit('.', 1)[-1]}: {{...}}`)"
    return f"{path}: {shown}: {msg}"


def _field_path(loc: tuple) -> str:
    """Dotted path for humans: drops pydantic's union tags (``rewards.0.accuracy.weight`` -> ``rewards.0.weight``)."""
    parts: list[str] = []
    model: Any = RunConfig
    for p in loc:
        if isinstance(p, int):
            parts.append(str(p))
            model = _list_item_type(model)
            continue
        fields = getattr(model, "model_fields", None) if isinstance(model, type) else None
        if fields is None and _union_members(model):
            members = {m.model_fields["type"].annotation.__args__[0]: m for m in _union_members(model)}
            if p in members:
                model = members[p]
                continue
        parts.append(str(p))
        model = _field_type(model, str(p))
    return ".".join(parts)


def _allowed_keys(parent: tuple) -> list[str]:
    model: Any = RunConfig
    for p in parent:
        if isinstance(p, int):
            model = _list_item_type(model)
            continue
        members = _union_members(model)
        if members:
            by_tag = {m.model_fields["type"].annotation.__args__[0]: m for m in members}
            if p in by_tag:
                model = by_tag[p]
                continue
        model = _field_type(model, str(p))
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _strip(tp: Any) -> Any:
    """Unwrap Optional / Annotated to the model type when there is exactly one."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _strip(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _strip(args[0])
    return tp


def _field_type(model: Any, name: str) -> Any:
    if isinstance(model, type) and issubclass(model, BaseModel) and name in model.model_fields:
        return _strip(model.model_fields[name].annotation)
    return None


def _list_item_type(tp: Any) -> Any:
    tp = _strip(tp)
    if typing.get_origin(tp) is list:
        return _strip(typing.get_args(tp)[0])
    return None


def _union_members(tp: Any) -> list[type[BaseModel]]:
    tp = _strip(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if isinstance(a, type) and issubclass(a, BaseModel)]
    return []
