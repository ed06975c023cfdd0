"""Synthetic retrieval tasks: passkey, multi-key and multi-hop samples in a haystack of ordinary
text (docs/specification.md §7.2-7.4), and two of RULER's (Hsieh et al., 2024): multi-query NIAH and
variable tracking; aligned to the model's chunk size, every answer token scored.

Layout of a sample of T tokens, c = model.chunk_len:
    haystack ... needle(s) ... haystack ... question | answer | tail
The question ends at index 0 of the answer chunk and the A answer tokens fill its indices
1 .. A (A <= c - 1). So the landmark that closes the chunk before (it has read the question)
performs the retrieval serving the whole answer chunk: every answer token, the first included, is
predicted with question-driven retrieval. The reference aligned to a fixed 64 and scored one
token (§8 items 20-21); here the alignment follows c and the whole answer must match.
That layout is question offset 1: the prompt (everything before the answer) ends 1 token after a
chunk boundary. make(..., question_offset=o) ends it o tokens after one (answer_start % c == o,
0 <= o < c), as a user's prompt ends anywhere; the answer may then run into the next chunk.
Needles, question and answer overwrite haystack tokens (the length stays T); the tail after the
answer (< c tokens) is the haystack's own text, so a training sample needs no loss mask.

Values are strings of random digits, one token per digit, spliced as the same ids into needle,
question and answer: a model that copies the needle answers exactly, whatever the tokenizer.

The RULER tasks, as here:
  multiquery  RULER's niah_multiquery: 4 key-value needles, all 4 keys asked in one question (in
              an order independent of the text's), answer "v1, v2, v3, v4".
  vartrack    RULER's variable tracking: a chain "VAR A = 12345", "VAR B = VAR A", ... of 4 hops
              (5 names of 5 capital letters, one token each), asked "which variables equal
              12345?", answer the 5 names in chain order, space-separated. Here a second chain
              with another value is also hidden (RULER's default has one), so the question's
              value matters; and a chain's assignments sit at independent random places (each is
              an equation, which a retriever reads alone), where RULER keeps them in order.
"""

import dataclasses

import numpy as np

from drt_jax.data import DataError
from drt_jax.data.tokenizer import Tokenizer

TASKS = ("passkey", "multikey", "multihop", "multiquery", "vartrack")
_NOISE_KEYS = 5  # multikey: key-value needles besides the one asked for (the reference's 5)
_QUERIES = 4  # multiquery: needles, all asked (RULER's num_needle_k = num_needle_q = 4)
_HOPS = 4  # vartrack: assignments after the value's in each chain (RULER's num_hops)
_NAME_LETTERS = 5  # vartrack: letters of a variable name (RULER's)


@dataclasses.dataclass(frozen=True)
class Sample:
  """One task sample: haystack with needles, question and answer, as token ids."""
  tokens: np.ndarray  # int32 [T]
  answer_start: int  # index of the first answer token; answer_start % chunk_len: the offset
  answer: np.ndarray  # int32 [A]
  needle_start: int  # index of the first token of the needle holding (the start of) the answer
  depth: float  # the depth asked for: 0 = haystack start, 1 = just before the question
  evidence: np.ndarray  # int [E]: indices of the needle tokens holding the answer's values

  @property
  def prompt(self) -> np.ndarray:
    """What a model reads before answering: tokens[:answer_start]."""
    return self.tokens[:self.answer_start]


def exact_match(sample: Sample, predicted) -> bool:
  """True when predicted starts with the whole answer (every answer token scored)."""
  predicted = np.asarray(predicted).reshape(-1)
  return len(predicted) >= len(sample.answer) and bool(
      np.array_equal(predicted[:len(sample.answer)], sample.answer))


