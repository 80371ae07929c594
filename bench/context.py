"""Context baselines: what mainstream memory does instead of LoRA, to place LoRA memory against it.

    icl: as much of the conversation as fits the model's context, most recent sessions kept, with dates
    rag: the top-k turns (or sessions) for each question by BM25, in conversation order, with dates
    fact-rag: the top-k of the conversation's parser-built question-answer pairs (`facts`) by BM25: mem0's design,
        extracted facts in an external store, with the extractor the adapters train on

Both read the conversation only (`conversation_only`: no QA annotations, observations or summaries), with
dates: ICL context has each session's date in its header, and a retrieved turn carries its own
("On 8 May 2023, Caroline said: ...").
The context goes into the user turn ahead of the same question instruction the no-context methods
use, so every method is asked the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.locomo_data import FORMATS, Sample, session_texts
from lora_mem.deps import require
from lora_mem.lora_core.conversation import conversation_only
from lora_mem.lora_core.facts import fact_queries
from lora_mem.model.tokenizer import Tokenizer

CONTEXT_TEMPLATE = "Here is a conversation between {a} and {b}, with the date of each message:\n\n{context}\n\n"
RAG_TEMPLATE = "Here are messages from a conversation between {a} and {b}, with their dates:\n\n{context}\n\n"
FACT_TEMPLATE = "Here are facts from a conversation between {a} and {b}, as questions and answers:\n\n{context}\n\n"
RAG_UNITS = ("turn", "session", "fact")


def context_prompt(template: str, sample: Sample, context: str, question_text: str) -> str:
    return template.format(a=sample.speaker_a, b=sample.speaker_b, context=context) + question_text


# ---------------------------------------------------------------------------------------------
# In-context learning: the most recent part of the conversation that fits
# ---------------------------------------------------------------------------------------------

@dataclass
class ICLContext:
    text: str
    tokens: int  # of `text` alone
    sessions_kept: int  # whole sessions (the oldest kept one may be cut at a turn boundary)
    sessions_total: int
    turns_kept: int
    turns_total: int


def icl_context(sample: Sample, tok: Tokenizer, budget_tokens: int) -> ICLContext:
    """The latest turns of the conversation that fit `budget_tokens`, whole sessions first, then the
    most recent turns of the session before (with its date header), in conversation order."""
    if budget_tokens < 1:
        raise ValueError(f"context budget must be at least 1 token, got {budget_tokens}")
    source = conversation_only(sample)
    # Session headers carry the date ("Session 3 — 1:56 pm on 8 May, 2023"); turns stay "Speaker: text",
    # which fits about a third more of the conversation than dating every turn.
    header, line = FORMATS["timestamped"][0], FORMATS["raw"][1]
    kept_sessions: list[str] = []  # newest first
    used, turns_kept, partial = 0, 0, False
    n_turns = sum(len(s.turns) for s in source.sessions)
    for session in reversed(source.sessions):
        h = header(source, session)
        text = "\n".join(([h] if h else []) + [line(source, session, t) for t in session.turns])
        cost = len(tok.encode(text + "\n\n"))
        if used + cost <= budget_tokens:
            kept_sessions.append(text)
            used += cost
            turns_kept += len(session.turns)
            continue
        # Cut this session at a turn boundary: its header and its most recent turns that still fit.
        lines = []
        budget_left = budget_tokens - used - len(tok.encode((h or "") + "\n\n"))
        for turn in reversed(session.turns):
            t = line(source, session, turn)
            c = len(tok.encode(t + "\n"))
            if c > budget_left:
                break
            lines.insert(0, t)
            budget_left -= c
        if lines:
            kept_sessions.append("\n".join(([h] if h else []) + lines))
            turns_kept += len(lines)
            partial = True
        break
    text = "\n\n".join(reversed(kept_sessions))
    return ICLContext(text=text, tokens=len(tok.encode(text)), sessions_kept=len(kept_sessions) - int(partial),
                      sessions_total=len(source.sessions), turns_kept=turns_kept, turns_total=n_turns)


# ---------------------------------------------------------------------------------------------
# Retrieval: BM25 over turns or sessions
# ---------------------------------------------------------------------------------------------

class BM25Retriever:
    """BM25 (bm25s, Porter-stemmed, English stop words) over one conversation's turns or sessions."""

    def __init__(self, sample: Sample, unit: str = "turn"):
        if unit not in RAG_UNITS:
            raise ValueError(f"unknown retrieval unit {unit!r} (choose from {', '.join(RAG_UNITS)})")
        require("bm25s", extra="rag", needed_for="retrieval (BM25)")
        import bm25s
        from nltk.stem import PorterStemmer

        self._bm25s = bm25s
        stemmer = PorterStemmer()
        self._stem = lambda words: [stemmer.stem(w) for w in words]
        source = conversation_only(sample)
        if unit == "session":
            self.docs = session_texts(source, timestamps=True)
        elif unit == "fact":
            self.docs = [f"{q.question} {q.answer}" for q in fact_queries(source)]
        else:
            _, line = FORMATS["timestamped"]
            self.docs = [line(source, s, t) for s in source.sessions for t in s.turns]
        if not self.docs:
            raise ValueError(f"sample {sample.sample_id!r} has no {unit}s to retrieve from")
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize(self.docs, stopwords="en", stemmer=self._stem, show_progress=False),
                         show_progress=False)

    def retrieve(self, questions: list[str], k: int) -> list[list[int]]:
        """Indices of the top-k documents of each question, in conversation order (not score order:
        a reader follows a story forwards)."""
        if k < 1:
            raise ValueError(f"top-k must be at least 1, got {k}")
        k = min(k, len(self.docs))
        queries = self._bm25s.tokenize(questions, stopwords="en", stemmer=self._stem, return_ids=False,
                                       show_progress=False)
        docs, _scores = self.index.retrieve(queries, k=k, show_progress=False, n_threads=1)
        return [sorted(int(i) for i in row) for row in docs]


def cut_to_fit(docs: list[str], tok: Tokenizer, budget: int) -> tuple[list[str], int]:
    """The documents, joined by newlines, within ``budget`` tokens: when they are longer together, every document is
    cut to its first ``cap`` tokens, the largest cap that fits, so that short ones stay whole and only the longest
    lose their ends. Returns the documents and how many of their tokens were cut."""
    ids = [tok.encode(d) for d in docs]
    room = budget - len(tok.encode("\n".join(docs)))
    cap, cut = max(map(len, ids), default=0), 0
    while room < 0:  # tokens may merge differently where a cut document meets the next: measure, and cut again
        total = sum(min(len(i), cap) for i in ids) + room
        lo, hi = 0, cap  # the largest cap whose documents total at most `total` tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if sum(min(len(i), mid) for i in ids) <= total else (lo, mid - 1)
        cap = lo
        cut = sum(max(len(i) - cap, 0) for i in ids)
        if cap == 0:  # not even the joining newlines fit
            return [], cut
        docs = [tok.decode(i[:cap]) if len(i) > cap else d for d, i in zip(docs, ids)]
        room = budget - len(tok.encode("\n".join(docs)))
    return docs, cut
