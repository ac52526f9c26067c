"""The bad-input corpus: broken configs, datasets, models and command lines, each with the exact line it
must print.

Every case goes through the real CLI (``launcher validate`` / ``data`` / ``run``) and must: exit 2, print
its ``Error:`` line exactly, print no traceback, and leave a run's existing ``output_dir`` (a checkpoint
and ``metrics.jsonl`` from an earlier run) byte-identical. Paths in the expected lines are written as
``<dir>`` (the test's directory), ``<cfg>`` (the config file) and ``<model>`` (the model directory).

Most cases fail in the config loader and cost milliseconds; the three ``run`` cases start
``python -m trainer`` (a few seconds each) because only the trainer loads the tokenizer.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from launcher.cli import app

runner = CliRunner()
MARKER = "sk-MARKER-0123456789abcdef"  # an API key that must never be echoed back
GOOD_LINES = [json.dumps({"prompt": f"q{i}", "answer": "a"}) + "\n" for i in range(8)]
GOOD_ROWS = "".join(GOOD_LINES)


@dataclass(frozen=True)
class Case:
    id: str
    expected: str  # the exact stderr line
    command: str = "validate"
    sets: tuple[str, ...] = ()
    text: str | bytes | None = None  # replaces the good config file
    files: dict[str, str | bytes] = field(default_factory=dict)  # written into <dir> first
    args: tuple[str, ...] = ()  # extra CLI arguments


def _data(name: str, content: str | bytes, *more: str) -> dict:
    return {"sets": (f"data.train.path=<dir>/{name}", *more), "files": {name: content}}


CASES = [
    # ---- YAML and file level
    Case("yaml-unclosed-bracket",
         "Error: <cfg>: invalid YAML: line 4, column 1: expected ',' or ']', but got '<stream end>' "
         "(while parsing a flow sequence that starts on line 3, column 9)",
         text="name: t\nmodel:\n  path: [unclosed\n"),
    Case("yaml-tab-indent",
         "Error: <cfg>: invalid YAML: line 2, column 1: found character '\\t' that cannot start any token",
         text="name: t\n\tmodel: x\n"),
    Case("yaml-bad-indent",
         "Error: <cfg>: invalid YAML: line 4, column 10: mapping values are not allowed here",
         text="name: t\nmodel:\n  path: m\n  lora: r: 8\n"),
    Case("empty-file", "Error: <cfg>: the file is empty", text=""),
    Case("only-comments", "Error: <cfg>: the file is empty", text="# nothing here yet\n"),
    Case("top-level-list", "Error: <cfg>: expected a mapping of settings at the top level, got list",
         text="- name: t\n- model: m\n"),
    Case("top-level-scalar", "Error: <cfg>: expected a mapping of settings at the top level, got str",
         text="quickstart\n"),
    Case("not-utf8", "Error: <cfg>: not UTF-8 text: byte 0xff on line 2", text=b"name: t\nmodel: \xff\xfe\n"),
    Case("config-not-found", "Error: <dir>/missing.yaml: file not found", args=("<dir>/missing.yaml",)),
    # ---- keys and types
    Case("unknown-key-did-you-mean",
         "Error: <cfg>: model.lora.alpah: unknown key (did you mean 'alpha'?); "
         "allowed here: alpha, dropout, enabled, r, target_modules",
         sets=("model.lora.alpah=8",)),
    Case("unknown-key-in-dataset",
         "Error: <cfg>: data.train.formt: unknown key (did you mean 'format'?); "
         "allowed here: fields, format, path, skip_bad_lines",
         sets=("data.train.formt=jsonl",)),
    Case("missing-required-field", "Error: <cfg>: model: required field is missing",
         text="name: t\nalgorithm: {name: sft}\ndata: {train: {path: x.jsonl}}\n"),
    Case("wrong-type-number", "Error: <cfg>: algorithm.lr: 'fast': Input should be a valid number, "
         "unable to parse string as a number", sets=("algorithm.lr=fast",)),
    Case("wrong-type-fraction", "Error: <cfg>: algorithm.batch_size: 2.5: Input should be a valid integer, "
         "got a number with a fractional part", sets=("algorithm.batch_size=2.5",)),
    Case("wrong-type-section",
         "Error: <cfg>: data.train: 'x.jsonl': expected a section (a mapping of settings, e.g. `train: {...}`)",
         sets=("data.train=x.jsonl",)),
    # ---- out of range
    # PyYAML (YAML 1.1) reads 1e-3 as a string, which pydantic converts: the value is shown as written.
    Case("negative-lr", "Error: <cfg>: algorithm.lr: '-1e-3': Input should be greater than 0",
         sets=("algorithm.lr=-1e-3",)),
    Case("group-size-0", "Error: <cfg>: algorithm.group_size: 0: Input should be greater than or equal to 1",
         sets=("algorithm.group_size=0",)),
    Case("lora-r-0", "Error: <cfg>: model.lora.r: 0: Input should be greater than or equal to 1",
         sets=("model.lora.r=0",)),
    Case("negative-temperature",
         "Error: <cfg>: rollout.temperature: -0.5: Input should be greater than or equal to 0",
         sets=("rollout.temperature=-0.5",)),
    Case("top-p-0", "Error: <cfg>: rollout.top_p: 0: Input should be greater than 0", sets=("rollout.top_p=0",)),
    # ---- unknown names
    Case("unknown-algorithm", "Error: <cfg>: algorithm.name: 'dpo': Input should be 'sft', 'grpo' or 'ppo'",
         sets=("algorithm.name=dpo",)),
    Case("unknown-reward",
         "Error: <cfg>: rewards.0.type: 'magic' is not a known type; allowed: "
         "'accuracy', 'length_penalty', 'step', 'format', 'python', 'llm_judge'",
         sets=("rewards.0.type=magic",)),
    Case("unknown-template-field",
         "Error: <cfg>: output_dir: '<dir>/{nam}': unknown template field 'nam'; only {name} is allowed",
         sets=("output_dir=<dir>/{nam}",)),
    Case("ppo-setting-under-grpo", "Error: <cfg>: algorithm: algorithm.critic_lr is a PPO setting but algorithm.name "
         "is grpo: remove it, or set algorithm.name: ppo", sets=("algorithm.critic_lr=1e-5",)),
    Case("turn-credit-single-turn", "Error: <cfg>: algorithm.advantage is turn but environment.name is single_turn: "
         "a single-turn episode has one turn, where turn-level credit equals the episode's; use a multi-turn "
         "environment or advantage: episode", sets=("algorithm.advantage=turn",)),
    Case("unset-environment-variable", "Error: <cfg>: model.path: environment variable USERLOOP_TEST_UNSET is "
         "not set", text="name: t\nmodel: {path: '${USERLOOP_TEST_UNSET}'}\n"),
    # ---- input files that are not there
    Case("model-path-missing", "Error: config: model.path: '<dir>/no-model': directory not found",
         sets=("model.path=<dir>/no-model",)),
    Case("critic-path-missing", "Error: config: algorithm.critic_path: '<dir>/no-critic': not a model directory "
         "(no config.json)", sets=("algorithm.name=ppo", "algorithm.critic_path=<dir>/no-critic")),
    Case("data-path-missing", "Error: config: data.train.path: '<dir>/no.jsonl': file not found",
         sets=("data.train.path=<dir>/no.jsonl",)),
    # ---- Kubernetes
    Case("k8s-bad-namespace",
         "Error: <cfg>: cluster.namespace: 'Team_A' is not a valid Kubernetes namespace: use at most 63 lowercase "
         "letters, digits and '-', starting and ending with a letter or digit",
         sets=("cluster.namespace=Team_A",)),
    Case("k8s-name-uppercase", "Error: <cfg>: name: 'MyRun': String should match pattern "
         "'^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'", sets=("name=MyRun",)),
    Case("k8s-name-too-long", f"Error: <cfg>: name: '{'a' * 41}': String should have at most 40 characters",
         sets=(f"name={'a' * 41}",)),
    Case("k8s-name-leading-digit", "Error: <cfg>: name: '7b-run' must start with a letter (it names Kubernetes "
         "Services)", sets=("name=7b-run",)),
    Case("gpu-split-does-not-fit",
         "Error: <cfg>: cluster: rollout_gpus_per_node (2) leaves no GPU for the trainer out of gpus_per_node (2): "
         "lower cluster.rollout_gpus_per_node or raise cluster.gpus_per_node",
         sets=("cluster.gpus_per_node=2", "cluster.rollout_gpus_per_node=2")),
    Case("sidecar-without-gpus",
         "Error: <cfg>: cluster: rollout_gpus_per_node is 1 but gpus_per_node is 0: the SGLang sidecar needs GPUs; "
         "set cluster.gpus_per_node or cluster.rollout_gpus_per_node: 0",
         sets=("cluster.gpus_per_node=0", "cluster.rollout_gpus_per_node=1")),
    Case("multi-node-without-rwx",
         "Error: <cfg>: cluster.pvc.access_mode: ReadWriteOnce cannot be mounted by the 2 pods of cluster.nodes on "
         "different nodes: use a ReadWriteMany claim (see k8s/pvc-rwx.yaml) or cluster.nodes: 1",
         sets=("cluster.nodes=2", "cluster.pvc.access_mode=ReadWriteOnce")),
    Case("unpinned-image",
         "Error: <cfg>: cluster.image: 'ghcr.io/me/trainer:latest' is not pinned: add a released tag "
         "(repo/image:1.2.3) or a digest (@sha256:...)", sets=("cluster.image=ghcr.io/me/trainer:latest",)),
    Case("k8s-version-read-as-float",
         "Error: <cfg>: cluster.k8s_version: 1.3 is ambiguous (YAML turned 1.30 into 1.3): quote it, e.g. '1.30'",
         sets=("cluster.k8s_version=1.30",)),
    # ---- API keys written inline (the value must never be echoed)
    Case("inline-key-in-cluster",
         "Error: <cfg>: cluster.api_key: unknown key; secrets must not be written in the config (it is saved in "
         "checkpoints, ConfigMaps and logs): put an API key in an environment variable named by api_key_env, and "
         "on Kubernetes in the Secret named by cluster.api_key_secret",
         sets=(f"cluster.api_key={MARKER}",)),
    Case("inline-key-in-user-simulator",
         "Error: <cfg>: user_simulator: api_key: API keys must not be written in the config (it is saved in "
         "checkpoints and logs); put the key in an environment variable and set api_key_env to its name, e.g. "
         "api_key_env: DASHSCOPE_API_KEY",
         sets=(f"user_simulator={{backend: api, model: qwen-plus, api_key: {MARKER}}}",)),
    # ---- --set
    Case("set-without-equals", "Error: <cfg>: --set 'algorithm.lr': expected dotted.key=value",
         sets=("algorithm.lr",)),
    Case("set-empty-key-part",
         "Error: <cfg>: --set 'algorithm..lr=1': 'algorithm..lr' has an empty part; expected dotted.key=value",
         sets=("algorithm..lr=1",)),
    Case("set-into-a-value", "Error: <cfg>: --set name.first: name is a value ('t'), not a section with keys",
         sets=("name.first=x",)),
    Case("set-list-index-out-of-range", "Error: <cfg>: --set rewards.3.weight: '3' is not an index of a list of 1",
         sets=("rewards.3.weight=2",)),
    # ---- datasets (launcher data loads them as the trainer does)
    Case("parquet-not-parquet",
         "Error: <dir>/train.parquet: not a readable Parquet file: Parquet magic bytes not found in footer. "
         "Either the file is corrupted or this is not a parquet file.",
         command="data", **_data("train.parquet", "prompt,answer\nq,a\n")),
    Case("jsonl-broken-line",
         "Error: <dir>/d.jsonl: line 3: invalid JSON: Expecting ',' delimiter (column 16)",
         command="data", **_data("d.jsonl", "".join(GOOD_LINES[:2]) + '{"prompt": "q" "answer": 1}\n')),
    Case("jsonl-torn-last-line", "Error: <dir>/d.jsonl: line 9: invalid JSON: Unterminated string starting at "
         "(column 12)", command="data", **_data("d.jsonl", GOOD_ROWS + '{"prompt": "q')),
    Case("jsonl-not-utf8", "Error: <dir>/d.jsonl: line 2: not UTF-8 text (byte 0xe9 at column 16)",
         command="data", **_data("d.jsonl", b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')),
    Case("jsonl-line-not-an-object", "Error: <dir>/d.jsonl: line 1: expected a JSON object, got list",
         command="data", **_data("d.jsonl", '["q", "a"]\n')),
    Case("empty-dataset", "Error: <dir>/d.jsonl: the dataset has no rows",
         command="data", **_data("d.jsonl", "\n\n")),
    Case("all-lines-broken-and-skipped", "Error: <dir>/d.jsonl: the dataset has no rows: all 2 lines are broken",
         command="data", **_data("d.jsonl", "{\n}\n", "data.train.skip_bad_lines=true")),
    Case("unknown-suffix", "Error: <dir>/d.csv: cannot infer the format from the suffix '.csv'",
         command="data", **_data("d.csv", "prompt\nq\n")),
    Case("mapped-column-missing",
         "Error: data: <dir>/d.jsonl: fields.prompt: column 'question' not found; columns: ['prompt', 'answer']",
         command="data", **_data("d.jsonl", GOOD_ROWS, "data.train.fields={prompt: question}")),
    Case("prompt-wrong-type",
         "Error: <dir>/d.jsonl: row 0: prompt must be a string or a list of {role, content} messages",
         command="data", **_data("d.jsonl", '{"prompt": 42}\n')),
    Case("data-bad-split", "Error: --split: 'test': expected train or val", command="data",
         args=("--split", "test")),
    Case("run-nproc-0", "Error: --nproc: 0: must be 1 or more", command="run", args=("--nproc", "0")),
    # ---- multi-turn settings
    Case("unknown-environment",
         "Error: <cfg>: environment.name: 'webshop': Input should be 'single_turn', 'intentiongym', 'quiz' or 'tau2'",
         sets=("environment.name=webshop",)),
    Case("max-turns-0", "Error: <cfg>: environment.max_turns: 0: Input should be greater than or equal to 1",
         sets=("environment.max_turns=0",)),
    Case("intentiongym-without-intentions",
         "Error: <cfg>: environment: environment.name is intentiongym but intentions is not set: give the "
         "intention JSON, e.g. intentions: data/intentiongym/all_intentions_train.json",
         sets=("environment.name=intentiongym",)),
]  # fmt: skip

# Cases only the trainer can detect (they need the tokenizer): `launcher run` starts `python -m trainer`.
TRAINER_CASES = [
    Case("tokenizer-without-chat-template", "Error: model.path: <model>: the tokenizer has no chat template",
         command="run", sets=("model.path=<model>", "data.use_chat_template=true")),
    Case("prompt-longer-than-max", "Error: data.train: row 0: prompt has <n> tokens, more than "
         "data.max_prompt_tokens=1", command="run", sets=("data.max_prompt_tokens=1",)),
    Case("batch-larger-than-dataset", "Error: algorithm.batch_size: 16 is larger than the training set (8 rows)",
         command="run", sets=("algorithm.batch_size=16",)),
]  # fmt: skip


@pytest.fixture
def workspace(tmp_path: Path, tiny_model: Path) -> dict[str, Path]:
    """A good config whose output_dir already holds an earlier run's checkpoint and metrics."""
    (tmp_path / "train.jsonl").write_text(GOOD_ROWS)
    out = tmp_path / "out"
    ckpt = out / "checkpoints" / "step_3"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text('{"files": {}}\n')
    (ckpt / "state.pt").write_bytes(bytes(range(256)) * 4)
    (out / "logs").mkdir()
    (out / "logs" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "reward": 0.1}) + "\n" for s in (1, 2, 3))
    )
    cfg = {
        "name": "t",
        "output_dir": str(out),
        "model": {"path": str(tiny_model)},
        "algorithm": {"name": "grpo", "batch_size": 2, "group_size": 2, "max_steps": 1},
        "data": {"train": {"path": str(tmp_path / "train.jsonl")}, "use_chat_template": False},
        "rewards": [{"type": "accuracy"}],
        "logging": {"plots": False},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return {"dir": tmp_path, "cfg": tmp_path / "config.yaml", "out": out, "model": tiny_model}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _fill(text: str, ws: dict[str, Path]) -> str:
    for key in ("dir", "cfg", "model"):
        text = text.replace(f"<{key}>", str(ws[key]))
    return text


def _invoke(case: Case, ws: dict[str, Path]) -> tuple[int, str, str]:
    for name, content in case.files.items():
        target = ws["dir"] / name
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    if case.text is not None:
        raw = case.text.encode() if isinstance(case.text, str) else case.text
        ws["cfg"].write_bytes(raw)
    args = [_fill(a, ws) for a in case.args]
    config = [] if any(a.endswith(".yaml") for a in args) else [str(ws["cfg"])]
    sets = [x for s in case.sets for x in ("--set", _fill(s, ws))]
    result = runner.invoke(app, [case.command, *config, *sets, *args])
    return result.exit_code, result.stdout, result.stderr


def _check(case: Case, code: int, out: str, err: str, expected: str, before: dict[str, bytes], ws) -> None:
    assert code == 2, f"exit {code}\n{out}\n{err}"
    assert expected in err.splitlines(), f"expected line:\n{expected}\nstderr:\n{err}"
    assert "Traceback" not in out + err
    assert MARKER not in out + err
    assert _snapshot(ws["out"]) == before, "output_dir changed"


def test_the_corpus_is_large_and_distinct() -> None:
    ids = [c.id for c in CASES + TRAINER_CASES]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_fails_with_its_message(case: Case, workspace: dict[str, Path]) -> None:
    before = _snapshot(workspace["out"])
    code, out, err = _invoke(case, workspace)
    _check(case, code, out, err, _fill(case.expected, workspace), before, workspace)


@pytest.fixture
def model_without_chat_template(tmp_path: Path, tiny_model: Path) -> Path:
    model = tmp_path / "no-template"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("case", TRAINER_CASES, ids=lambda c: c.id)
def test_bad_input_stops_the_trainer_before_any_work(
    case: Case, workspace: dict[str, Path], model_without_chat_template: Path, capfd: pytest.CaptureFixture
) -> None:
    from trainer.model import load_tokenizer
    from trainer.prompts import encode_prompt

    ws = {**workspace, "model": model_without_chat_template}
    # The trainer's own count of the first prompt's tokens, so the expected line stays exact.
    n = len(
        encode_prompt(load_tokenizer(str(workspace["model"])), [{"role": "user", "content": "q0"}], False)
    )
    before = _snapshot(ws["out"])
    capfd.readouterr()
    code, out, err = _invoke(case, ws)
    captured = capfd.readouterr()  # the trainer subprocess writes to the real file descriptors
    expected = _fill(case.expected, ws).replace("<n>", str(n))
    _check(case, code, out + captured.out, err + captured.err, expected, before, ws)


def test_skip_bad_lines_skips_and_counts(workspace: dict[str, Path]) -> None:
    data = workspace["dir"] / "d.jsonl"
    good = [line.encode() for line in GOOD_LINES]
    data.write_bytes(good[0] + b'{"prompt": \n' + good[1] + good[2] + b"\xff\n[1]\n")
    sets = [f"data.train.path={data}", "data.train.skip_bad_lines=true"]
    result = runner.invoke(app, ["data", str(workspace["cfg"]), *[x for s in sets for x in ("--set", s)]])
    assert result.exit_code == 0, result.stderr
    assert (
        f"warning: data.train: skipped 3 broken lines in {data} (first at line 2)"
        in result.stderr.splitlines()
    )
    assert result.stdout.startswith(f"{data} (jsonl): 3 rows\n")
