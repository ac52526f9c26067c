"""The Python API as the README shows it: ``api.train`` then ``api.evaluate`` in a notebook. User mistakes raise a
readable ``UserError`` (never a bare traceback of something else), the resolved config stays out of the cell's
output, and Ctrl-C (the notebook's interrupt) checkpoints and gives the notebook its handlers back."""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import pytest

from trainer import api, run_lock
from trainer.config import load_config
from trainer.errors import Interrupted, UserError, report


def test_a_user_error_reads_as_its_message_and_hint() -> None:
    err = UserError("algorithm.max_steps", "20 is below step 30", hint="raise algorithm.max_steps")
    assert str(err) == "algorithm.max_steps: 20 is below step 30\nHint: raise algorithm.max_steps"
    stream = io.StringIO()
    assert report(err, stream) == 2
    assert (
        stream.getvalue()
        == "Error: algorithm.max_steps: 20 is below step 30\nHint: raise algorithm.max_steps\n"
    )
    assert (
        str(UserError("data.val", "evaluation needs a validation set"))
        == "data.val: evaluation needs a validation set"
    )


def test_readme_order_train_then_fewer_steps_then_evaluate(make_config, capsys, monkeypatch) -> None:
    """README: ``api.train`` with ``max_steps=20`` after a 30-step run resumed it, said "done: 30 steps", and the
    ``step_20`` the snippet then evaluated did not exist (here: 3 steps, then 2)."""
    path = make_config(
        "api", checkpoint__save_every_steps=None, eval={}, logging={"every_steps": 1, "plots": False}
    )
    cfg = load_config(path, ["algorithm.max_steps=3"])
    out = Path(cfg.output_dir)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    result = api.train(cfg).to_dict()
    assert result["steps"] == 3 and result["last_checkpoint"] == str(out / "checkpoints" / "step_3")
    printed = capsys.readouterr().out
    assert "resolved config:" not in printed and "\nalgorithm:" not in printed, printed[:3000]
    assert f"resolved config in {out / 'config.yaml'} and {out / 'logs' / 'train.log'}" in printed
    assert "resolved config:\nname: api\n" in (out / "logs" / "train.log").read_text()

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr("trainer.session.load_policy", no_model)
    with pytest.raises(UserError) as e:
        api.train(load_config(path, ["algorithm.max_steps=2"]))
    assert e.value.source == "algorithm.max_steps"
    assert e.value.problems[0].startswith(f"2 is below step 3 of the checkpoint this run would resume "
                                          f"({out / 'checkpoints' / 'step_3'}, checkpoint.resume: auto)")  # fmt: skip
    assert str(e.value).splitlines()[1].startswith("Hint: raise algorithm.max_steps to continue that run, start a "
                                                   "new one in another output_dir")  # fmt: skip
    # However the call ended: output_dir released, the caller's signal handlers back.
    assert run_lock.held() == [] and (out / ".lock").read_text() == ""
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    monkeypatch.undo()

    # max_steps equal to the checkpoint's step: nothing to train, and step_<max_steps> is there to evaluate.
    assert api.train(load_config(path, ["algorithm.max_steps=3"])).to_dict()["steps"] == 3
    # Evaluation takes no lock: it works beside a run that holds output_dir.
    lock = run_lock.acquire(out, "another run")
    try:
        assert api.evaluate(cfg, out / "checkpoints" / "step_3", max_samples=4).to_dict()["samples"] == 4
    finally:
        lock.release()


def test_ctrl_c_in_a_notebook_checkpoints_and_raises_interrupted(make_config, monkeypatch, capfd) -> None:
    from trainer.session import Session

    path = make_config("api-int", algorithm__max_steps=50, checkpoint__save_every_steps=None, eval={},
                       logging={"every_steps": 1, "plots": False})  # fmt: skip
    cfg = load_config(path)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    end_step = Session.end_step

    def interrupt_at_step_2(self, metrics):
        if self.state.step == 1:  # the kernel's interrupt button: SIGINT to this process, during step 2
            os.kill(os.getpid(), signal.SIGINT)
        return end_step(self, metrics)

    monkeypatch.setattr(Session, "end_step", interrupt_at_step_2)
    with pytest.raises(Interrupted, match="interrupted at step 2; last checkpoint "):
        api.train(cfg)
    ckpt = Path(cfg.output_dir) / "checkpoints" / "step_2"
    assert (ckpt / "manifest.json").is_file()
    printed = capfd.readouterr().out.splitlines()  # the handler's line is a write(2) to fd 1
    said = "interrupted: finishing step 2/50, then checkpointing it; press Ctrl-C again to stop at once"
    where = f"interrupted at step 2/50: checkpoint {ckpt}; to resume from it, call api.train with the same config again"
    assert said in printed and where in printed, printed
    assert run_lock.held() == []
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
