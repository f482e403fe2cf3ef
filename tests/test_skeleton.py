"""minicai.training's one training skeleton (issue #15) on a toy regression: an interrupted run resumed by
resume_state + train_loop logs and ends exactly as the uninterrupted one; a resume on other data is refused."""
import json

import pytest
import torch

from minicai import training


def run(tmp, stop_at=None, resume=False):
    tmp.mkdir(exist_ok=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = training.make_optimizer(model, 0.1)
    guard = training.DivergenceGuard(str(tmp / "state"), None, 0)
    log = str(tmp / "log.jsonl")
    start = training.resume_state(str(tmp / "state"), model, opt, guard, [log], {"n": 8})[0] if resume else 0

    def step_fn(step, lr):  # a fresh random batch each step: the RNG state must resume too
        if step == stop_at:
            raise KeyboardInterrupt
        x = torch.randn(8, 3)
        loss = ((model(x).squeeze(1) - x.sum(1)) ** 2).mean()
        loss.backward()
        return {"step": step + 1, "loss": loss.item(), "lr": lr,
                "grad_norm": training.clip_and_step(opt, step, loss.detach(), 1.0, guard)}, None

    training.train_loop(step_fn, model, opt, guard, start=start, end=6, log_path=log, save_every=2, extra={"n": 8},
                        schedule=dict(lr=0.1, warmup=1, total=6, min_ratio=0.1), quiet=True)
    return [json.loads(line) for line in open(log)], model.weight.detach().clone()


def test_interrupted_run_resumes_exactly_and_refuses_other_data(tmp_path):
    full, w_full = run(tmp_path / "a")
    assert [r["step"] for r in full] == [1, 2, 3, 4, 5, 6] and full[-1]["loss"] < full[0]["loss"]
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop_at=3)                                   # dies in step 4; state of step 2 kept
    assert json.loads((tmp_path / "b" / "state" / "state.json").read_text())["step"] == 2
    resumed, w_resumed = run(tmp_path / "b", resume=True)
    assert resumed == full and torch.equal(w_resumed, w_full)
    model = torch.nn.Linear(3, 1)
    opt = training.make_optimizer(model, 0.1)
    guard = training.DivergenceGuard(str(tmp_path / "b" / "state"), None, 0)
    with pytest.raises(ValueError, match="the saved run had n=8, the data now gives n=9: --resume needs the same data"):
        training.resume_state(str(tmp_path / "b" / "state"), model, opt, guard, same={"n": 9})
