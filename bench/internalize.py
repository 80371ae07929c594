"""Internalisation data: what an adapter is trained on, built from a conversation and nothing else.

`text` is the experiment's recipe: next-token loss on the conversation text. `qa` aligns the objective
with how the adapter is used: questions about the conversation asked and answered in the chat format
the benchmark asks in, with the loss on the answers only. The questions come from deterministic
templates over the turns (who said what, and when), never from LoCoMo's `qa` annotations, evidence,
observations or summaries: every function here takes `training_source(sample)`, which has none of them.

    When did Caroline say "I went to a LGBTQ support group yesterday and it was so powerful"?  -> 8 May 2023
    Who said "I went to a LGBTQ support group yesterday and it was so powerful"?               -> Caroline
    What did Caroline say on 8 May 2023?                                                        -> I went to ...
    What did Melanie share a photo of on 8 May 2023?                                            -> a photo of ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.locomo_data import (
    LocomoDataError,
    Sample,
    conversation_text,
    parse_session_datetime,
    photo_note,
    training_source,
)
from lora_core.train import IGNORE_INDEX, make_lm_windows
from model.tokenizer import Tokenizer

TRAIN_FORMATS = ("text", "qa", "text+qa")
SNIPPET_WORDS = 12  # a quote long enough to identify a turn, short enough to be a question
ANSWER_WORDS = 40  # long turns are cut: answers are meant to be short


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str


def _words(text: str, n: int) -> str:
    words = text.split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")


def _date(date_time: str | None) -> str | None:
    if not date_time:
        return None
    try:
        dt = parse_session_datetime(date_time)
    except LocomoDataError:
        return None
    return f"{dt.day} {dt.strftime('%B')} {dt.year}"  # LoCoMo's gold answers read like "7 May 2023"


def template_qa(sample: Sample) -> list[QAPair]:
    """Who said what, and when, for every turn of the conversation (session dates where known)."""
    source = training_source(sample)  # the conversation only: no qa, observations or summaries
    pairs: list[QAPair] = []
    for session in source.sessions:
        date = _date(session.date_time)
        for turn in session.turns:
            text = " ".join(turn.text.split())
            if len(text.split()) >= 4:
                quote = _words(text, SNIPPET_WORDS)
                pairs.append(QAPair(f'Who said "{quote}"?', turn.speaker))
                if date:
                    pairs.append(QAPair(f'When did {turn.speaker} say "{quote}"?', date))
                    pairs.append(QAPair(f"What did {turn.speaker} say on {date}?", _words(text, ANSWER_WORDS)))
            if turn.blip_caption and date:
                shared = photo_note(turn.blip_caption)[len("[shares "):-1]
                pairs.append(QAPair(f"What did {turn.speaker} share a photo of on {date}?", shared))
    return pairs


def chat_qa_windows(pairs: list[QAPair], tok: Tokenizer, seq_len: int, question_template: str):
    """Pack QA exchanges into multi-turn chats of at most seq_len tokens: the system prompt once per
    window, then user/assistant turns; targets only on the assistant's answer tokens and its end marker."""
    if not pairs:
        raise ValueError("no question-answer pairs to train on")
    system = tok.default_system_prompt
    head = tok.encode(tok.format_chat([{"role": "system", "content": system}], add_generation_prompt=False)
                      if system is not None else "")  # the system turn, as at question time
    windows: list[tuple[list[int], list[int]]] = []
    ids, labels = list(head), [IGNORE_INDEX] * len(head)
    for pair in pairs:
        user = tok.encode(f"<|im_start|>user\n{question_template.format(question=pair.question)}<|im_end|>\n"
                          "<|im_start|>assistant\n")
        answer = tok.encode(f"{pair.answer}<|im_end|>")
        newline = tok.encode("\n")
        if len(head) + len(user) + len(answer) + len(newline) > seq_len:
            continue  # a pair too long for any window
        if len(ids) + len(user) + len(answer) + len(newline) > seq_len:
            windows.append((ids, labels))
            ids, labels = list(head), [IGNORE_INDEX] * len(head)
        ids += user + answer + newline
        labels += [IGNORE_INDEX] * len(user) + answer + [IGNORE_INDEX] * len(newline)
    if len(ids) > len(head):
        windows.append((ids, labels))
    input_ids = torch.full((len(windows), seq_len), tok.pad_id, dtype=torch.long)
    targets = torch.full((len(windows), seq_len), IGNORE_INDEX, dtype=torch.long)
    for i, (w_ids, w_labels) in enumerate(windows):
        input_ids[i, :len(w_ids)] = torch.tensor(w_ids)
        # position t predicts token t+1: shift the labels left by one
        targets[i, :len(w_ids) - 1] = torch.tensor(w_labels[1:])
    return input_ids, targets


def training_data(sample: Sample, tok: Tokenizer, train_format: str, seq_len: int, timestamps: bool,
                  question_template: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, targets) windows of one conversation for `train_format` in TRAIN_FORMATS."""
    if train_format not in TRAIN_FORMATS:
        raise ValueError(f"unknown train format {train_format!r} (choose from {', '.join(TRAIN_FORMATS)})")
    source = training_source(sample)
    parts = []
    if train_format in ("text", "text+qa"):
        text = conversation_text(source, timestamps=timestamps)
        parts.append(make_lm_windows(tok.encode(text), seq_len, tok.pad_id))
    if train_format in ("qa", "text+qa"):
        parts.append(chat_qa_windows(template_qa(source), tok, seq_len, question_template))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