class TaskBuilder:
  """Builds task samples for one tokenizer and chunk size; pickles as token arrays (grain)."""

  def __init__(self, tokenizer: Tokenizer, chunk_len: int, *, digits: int = 5):
    self.chunk_len = chunk_len
    self.digits = digits
    digit_ids = [tokenizer.encode(str(d)) for d in range(10)]
    if any(len(ids) != 1 for ids in digit_ids):
      raise DataError("tokenizer: tasks need every digit 0-9 to encode as one token")
    self._digit_ids = np.array([ids[0] for ids in digit_ids], np.int32)
    letter_ids = [tokenizer.encode(chr(c)) for c in range(ord("A"), ord("Z") + 1)]
    # None: vartrack cannot be built (check() says so); the other tasks can.
    self._letter_ids = (np.array([ids[0] for ids in letter_ids], np.int32)
                        if all(len(ids) == 1 for ids in letter_ids) else None)
    self._text = {name: tokenizer.encode(text).astype(np.int32) for name, text in {
        "passkey": "|The passkey is ", "passkey_q": "|What is the passkey? The passkey is ",
        "key": "|One of the special magic numbers for ", "is": " is ",
        "key_q": "|The value of ", "hop": "|DEF ", "arrow": " -> ",
        "hop_q": "|The path from ", "comma": ", ", "end": "|",
        "keys_q": "|The values of ", "are": " are ", "var": "|VAR ", "equals": " = ",
        "var_ref": " = VAR ", "var_q": "|Which variables equal ",
        "var_a": "? They are: ", "space": " "}.items()}

  def check(self, task: str, length: int):
    """Raises DataError unless `task` samples of `length` tokens can be built."""
    if task not in TASKS:
      raise DataError(f"task {task!r}: must be one of {', '.join(TASKS)}")
    if task == "vartrack" and self._letter_ids is None:
      raise DataError("task 'vartrack': needs every capital letter A-Z to encode as one token "
                      "with this tokenizer")
    answer = self.answer_len(task)
    if answer > self.chunk_len - 1:
      raise DataError(f"task {task!r}: its answer of {answer} tokens does not fit after the "
                      f"question in one chunk of model.chunk_len={self.chunk_len} (needs <= "
                      f"{self.chunk_len - 1}); use a longer chunk"
                      + ("" if task == "vartrack" else " or fewer digits"))
    if length < self.min_length(task):
      raise DataError(f"samples of {length} tokens are too short for task {task!r} (needs >= "
                      f"{self.min_length(task)})")

  def answer_len(self, task: str) -> int:
    comma = len(self._text["comma"])
    if task == "multihop":
      return 2 * self.digits + comma
    if task == "multiquery":
      return _QUERIES * self.digits + (_QUERIES - 1) * comma
    if task == "vartrack":
      return (_HOPS + 1) * _NAME_LETTERS + _HOPS * len(self._text["space"])
    return self.digits

  def min_length(self, task: str) -> int:
    """The shortest sample (in tokens) `task` fits in: needles, question, an aligned answer."""
    needles, question, _, _ = self._pieces(task, np.random.default_rng(0))
    return sum(len(n) for n in needles) + len(question) + self.chunk_len + self.answer_len(task)

  def make(self, task: str, haystack, rng: np.random.Generator, depth: float,
           question_offset: int = 1) -> Sample:
    """A sample of len(haystack) tokens; the needle answering the question sits at `depth`
    (0 = start, 1 = just before the question) and any others at random free places. The
    question ends question_offset tokens after a chunk boundary (0 .. chunk_len - 1; 1 is the
    aligned layout above), as late as the answer fits; the other choices do not depend on it."""
    tokens = np.array(haystack, np.int32)
    self.check(task, len(tokens))
    c = self.chunk_len
    if not (isinstance(question_offset, (int, np.integer)) and 0 <= question_offset < c):
      raise DataError(f"question_offset={question_offset!r}: must be an integer in 0 .. "
                      f"{c - 1} (model.chunk_len={c})")
    length = len(tokens)
    needles, question, answer, values = self._pieces(task, rng)
    # The last start <= length - A that is question_offset after a chunk boundary.
    answer_start = (length - len(answer) - question_offset) // c * c + question_offset
    question_start = answer_start - len(question)
    starts = self._place([len(n) for n in needles], question_start, depth, rng)
    for start, needle in zip(starts, needles):
      tokens[start:start + len(needle)] = needle
    tokens[question_start:answer_start] = question
    tokens[answer_start:answer_start + len(answer)] = answer
    evidence = np.concatenate([starts[i] + np.arange(offset, offset + self._value_len(task))
                               for i, offset in values])
    return Sample(tokens=tokens, answer_start=answer_start, answer=answer,
                  needle_start=int(starts[0]), depth=float(depth), evidence=evidence)

  def _value(self, rng):
    return self._digit_ids[rng.integers(0, 10, self.digits)]

  def _names(self, rng, count):
    """`count` distinct variable names, int32 [count, _NAME_LETTERS] of capital letters."""
    names = []
    while len(names) < count:
      name = rng.integers(0, 26, _NAME_LETTERS)
      if not any(np.array_equal(name, other) for other in names):
        names.append(name)
    return self._letter_ids[np.stack(names)]

  def _pieces(self, task, rng):
    """(needles, the answering one first; question; answer; values) as int32 token arrays, with
    values = [(needle index, offset)] of the answer's values inside the needles."""
    t, cat = self._text, np.concatenate
    if task == "passkey":
      value = self._value(rng)
      return ([cat([t["passkey"], value, t["end"]])], t["passkey_q"], value,
              [(0, len(t["passkey"]))])
    if task == "multikey":
      pairs = [(self._value(rng), self._value(rng)) for _ in range(_NOISE_KEYS + 1)]
      needles = [cat([t["key"], k, t["is"], v, t["end"]]) for k, v in pairs]
      key, value = pairs[0]
      return (needles, cat([t["key_q"], key, t["is"]]), value,
              [(0, len(t["key"]) + self.digits + len(t["is"]))])
    if task == "multiquery":
      pairs = []
      while len(pairs) < _QUERIES:  # distinct keys: each question has one answer
        key = self._value(rng)
        if not any(np.array_equal(key, k) for k, _ in pairs):
          pairs.append((key, self._value(rng)))
      needles = [cat([t["key"], k, t["is"], v, t["end"]]) for k, v in pairs]
      keys = cat([x for k, _ in pairs for x in (t["comma"], k)][1:])
      answer = cat([x for _, v in pairs for x in (t["comma"], v)][1:])
      offset = len(t["key"]) + self.digits + len(t["is"])
      return (needles, cat([t["keys_q"], keys, t["are"]]), answer,
              [(i, offset) for i in range(_QUERIES)])
    if task == "vartrack":
      # Chain 0 is asked, chain 1 hides another value; needle i of a chain assigns name i.
      names = self._names(rng, 2 * (_HOPS + 1)).reshape(2, _HOPS + 1, _NAME_LETTERS)
      values = [self._value(rng), self._value(rng)]
      while np.array_equal(values[0], values[1]):
        values[1] = self._value(rng)
      needles = [cat([t["var"], chain[0], t["equals"], value, t["end"]])
                 if i == 0 else cat([t["var"], chain[i], t["var_ref"], chain[i - 1], t["end"]])
                 for chain, value in zip(names, values) for i in range(_HOPS + 1)]
      answer = cat([x for name in names[0] for x in (t["space"], name)][1:])
      return (needles, cat([t["var_q"], values[0], t["var_a"]]), answer,
              [(i, len(t["var"])) for i in range(_HOPS + 1)])
    # multihop: chains a -> b -> c (asked) and a' -> b' -> c' (noise), one needle per hop.
    a, b, c, a2, b2, c2 = (self._value(rng) for _ in range(6))
    needles = [cat([t["hop"], x, t["arrow"], y, t["end"]])
               for x, y in ((a, b), (b, c), (a2, b2), (b2, c2))]
    hop_value = len(t["hop"]) + self.digits + len(t["arrow"])
    return (needles, cat([t["hop_q"], a, t["is"]]), cat([b, t["comma"], c]),
            [(0, hop_value), (1, hop_value)])

  def _value_len(self, task: str) -> int:
    """Tokens of one value of the answer (a variable name for vartrack, else digits)."""
    return _NAME_LETTERS if task == "vartrack" else self.digits

  def _place(self, lengths, room: int, depth: float, rng) -> list[int]:
    """Non-overlapping starts in [0, room) for needles of `lengths`: the first at `depth`, the
    others at uniformly random places (always succeeds when they fit).

    The others are laid out first on the line of room - lengths[0] tokens, in random order with
    uniform gaps; the first goes in at depth * (that line), moved to the nearest needle edge
    if that point falls inside one, and pushes the needles after it along.
    """
    first, others = lengths[0], np.asarray(lengths[1:], np.int64)
    line = room - first
    order = rng.permutation(len(others))
    cuts = np.sort(rng.integers(0, line - others.sum() + 1, len(others)))
    starts = np.empty(len(others), np.int64)
    starts[order] = cuts + np.cumsum(others[order]) - others[order]
    at = int(round(depth * line))
    inside = (starts < at) & (at < starts + others)
    if inside.any():
      j = int(np.flatnonzero(inside)[0])
      at = int(starts[j] if at - starts[j] <= starts[j] + others[j] - at else starts[j] + others[j])
    return [at] + [int(x + first if x >= at else x) for x in starts]


