"""``launcher``: the command line of userloop.

Local commands (``validate``, ``data``, ``run``, ``eval``, ``tiny-model``, ``plots``) live here. Nothing heavy is imported at start-up: torch,
transformers and litellm are loaded only inside the commands that train, and ``run`` starts the
trainer as its own process (``python -m trainer``), exactly as the pod does.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from trainer.errors import EXIT_USAGE, UserError, report

app = typer.Typer(
    name="launcher",
    help="Train LLM agents with RL against simulated users: locally (`run`) or on Kubernetes (`submit`).",
    no_args_is_help=True,
    # The environment holds API keys: never print local variables in tracebacks.
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

ConfigArg = Annotated[Path, typer.Argument(help="Run config (YAML).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a config value: dotted.key=value (value parsed as YAML). Repeatable."
    ),
]
OutputOpt = Annotated[str, typer.Option("--output", "-o", help="Output format: text or json.")]


def _load(config: Path, overrides: list[str] | None, check_files: bool = True):
    from trainer.config import check_paths, load_config

    cfg = load_config(config, overrides)
    if check_files:
        check_paths(cfg)
    return cfg


def _fail(err: BaseException) -> typer.Exit:
    return typer.Exit(report(err))


@app.command()
def validate(config: ConfigArg, set: SetOpt = None, output: OutputOpt = "text") -> None:
    """Check a config (schema, cross-field rules, input paths) without running anything; warn about unset
    API key variables (`launcher run` needs them, `launcher submit` does not)."""
    from trainer.config import check_paths, memory

    warnings: list[str] = []
    try:
        cfg = _load(config, set, check_files=False)
        warnings = _api_key_warnings(cfg)
        if output != "json":
            for line in warnings:
                print(f"warning: {line}", file=sys.stderr)
        check_paths(cfg, api_keys=False)
        plan = memory.check(cfg)  # the cluster plan's per-GPU memory; refuses one that cannot fit
    except UserError as e:
        if output == "json":
            print(json.dumps({"status": "error", "message": e.render(), "warnings": warnings}))
            raise typer.Exit(e.exit_code) from None
        raise _fail(e) from None
    if output == "json":
        print(json.dumps({"status": "success", "warnings": warnings, "memory": plan,
                          "config": cfg.model_dump(mode="json")}))  # fmt: skip
    else:
        print(f"{config}: ok ({cfg.algorithm.name}, model {cfg.model.path}, output {cfg.output_dir})")
        for line in plan:
            print(line, file=sys.stderr if line.startswith("warning: ") else sys.stdout)


def _api_key_warnings(cfg) -> list[str]:
    """One line per API section whose key variable is unset here: only a local run needs it."""
    from trainer.config.api_keys import unset_api_keys

    secret = cfg.cluster.api_key_secret
    pod = (
        f"the pod reads it from the Secret {secret.name}"
        if secret
        else "the pod reads it from the Secret that cluster.api_key_secret names, which is unset"
    )
    lines = []
    for field in unset_api_keys(cfg):
        name = getattr(cfg, field.split(".")[0]).api_key_env
        lines.append(
            f"{field}: environment variable {name} is not set: `launcher run` needs it (export {name}=...); "
            f"`launcher submit` does not ({pod})"
        )
    return lines


@app.command()
def data(
    config: ConfigArg,
    set: SetOpt = None,
    output: OutputOpt = "text",
    split: Annotated[str, typer.Option(help="train or val.")] = "train",
) -> None:
    """Load a dataset as the trainer would and show rows, mapped columns and one example."""
    from trainer import api

    try:
        if split not in ("train", "val"):
            raise UserError("--split", f"{split!r}: expected train or val")
        cfg = _load(config, set, check_files=False)
        result = api.inspect_data(cfg, split=split)
    except UserError as e:
        _json_or_raise(e, output)
    if output == "json":
        print(json.dumps(result.to_dict(), ensure_ascii=False))
        return
    print(f"{result.path} ({result.format}): {result.rows} rows")
    for ours, theirs in result.columns.items():
        print(f"  {ours:<9} <- {theirs}")
    print("example:")
    print(json.dumps(result.example, ensure_ascii=False, indent=2))


@app.command()
def run(
    config: ConfigArg,
    set: SetOpt = None,
    nproc: Annotated[int, typer.Option(help="Local processes (gloo on CPU, NCCL on GPUs), as in a pod.")] = 1,
) -> None:
    """Train locally: validates the config, then runs `python -m trainer` (with torchrun when --nproc > 1).

    With `rollout.sglang.launch` or `rollout.vllm.launch: true` that server is started first, as the pod's
    sidecar would be, and stopped when training ends. Ctrl-C checkpoints and exits 130 (twice: stops at
    once); the same command resumes."""
    from trainer import run_lock

    try:
        cfg = _load(config, set)
        # Another run writing into output_dir: say so now, not after the trainer's start-up (the trainer
        # takes the lock itself; this only reads it).
        run_lock.check_free(cfg.output_dir)
    except UserError as e:
        raise _fail(e) from None
    if nproc < 1:
        raise _fail(UserError("--nproc", f"{nproc}: must be 1 or more"))
    args = ["--config", str(config)]
    for item in set or []:
        args += ["--set", item]
    if nproc == 1:
        cmd = [sys.executable, "-m", "trainer", *args]
    else:  # torchrun, with the trainer's exit code and without its traceback after a Ctrl-C (trainer.torchrun)
        cmd = [sys.executable, "-m", "trainer.torchrun", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "trainer", *args]  # fmt: skip
    # The command the trainer names in output_dir's lock and in "run the same command again" after Ctrl-C.
    typed = ["launcher", "run", str(config), *args[2:], *(["--nproc", str(nproc)] if nproc > 1 else [])]
    env = dict(os.environ, PYTHONUNBUFFERED="1", USERLOOP_COMMAND=shlex.join(typed))
    # torchrun's wait for its workers after it forwards a signal (30 s by default, then SIGKILL): the grace the
    # config gives a stop checkpoint.
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(cfg.checkpoint.grace_s)))
    with _Signals() as signals:
        section = cfg.rollout.server()
        if section is None or not section.launch:
            raise typer.Exit(signals.run(cmd, env))
        from launcher.local_server import local_server

        try:
            server = local_server(cfg, Path(cfg.output_dir) / f"{cfg.rollout.engine}.log")
            assert server is not None
            if server.trainer_gpus is not None and nproc > len(server.trainer_gpus):
                raise UserError("--nproc", f"{nproc} trainer processes but {len(server.trainer_gpus)} GPU(s) are "
                                f"left for the trainer ({','.join(server.trainer_gpus)}; the {server.NAME} server has "
                                f"{','.join(server.server_gpus or [])})", hint="lower --nproc or "
                                "cluster.rollout_gpus_per_node")  # fmt: skip
            gpus = f", GPUs {','.join(server.server_gpus)}" if server.server_gpus else ""
            print(f"starting the {server.NAME} server: {' '.join(server.command())} (log {server.log_path}{gpus})",
                  flush=True)  # fmt: skip
            with server:
                print(f"{server.NAME} server ready at {server.url}", flush=True)
                env = server.trainer_env(env)
                env[server.URL_ENV] = server.url
                code = signals.run(cmd, env)
        except UserError as e:
            raise _fail(e) from None
        except _Interrupted as e:  # before the trainer started: the server is stopped on the way out
            code = 128 + e.signum
    raise typer.Exit(code)


class _Interrupted(BaseException):
    """SIGINT/SIGTERM reached the launcher before the trainer started (raised to unwind and stop the server)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Signals:
    """SIGINT and SIGTERM while ``launcher run``/``eval`` runs. While the trainer runs they are forwarded to it
    (it is in a session of its own, so a terminal's Ctrl-C reaches it once, through here; torchrun passes each
    on to its workers once): it finishes or abandons its step, checkpoints and exits 143 after SIGTERM, 130
    after Ctrl-C (a second Ctrl-C stops it at once), and the launcher waits for it, then stops the server.
    Before the trainer starts they raise ``_Interrupted`` (the server is stopped while unwinding); once it
    has ended, or while unwinding, they are ignored so that nothing interrupts stopping the server."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.unwinding = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signum)
            return
        if not self.unwinding:
            self.unwinding = True
            raise _Interrupted(signum)

    def run(self, cmd: list[str], env: dict[str, str]) -> int:
        """Run the trainer to its end; its exit code (128 + N when a signal N ended it)."""
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        code = self.proc.wait()
        return 128 - code if code < 0 else code


@app.command("eval")
def eval_(
    config: ConfigArg,
    checkpoint: Annotated[str, typer.Option(help="A checkpoint's step_N directory (or its policy/).")],
    set: SetOpt = None,
    max_samples: Annotated[int | None, typer.Option(help="Evaluate on at most N validation rows.")] = None,
) -> None:
    """Accuracy and mean reward of a checkpoint on the validation set, printed as one JSON object."""
    from trainer import api

    try:
        cfg = _load(config, set, check_files=False)
        section = cfg.rollout.server()
        if section is not None and section.launch:
            result = _evaluate_with_local_server(cfg, checkpoint, max_samples)
        else:
            result = api.evaluate(cfg, checkpoint=checkpoint, max_samples=max_samples)
    except UserError as e:
        print(json.dumps({"status": "error", "message": e.render()}))
        raise typer.Exit(e.exit_code) from None
    except Exception as e:  # a result object is promised even when something unexpected breaks
        print(json.dumps({"status": "error", "message": f"{type(e).__name__}: {e}"}))
        raise typer.Exit(1) from None
    print(json.dumps(result.to_dict()))


def _evaluate_with_local_server(cfg, checkpoint: str, max_samples: int | None):
    """``launcher eval`` with ``rollout.<engine>.launch``: a server of its own, as ``run`` starts (stdout stays JSON)."""
    from launcher.local_server import local_server
    from trainer import api

    engine = cfg.rollout.engine
    server = local_server(cfg, Path(cfg.output_dir) / f"{engine}-eval.log")
    assert server is not None
    print(f"starting the {server.NAME} server (log {server.log_path})", file=sys.stderr, flush=True)
    if server.trainer_gpus is not None:  # set before torch initialises CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(server.trainer_gpus)
    # SIGTERM unwinds like Ctrl-C, so the server is stopped rather than left holding its GPU.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with server:
            section = getattr(cfg.rollout, engine).model_copy(update={"url": server.url})
            cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={engine: section})})
            return api.evaluate(cfg, checkpoint=checkpoint, max_samples=max_samples)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, _frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: nothing interrupts stopping the server
    raise KeyboardInterrupt


@app.command("tiny-model")
def tiny_model(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the model and tokenizer to.")],
    force: Annotated[bool, typer.Option(help="Overwrite an existing directory.")] = False,
    seed: int = 0,
) -> None:
    """Build a tiny random-initialised Qwen3-architecture model and a tokenizer trained on the fly."""
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise _fail(
            UserError(str(out_dir), "directory exists and is not empty", hint="pass --force to overwrite")
        )
    from trainer.tiny import build_tiny_model

    if force and out_dir.exists():
        shutil.rmtree(out_dir)
    info = build_tiny_model(out_dir, seed=seed)
    print(f"wrote {out_dir}: {info['parameters']:,} parameters, vocabulary {info['vocab_size']}")


@app.command()
def plots(run_dir: Annotated[Path, typer.Argument(help="A run's output_dir.")]) -> None:
    """(Re)draw plots/*.png from a run's logs/metrics.jsonl."""
    from trainer.metrics import write_plots

    metrics = run_dir / "logs" / "metrics.jsonl"
    if not metrics.is_file():
        raise _fail(UserError(str(metrics), "file not found", hint="pass a run's output_dir"))
    for path in write_plots(metrics, run_dir / "plots"):
        print(path)


def _json_or_raise(e: UserError, output: str) -> None:
    if output == "json":
        print(json.dumps({"status": "error", "message": e.render()}))
        raise typer.Exit(e.exit_code)
    raise _fail(e)


from launcher.cluster_cli import register as _register_cluster  # noqa: E402

_register_cluster(app)


def main() -> None:
    try:
        app()
    except UserError as e:  # raised outside a command's own handling
        sys.exit(report(e))
    except KeyboardInterrupt:
        sys.exit(130)


__all__ = ["app", "main", "EXIT_USAGE"]
