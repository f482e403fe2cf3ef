"""A model as judge: multiple-choice questions scored by the probabilities of the answer tokens.

Constitutional AI's feedback model (Bai et al., 2022, sec. 4.1) is asked which of two responses better follows
a principle, as a multiple-choice question; the normalised probabilities of the option letters are soft
preference labels. We never parse free text: after the chat template's generation prompt we append the
answer prefix "The answer is (" and read the next-token log-probs of "A", "B", ... renormalised over the
options. Pairwise questions are asked in both orders and averaged to cancel position bias. The evaluation
suite and the AI-feedback stage both call this module.

compare_calibrated adds contextual calibration (Zhao et al. 2021, "Calibrate Before Use", eq. 1 with a
diagonal W = diag(p_cf)^-1, b = 0): per principle, the judge's letter distribution p_cf on a content-free
pair (conversation and both responses "N/A") is its prior over positions; each real distribution p is
replaced by (p / p_cf) / sum(p / p_cf). The content-free question reads the same in both orders, so one
prior per principle serves both; it is applied to the letters, so in the swapped order response a's
probability is divided by the prior of "B". The calibrated probabilities are averaged over both orders and
over an ensemble of principles. judge_report measures agreement with hand labels, with a Wilson interval,
so a judge that does not beat chance can be shown as such. reference_loglik scores hand-written reference
answers by their mean per-token log-likelihood: a capability measure that needs neither generation nor judge.
"""
import torch

from minicai.metrics import rate
from minicai.model import pad_batch

ANSWER_PREFIX = "The answer is ("
LETTERS = "ABCDEFGH"


def _option_token_ids(tokenizer, n_options):
    ids = []
    for letter in LETTERS[:n_options]:
        tok = tokenizer.encode(letter)
        if len(tok) != 1:
            raise ValueError(f"option letter {letter!r} is {len(tok)} tokens in this tokenizer; expected 1")
        ids.append(tok[0])
    return ids


@torch.inference_mode()
def choice_logprobs(model, tokenizer, conversations, n_options=2, answer_prefix=ANSWER_PREFIX, batch_size=8,
                    cot_texts=None) -> torch.Tensor:
    """Log-probs [N, n_options] of the option letters, renormalised over the options.

    conversations: N chat message lists whose last user turn asks the question. cot_texts: optional N strings
    that the assistant "said" before the answer prefix (chain-of-thought); they are encoded as plain text."""
    if not conversations:
        raise ValueError("choice_logprobs: no conversations")
    option_ids = torch.tensor(_option_token_ids(tokenizer, n_options))
    seqs = []
    for i, conv in enumerate(conversations):
        cot = (cot_texts[i].strip() + "\n") if cot_texts is not None and cot_texts[i] else ""
        seqs.append(tokenizer.apply_chat_template(conv, add_generation_prompt=True) + tokenizer.encode(cot + answer_prefix))
    device = model.output_weight.device
    out = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids, mask = pad_batch(chunk, pad, "left", device)                                        # last column: the answer's
        hidden = model(ids, attention_mask=mask, return_hidden=True)[:, -1]                          # [b, H]
        logits = (hidden.float() @ model.output_weight.float().t())[:, option_ids.to(device)]      # [b, n_options]
        out.append(torch.log_softmax(logits, dim=-1).cpu())
    return torch.cat(out)


def pairwise_question(conversation, response_a, response_b, question) -> list:
    """The comparison as one user turn: the conversation, the principle's question and two options."""
    transcript = "\n".join(f"{m['role'].upper()}: {m['content']}" for m in conversation)
    text = (f"Consider this conversation between a human and an AI assistant:\n\n{transcript}\n\n{question}\n\n"
            f"Options:\n(A) {response_a}\n\n(B) {response_b}\n\nAnswer with the letter of your choice.")
    return [{"role": "user", "content": text}]


def compare_pairs(model, tokenizer, conversations, responses_a, responses_b, questions, batch_size=8):
    """P(response_a is better) for each pair, averaged over both option orders.

    Returns (p_a [N], p_a_when_first [N], p_a_when_second [N]); the last two show the position bias."""
    n = len(conversations)
    if not (n == len(responses_a) == len(responses_b) == len(questions)):
        raise ValueError("compare_pairs: conversations, responses and questions differ in length")
    first = [pairwise_question(c, a, b, q) for c, a, b, q in zip(conversations, responses_a, responses_b, questions)]
    second = [pairwise_question(c, b, a, q) for c, a, b, q in zip(conversations, responses_a, responses_b, questions)]
    lp = choice_logprobs(model, tokenizer, first + second, n_options=2, batch_size=batch_size).exp()
    p_first, p_second = lp[:n, 0], lp[n:, 1]
    return (p_first + p_second) / 2, p_first, p_second