class TaskMixture:
  """Turns a fraction of training windows into task samples (data.task_fraction, data.tasks).

  Sample i's choice and content come from np.random.default_rng([seed, i, 1]), so the mixture is
  as reproducible as the windows. Answer tokens weigh answer_weight in the loss, the rest 1.
  """

  def __init__(self, builder: TaskBuilder, tasks: tuple[str, ...], fraction: float, seed: int,
               seq_len: int, *, answer_weight: float = 1.0):
    for task in tasks:
      builder.check(task, seq_len)  # here, not in a grain worker
    self.builder = builder
    self.tasks = tasks
    self.fraction = fraction
    self.seed = seed
    self.answer_weight = answer_weight

  def __call__(self, window: np.ndarray, i: int) -> dict[str, np.ndarray]:
    """Global sample i's window int32 [T] -> {"inputs": the window itself or a task sample of it,
    "target_weights": float32 [T]}."""
    rng = np.random.default_rng([self.seed, i, 1])
    weights = np.ones(len(window), np.float32)
    if rng.random() >= self.fraction:
      return {"inputs": window, "target_weights": weights}
    task = self.tasks[rng.integers(len(self.tasks))]
    sample = self.builder.make(task, window, rng, depth=rng.random())
    weights[sample.answer_start:sample.answer_start + len(sample.answer)] = self.answer_weight
    return {"inputs": sample.tokens, "target_weights": weights}
