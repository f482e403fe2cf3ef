"""The whole pipeline on a tiny random model: end to end, skip-on-rerun, resume after a killed stage, config."""
import json
import os

import pytest

from train import pipeline


def run_tiny(model_dir, out, *extra):
    return pipeline.main(["--preset", "tiny", "--model", model_dir, "--out", str(out), "--device", "cpu", *extra])


def test_config_overrides_and_validation(tmp_path):
    cfg, _ = pipeline.resolve_config(["--preset", "tiny", "--sft-steps", "5", "--pref-sources", "revision,ai"])
    assert cfg.sft_steps == 5 and cfg.pref_sources == "revision,ai"
    assert cfg.cr_prompts == pipeline.PRESETS["tiny"]["cr_prompts"]      # preset value kept
    assert pipeline.resolve_config([])[0].sft_steps == pipeline.PipelineConfig().sft_steps  # cpu-demo = defaults
    for bad in (["--no-such-field", "1"], ["--sft-steps", "many"], ["--cr-mode", "magic"], ["--preset", "huge"]):
        with pytest.raises(SystemExit):
            pipeline.resolve_config(bad)
    with pytest.raises(ValueError, match="sft_steps"):
        pipeline.resolve_config(["--sft-steps", "0"])
    with pytest.raises(ValueError, match="pref_sources"):
        pipeline.resolve_config(["--pref-sources", "ai,magic"])
    with pytest.raises(ValueError, match="ppo_lr"):
        pipeline.resolve_config(["--ppo-lr", "-1"])
    with pytest.raises(ValueError, match="red_team_prompts"):
        pipeline.resolve_config(["--red-team-prompts", str(tmp_path / "missing.jsonl")])
    with pytest.raises(ValueError, match="rl_methods"):
        pipeline.resolve_config(["--rl-methods", "dpo,sft"])
    helps = pipeline.field_help()
    assert all(f in helps for f in pipeline.PipelineConfig.__dataclass_fields__), "every field needs a comment"


@pytest.mark.parametrize("preset", sorted(pipeline.PRESETS))
def test_stages_take_disjoint_prompts_covering_every_lookalike_type(tmp_path, preset):
    """Stage 01 (SL-CAI), stage 02 (base answers for the SFT mix) and stage 04 (pairs) never share a benign
    prompt, and the few look-alikes a small preset takes span XSTest's types (the file is sorted by type). (The
    red-team prompts are shared on purpose: the revision pairs are made from stage 01's rows.)"""
    cfg, _ = pipeline.resolve_config(["--preset", preset])
    text = lambda r: r.get("prompt") or json.dumps(r["messages"])
    read = lambda path: [text(r) for r in map(json.loads, open(path)) if r["kind"] == "benign"]
    sl = read(pipeline.sl_cai_prompts(cfg, str(tmp_path / "sl.jsonl")))
    pairs = read(pipeline.label_prompts(cfg, str(tmp_path / "pairs.jsonl")))
    mix = [text(r) for r in pipeline.sft_mix_rows(cfg)]
    assert not set(sl) & set(pairs) and not set(sl) & set(mix) and not set(pairs) & set(mix)
    lookalikes = {r["prompt"]: r["type"] for r in map(json.loads, open(cfg.lookalike_prompts))}
    for taken in (sl, pairs, mix):
        types = [lookalikes[p] for p in taken if p in lookalikes]
        assert len(set(types)) == min(len(types), len(set(lookalikes.values())))


@pytest.mark.slow
def test_pipeline_end_to_end_skip_and_resume(tiny_chat_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    # Kill stage 1 partway: generation fails on its third batch.
    import train.critique_revise as cr

    real_generate, calls = cr.generate, {"n": 0}

    def flaky_generate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real_generate(*a, **k)

    monkeypatch.setattr(cr, "generate", flaky_generate)
    with pytest.raises(KeyboardInterrupt):
        run_tiny(tiny_chat_model_dir, out)
    assert not os.path.exists(out / "01_critique_revise" / "DONE.json")
    monkeypatch.setattr(cr, "generate", real_generate)

    report = run_tiny(tiny_chat_model_dir, out)
    rows = [json.loads(line) for line in open(out / "01_critique_revise" / "revisions.jsonl")]
    ids = [r["id"] for r in rows]
    tiny = pipeline.PRESETS["tiny"]
    assert len(ids) == len(set(ids)) == tiny["cr_prompts"] + tiny["cr_benign"]  # nothing lost, nothing duplicated
    assert {r["kind"] for r in rows} == {"harmful", "benign"}  # both kinds through SL-CAI
    text = open(report).read()
    assert "Training data: modes, gates, sources" in text and "| distill | benign |" in text

    text = open(report).read()
    for label in ("base", "SL-CAI", "RL-CAI (PPO)", "RL-CAI (DPO)"):
        assert label in text
    for stage, png in (("03_sft", "model/loss.png"), ("05_reward_model", "model/loss.png"), ("06_ppo", "curves.png"),
                       ("08_dpo", "curves.png")):  # every trainer's plot, where its stage says it is
        assert f"![{stage}]({stage}/{png})" in text and os.path.exists(out / stage / png)
    numbers = json.load(open(out / "report.json"))
    metrics = numbers["evaluations"]["09_eval"]
    assert len(metrics) == 4 and all(any(k.startswith("harmful_compliance/") for k in m)
                                     for m in metrics.values())  # model -> metric
    assert set(numbers["timings_s"]) >= {"01_critique_revise", "03_sft", "04_labels", "05_reward_model", "06_ppo",
                                         "08_dpo", "09_eval"}

    # A rerun skips every finished stage: no stage script runs again.
    for module in ("critique_revise", "sft", "label_preferences", "reward_model", "ppo", "dpo"):
        for fn in ("main", "run"):
            monkeypatch.setattr(f"train.{module}.{fn}", lambda *a, **k: pytest.fail("a finished stage ran again"))
    monkeypatch.setattr("minicai.evaluate.evaluate", lambda *a, **k: pytest.fail("evaluation ran again"))
    run_tiny(tiny_chat_model_dir, out)

    # Changing a setting that finished stages depend on is refused.
    with pytest.raises(ValueError, match="other settings"):
        run_tiny(tiny_chat_model_dir, out, "--sft-steps", "3")