CONTENT_FREE = "N/A"


def _check_pairs(name, conversations, *lists):
    if not conversations:
        raise ValueError(f"{name}: no pairs")
    if any(len(x) != len(conversations) for x in lists):
        raise ValueError(f"{name}: {len(conversations)} conversations but lists of lengths {[len(x) for x in lists]}")


def _agree(p, q):
    """Fraction of pairs whose two per-order probabilities P(a better) pick the same winner (0.5 = no pick)."""
    return float(((p > 0.5) & (q > 0.5) | (p < 0.5) & (q < 0.5)).float().mean())


def compare_calibrated(model, tokenizer, conversations, responses_a, responses_b, principles, batch_size=8) -> dict:
    """P(response_a better) per pair: both option orders, contextual calibration, ensemble over `principles`.

    principles: comparison questions, all asked of every pair. Returns p_a [N] (calibrated, both orders and
    all principles averaged), p_first_order / p_swapped_order [N] (raw P(a better) with a listed first /
    second, principle-averaged), p_first_calibrated / p_swapped_calibrated [N], order_consistency (calibrated
    per-order probabilities pick the same winner), order_consistency_raw, prior [P, 2] (P("A"), P("B"))."""
    _check_pairs("compare_calibrated", conversations, responses_a, responses_b)
    if not principles or not all(isinstance(q, str) and q.strip() for q in principles):
        raise ValueError("compare_calibrated: principles must be a non-empty list of non-empty questions")
    n, P = len(conversations), len(principles)
    free = [{"role": "user", "content": CONTENT_FREE}]
    qs = [pairwise_question(free, CONTENT_FREE, CONTENT_FREE, q) for q in principles]
    for q in principles:
        qs += [pairwise_question(c, a, b, q) for c, a, b in zip(conversations, responses_a, responses_b)]
        qs += [pairwise_question(c, b, a, q) for c, a, b in zip(conversations, responses_a, responses_b)]
    probs = choice_logprobs(model, tokenizer, qs, n_options=2, batch_size=batch_size).double().exp()
    prior, pairs = probs[:P], probs[P:].view(P, 2, n, 2)                 # [P, 2]; [principle, order, pair, letter]
    cal = pairs / prior[:, None, None, :]
    cal = cal / cal.sum(-1, keepdim=True)
    raw_first, raw_swap = pairs[:, 0, :, 0].mean(0), pairs[:, 1, :, 1].mean(0)   # a is "A" first, then "B"
    cal_first, cal_swap = cal[:, 0, :, 0].mean(0), cal[:, 1, :, 1].mean(0)
    f = lambda t: t.float()
    return dict(p_a=f((cal_first + cal_swap) / 2), p_first_order=f(raw_first), p_swapped_order=f(raw_swap),
                p_first_calibrated=f(cal_first), p_swapped_calibrated=f(cal_swap),
                order_consistency=_agree(cal_first, cal_swap), order_consistency_raw=_agree(raw_first, raw_swap),
                prior=f(prior))


def _row_principles(row, principles, where):
    if principles is None:
        return (row["principle"],)
    if isinstance(principles, dict):
        if row.get("kind") not in principles:
            raise ValueError(f"{where}: kind {row.get('kind')!r} has no principles (have {sorted(principles)})")
        return tuple(principles[row["kind"]])
    return tuple(principles)


def _verdict(p_pref, consistency) -> dict:
    k, n = int((p_pref > 0.5).sum()), len(p_pref)
    agreement = rate(k, n)
    return dict(agreement=agreement, beats_chance=agreement["lo"] > 0.5, order_consistency=consistency,
                mean_p_preferred=float(p_pref.mean()))


def judge_report(model, tokenizer, labelled_rows, principles=None, batch_size=8) -> dict:
    """Agreement of the judge with hand labels (p > 0.5 on the preferred response), with its 95% Wilson
    interval and beats_chance (interval's lower bound > 0.5), for three judges on the same questions:
    `calibrated` (compare_calibrated), `raw_both_orders` (uncalibrated, orders averaged) and
    `raw_first_order` (uncalibrated, one order: what calibration and the swap bought).

    labelled_rows: dicts with messages (or prompt), response_a, response_b, preferred ("a"/"b"), principle;
    `where` (file:line, as load_labelled_pairs sets it) names a bad row. principles: None = each row's own
    principle; a list = asked of every row; a dict = principles[row["kind"]]. Rows sharing a principle set
    are judged together. Also returns n, p_preferred (calibrated, per row) and the mean position prior."""
    if not labelled_rows:
        raise ValueError("judge_report: no labelled rows")
    groups = {}
    for i, r in enumerate(labelled_rows):
        where = r.get("where", f"labelled_rows[{i}]")
        for key in ("response_a", "response_b", "preferred") + (("principle",) if principles is None else ()):
            if key not in r:
                raise ValueError(f"{where}: missing field {key!r}")
        if r["preferred"] not in ("a", "b"):
            raise ValueError(f"{where}: 'preferred' must be 'a' or 'b', got {r['preferred']!r}")
        if "messages" not in r and "prompt" not in r:
            raise ValueError(f"{where}: missing field 'prompt' (or 'messages')")
        groups.setdefault(_row_principles(r, principles, where), []).append(i)
    n = len(labelled_rows)
    cols = {k: torch.zeros(n) for k in ("p_a", "p_first_order", "p_swapped_order", "p_first_calibrated",
                                        "p_swapped_calibrated")}
    priors = []
    for qs, idx in groups.items():
        rows = [labelled_rows[i] for i in idx]
        convs = [r.get("messages") or [{"role": "user", "content": r["prompt"]}] for r in rows]
        out = compare_calibrated(model, tokenizer, convs, [r["response_a"] for r in rows],
                                 [r["response_b"] for r in rows], list(qs), batch_size=batch_size)
        for k in cols:
            cols[k][idx] = out[k]
        priors.append(out["prior"])
    flip = torch.tensor([r["preferred"] == "b" for r in labelled_rows])
    pref = {k: torch.where(flip, 1 - v, v) for k, v in cols.items()}
    raw_both = (pref["p_first_order"] + pref["p_swapped_order"]) / 2
    return dict(n=n, calibrated=_verdict(pref["p_a"], _agree(cols["p_first_calibrated"], cols["p_swapped_calibrated"])),
                raw_both_orders=_verdict(raw_both, _agree(cols["p_first_order"], cols["p_swapped_order"])),
                raw_first_order=_verdict(pref["p_first_order"], None),
                p_preferred=pref["p_a"].tolist(), prior_a=float(torch.cat(priors)[:, 0].mean()))


def load_labelled_pairs(path) -> list:
    """Hand-labelled judge pairs from JSONL, each with `where` = "file:line"; bad rows raise naming it."""
    from minicai.io import read_jsonl_lines

    rows = []
    for lineno, row in read_jsonl_lines(path):
        where = f"{path}:{lineno}"
        for key in ("prompt", "response_a", "response_b", "principle", "preferred"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{where}: field {key!r} missing or not a non-empty string")
        if row["preferred"] not in ("a", "b"):
            raise ValueError(f"{where}: 'preferred' must be 'a' or 'b', got {row['preferred']!r}")
        rows.append(dict(row, where=where))
    if not rows:
        raise ValueError(f"{path}: no labelled pairs")
    return rows


@torch.inference_mode()
def reference_loglik(model, tokenizer, conversations, references, batch_size=8) -> list:
    """Mean per-token log-likelihood (fp32) of each reference answer, plus the end-of-turn token, as the
    assistant's reply to its chat-templated conversation. The reference is encoded as plain text (a
    "<|im_end|>" inside it stays text). Higher = the model finds the good answer more likely."""
    from minicai.rl import collate, sequence_logprobs

    _check_pairs("reference_loglik", conversations, references)
    eot = tokenizer.eos_token_id
    if eot is None:
        raise ValueError("reference_loglik: the tokenizer has no eos_token (the end-of-turn token)")
    for i, ref in enumerate(references):
        if not isinstance(ref, str) or not ref.strip():
            raise ValueError(f"reference_loglik: references[{i}] must be a non-empty string")
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    targets = [tokenizer.encode(r.strip()) + [eot] for r in references]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # batches of similar prompt and answer lengths: collate pads both sides to the batch's longest
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(targets[i]))
    out = [0.0] * len(prompts)
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        batch = collate([prompts[i] for i in rows], [targets[i] for i in rows], pad, device=model.output_weight.device)
        for i, ll in zip(rows, sequence_logprobs(model, batch, average=True)[0].float().cpu().tolist()):
            out[i] = ll
    return out
