"""Incremental inference of every architecture: inputs of any length and token-by-token decoding,
equal to the one-shot forward (docs/design.md).

Decoder and Session are the interface (model/architectures.py builds an architecture's decoder):
  decoder.start(batch, chunk_memory) -> Session; decoder.logits(hidden [..., d]) -> [..., vocab];
  decoder.retrieval_groups.
  session.feed(tokens [b, n]) -> iterator of (offset, hidden [b, m, d]); session.prefill(tokens,
  lengths=None, end_prompt=False) -> [b, d] (prompts of different lengths in one batch);
  session.step(tokens [b]) -> [b, d]; session.lengths (int [b]);
  session.retrieved(group) and session.prompt_end_retrieved(group) (architectures that retrieve).
Tokens go in as segments of whole model.chunk_len chunks (batch mode over the cached history) from
a chunk boundary, or one at a time; either way the hidden state of every token equals the one-shot
forward's. Subclasses provide the segment and the token step.

CachedDecoder (swa, full) applies the model's stage methods over KV caches: a ring of the last
window + 1 positions (attention.ring_slots) per layer for sliding-window attention, a linear cache
of max_len for full attention.

DRTDecoder (chunk memory on the device or in host memory; §4 of docs/specification.md). A DRT
session holds the state of a batch of sequences:
  * per self-attention layer, a ring buffer of the last window + 1 keys/values
    (attention.SelfAttention, attention.ring_slots);
  * the lower-layer output of the current chunk's rows, encoded when its landmark arrives;
  * per group, the retrieval serving the current chunk, and its chunks' K/V on the device;
  * a chunk store, on the device or in host memory, with every encoded chunk's K/V and landmark
    key.
Retrieval at a landmark is the one-shot forward's outside training (lmk_norm, scores / sqrt(d),
causal mask, the model's ranking: the scores, or for random retrieval retrieval.inference_noise;
top-k, softmax of the chosen scores), so decoding picks the chunks the one-shot forward picks.
The jitted pieces return the landmark queries; the session scores them against the stored
landmark keys a block of `key_block` chunks at a time (one transfer and one jitted top-k merge
per block, retrieval.merge_top_k); a prefill segment copies the K/V of the chunks it retrieved,
`gather_block` chunks at a time, into one device buffer sized for the most a segment can retrieve.
So with host memory no device array grows with the context.
The retrieval computed at a segment's last landmark serves the next segment's first chunk; a
chunk's landmark is processed right after its last token.

Prompt-end retrieval (prefill(..., end_prompt=True); docs/design.md, "Prompt-end retrieval"): a
prompt that ends inside a chunk would be answered with the retrieval made at the previous
chunk's landmark, before the end of the prompt was read. So every group retrieves again from a
provisional landmark row after the last prompt token, run through the layers and scored exactly
as that chunk's own landmark would be at this place (query chunk = the partial chunk, candidates
the complete chunks before it), and that retrieval serves the rest of the chunk, starting with
the prediction of the first generated token: the last prompt token's hidden state is computed
again under it. Nothing of the provisional row or of that second pass is kept: the caches and the
chunk store are those of feeding the prompt alone. A prompt that ends at a chunk boundary is
served by the landmark that closed its last chunk, which has read all of it. The chunk's real
landmark then retrieves as always.
"""

import functools
from typing import Any, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from drt_jax.config import ConfigError, ModelConfig
from drt_jax.model import architectures
from drt_jax.model import retrieval as retrieval_ops
from drt_jax.model.baselines import CausalLM
from drt_jax.model.drt import DRT, drop_landmarks
from drt_jax.model.head import tied_logits
from drt_jax.model.retrieval import Retrieval

CHUNK_MEMORIES = ("device", "host")


class InputError(ValueError):
  """Tokens a session cannot take (empty, too long, misaligned); the message names the value."""


class Decoder:
  """A model's compiled inference pieces, shared by the sessions it starts (the interface every
  architecture's decoder provides; subclasses set session_class).

  Args:
    config: the model.
    params: its float32 params (unboxed), as trained.
    max_len: the most tokens a sequence may hold (prompt + generated); sizes the caches.
    segment_len: tokens per batch-mode segment when feeding long inputs, a multiple of
      chunk_len (longer segments: fewer host round trips, more activation memory).
  """
  session_class: type = None

  def __init__(self, config: ModelConfig, params, *, max_len: int, segment_len: int):
    if not isinstance(max_len, int) or max_len < 1:
      raise ConfigError(f"max_len={max_len!r}: must be a positive integer")
    c = config.chunk_len
    if not isinstance(segment_len, int) or segment_len < c or segment_len % c:
      raise ConfigError(f"segment_len={segment_len!r}: must be a positive multiple of "
                        f"model.chunk_len={c}")
    self.config = config
    self.params = params
    self.max_len = max_len
    self.segment_len = segment_len

  @property
  def retrieval_groups(self) -> int:
    """How many groups Session.retrieved answers for; 0 when the architecture retrieves nothing."""
    return architectures.get(self.config.arch).retrieval_groups(self.config)

  def start(self, batch: int, chunk_memory: str = "device") -> "Session":
    """A session of `batch` empty sequences; chunk_memory ("device" or "host") is where their
    memory is kept, where the architecture offers the choice."""
    if chunk_memory not in CHUNK_MEMORIES:
      raise ConfigError(f"chunk_memory={chunk_memory!r}: must be one of 'device', 'host'")
    architectures.check_chunk_memory(self.config, chunk_memory, "chunk_memory")
    return self.session_class(self, batch, chunk_memory)

  def logits(self, hidden):
    """hidden [..., d] -> float32 [..., vocab] (the tied head)."""
    return tied_logits(hidden, self.params["embed"]["embedding"], self.config.compute_dtype)


class Session:
  """The inference state of `batch` sequences. Not thread-safe; one decoder, many sessions.

  Subclasses implement _segment (whole chunks, every sequence at one chunk boundary) and _step
  (one token per sequence); both advance `lengths`.
  """

  def __init__(self, decoder: Decoder, batch: int, chunk_memory: str):
    self.decoder = decoder
    self.batch = batch
    self.chunk_memory = chunk_memory
    self.lengths = np.zeros(batch, np.int64)  # tokens fed per sequence, known without a sync

  def retrieved(self, group: int) -> list[np.ndarray]:
    """Per sequence, int [chunks encoded, K]: the chunk ids each chunk's landmark retrieved in
    `group` (they serve the chunk after it), -1 in empty slots."""
    raise InputError(f"model.arch={self.decoder.config.arch!r} retrieves no chunks "
                     f"(retrieval group {group} asked for)")

  def prompt_end_retrieved(self, group: int) -> list[np.ndarray | None]:
    """Per sequence, int [K]: the chunk ids of the retrieval of `group` that served the last
    prompt end (prefill(..., end_prompt=True)): the provisional landmark's when the prompt ended
    inside a chunk, else the retrieval made at the landmark closing its last chunk; -1 in empty
    slots; None where no prompt end was marked."""
    raise InputError(f"model.arch={self.decoder.config.arch!r} retrieves no chunks "
                     f"(retrieval group {group} asked for)")

  def feed(self, tokens) -> Iterator[tuple[int, jax.Array]]:
    """Feeds int [batch, n] tokens, every sequence at the same length.

    Returns an iterator of (offset, hidden [batch, m, d]): the final-normed hidden states of
    tokens offset .. offset + m - 1 of this call (row t predicts token t + 1), piece by piece;
    nothing is fed beyond what has been iterated. Inputs are checked at the call.
    """
    tokens, counts = self._check_feed(tokens)
    return ((int(offsets[0]), hidden) for offsets, hidden, _ in self._pieces(tokens, counts))

  def _check_feed(self, tokens, lengths=None):
    """tokens (and lengths, default every row's whole width) -> numpy tokens and int64 lengths
    [batch], checked."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] != self.batch:
      raise InputError(f"tokens of shape {tokens.shape}: expected [batch={self.batch}, length]")
    if tokens.shape[1] == 0:
      raise InputError("empty input: at least one token is needed")
    if len(set(self.lengths.tolist())) != 1:
      raise InputError(f"sequences hold {sorted(set(self.lengths.tolist()))} tokens: feed needs "
                       "them all at one length (use step)")
    if lengths is None:
      lengths = np.full(self.batch, tokens.shape[1])
    lengths = np.asarray(lengths)
    if (lengths.shape != (self.batch,) or not np.issubdtype(lengths.dtype, np.integer)
        or lengths.min() < 1 or lengths.max() > tokens.shape[1]):
      raise InputError(f"lengths={lengths.tolist()}: expected {self.batch} integers in 1 .. "
                       f"{tokens.shape[1]} (the tokens' width)")
    self._check_room(int(lengths.max()))
    return tokens, lengths.astype(np.int64)

  def prefill(self, tokens, *, lengths=None, end_prompt: bool = False):
    """Feeds tokens int [batch, n], every sequence at the same length; returns the hidden state
    of each sequence's last token, [batch, d].

    lengths: int [batch], the tokens of each sequence (row i feeds tokens[i, :lengths[i]]; the
    rest of the row is ignored); default n for every row. Sequences of different lengths go in
    together (_pieces) and then sit at different positions, which step takes; each one's state
    is the one feeding it alone gives.
    end_prompt: the tokens end a prompt and generation follows. An architecture that retrieves
    once per chunk (DRT) then retrieves again from the prompt's end for the rest of its chunk,
    and the hidden state returned is the last token's under that retrieval (module docstring);
    the others (swa, full, and landmark, whose every row retrieves for itself) ignore it.
    """
    tokens, lengths = self._check_feed(tokens, lengths)
    if end_prompt:
      return self._prefill_prompt(tokens, lengths)
    return self._prefill_rows(tokens, lengths)

  def step(self, tokens):
    """One token per sequence (int [batch]) -> its hidden state [batch, d]."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.shape != (self.batch,):
      raise InputError(f"tokens of shape {tokens.shape}: expected [batch={self.batch}]")
    self._check_room(1)
    return self._step(tokens, None)

  def _prefill_prompt(self, tokens, lengths):
    return self._prefill_rows(tokens, lengths)

  def _prefill_rows(self, tokens, counts):
    """Feeds tokens[i, :counts[i]] to sequence i (counts >= 0, not all 0) -> hidden [batch, d]
    of each sequence's last token fed (zeros where counts[i] == 0)."""
    last = None
    for offsets, hidden, rows in self._pieces(tokens, counts):
      ends = rows & (offsets + hidden.shape[1] == counts)
      if last is None:
        last = jnp.zeros_like(hidden[:, -1])
      if ends.any():
        last = _where_rows(jnp.asarray(ends), hidden[:, -1], last)
      # Dropped before the next piece is dispatched: a whole segment's hidden states kept alive
      # through it raised the peak device memory of long prefills by their size (0.19 GiB).
      del hidden
    return last

  def _check_room(self, n: int):
    longest = int(self.lengths.max()) + n
    if longest > self.decoder.max_len:
      raise InputError(f"{longest} tokens: longer than max_len={self.decoder.max_len}")

  def _pieces(self, tokens, counts):
    """Feeds tokens[i, :counts[i]] to sequence i, every sequence at one length, in pieces: yields
    (offsets int [batch], hidden [batch, m, d], rows bool [batch]) where the sequences `rows`
    took their tokens offsets .. offsets + m - 1 (the other rows of hidden are meaningless).

    Each sequence is cut as it would be alone: steps to a chunk boundary, whole chunks in
    segments of at most segment_len, the rest in steps. The pieces of different sequences run
    together: one step takes a token of every sequence that has one left, each at its own
    position, and one segment takes every sequence whose next piece has that size (they are at
    one position, since they all took the same pieces before). A sequence not in `rows` keeps
    its state (Session._segment and _step take them as a mask).
    """
    c, longest = self.decoder.config.chunk_len, self.decoder.segment_len
    fed = np.zeros(self.batch, np.int64)
    head = np.minimum(counts, -int(self.lengths[0]) % c)
    whole = head + (counts - head) // c * c
    for until in (head, whole, counts):
      while (fed < until).any():
        rows = fed < until
        if until is whole:  # every sequence in `rows` sits at one chunk boundary
          # The shortest piece first: a piece shorter than a segment is a sequence's last, so
          # the sequences left all take the next one, and stay at one position.
          piece = np.minimum(until - fed, longest)
          size = int(piece[rows].min())
          rows &= piece == size
          first = int(fed[rows][0])
          hidden = self._segment(tokens[:, first:first + size], self._mask(rows))
        else:
          size = 1
          picked = tokens[np.arange(self.batch), np.minimum(fed, tokens.shape[1] - 1)]
          hidden = self._step(jnp.asarray(picked, jnp.int32), self._mask(rows))[:, None]
        yield fed.copy(), hidden, rows
        del hidden  # as in _prefill_rows: not held while the next piece runs
        fed += rows * size

  def _position(self, rows) -> int:
    """The length of the sequences where rows (None: all), which is one."""
    return int(self.lengths[0] if rows is None else self.lengths[rows][0])

  def _advance(self, n: int, rows):
    """n more tokens in the sequences where rows (None: all)."""
    self.lengths += n if rows is None else n * rows

  @staticmethod
  def _mask(rows):
    """Session._segment's and _step's `rows`: None when every sequence takes the piece (the
    programs without a mask), else bool [batch]."""
    return None if rows.all() else rows

  def _segment(self, tokens, rows):
    """Whole chunks (int [batch, n]) for the sequences where rows (None: all), which sit at one
    chunk boundary; the others keep their state."""
    raise NotImplementedError

  def _step(self, tokens, rows):
    """One token per sequence (int [batch]) for the sequences where rows (None: all), each at
    its own position; the others keep their state."""
    raise NotImplementedError


# CachedDecoder (swa, full): the CausalLM itself, in a decoding mode, over its KV caches.


def _cached_model(config: ModelConfig, mode: str, max_len: int, history: int = 0) -> CausalLM:
  return CausalLM(config, mode, history=history, cache_len=max_len)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def _cached_step(config: ModelConfig, max_len: int, params, cache, tokens, rows):
  """One token per sequence (int [b]) -> (hidden [b, d], cache); rows as keep_rows'."""
  hidden, variables = _cached_model(config, "step", max_len).apply(
      {"params": params, "cache": cache}, tokens[:, None], mutable=["cache"])
  return hidden[:, 0], keep_rows(rows, variables["cache"], cache)


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("history",),
                   donate_argnums=3)
def _cached_segment(config: ModelConfig, max_len: int, params, cache, tokens, rows, *,
                    history: int):
  """Tokens int [b, n] -> (hidden [b, n, d], cache); the sequences where rows (keep_rows) at
  one position."""
  hidden, variables = _cached_model(config, "segment", max_len, history).apply(
      {"params": params, "cache": cache}, tokens, mutable=["cache"])
  return hidden, keep_rows(rows, variables["cache"], cache)


class CachedSession(Session):
  """swa / full sequences: the model's "cache" collection, one KV cache per layer."""

  def __init__(self, decoder: "CachedDecoder", batch: int, chunk_memory: str):
    super().__init__(decoder, batch, chunk_memory)
    self.cache = decoder.initial_cache(batch)

  def _step(self, tokens, rows):
    d = self.decoder
    hidden, self.cache = _cached_step(d.config, d.max_len, d.params, self.cache, tokens,
                                      device_rows(rows))
    self._advance(1, rows)
    return hidden

  def _segment(self, tokens, rows):
    d = self.decoder
    # Sliding-window attention reads the cached positions the segment's window reaches.
    history = (0 if d.config.arch == "full" else
               min(self._position(rows), d.config.window + 1))
    hidden, self.cache = _cached_segment(d.config, d.max_len, d.params, self.cache, tokens,
                                         device_rows(rows), history=history)
    self._advance(tokens.shape[1], rows)
    return hidden


class CachedDecoder(Decoder):
  """Decoding of the baselines (model/baselines.py): per layer a ring of window + 1 keys/values
  (swa) or a linear cache of max_len (full). Memory lives on the device."""
  session_class = CachedSession

  def initial_cache(self, batch: int):
    c = self.config
    shapes = jax.eval_shape(lambda p: _cached_model(c, "step", self.max_len).apply(
        {"params": p}, jnp.zeros((batch, 1), jnp.int32), mutable=["cache"])[1]["cache"],
        self.params)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


# DRTDecoder: chunk stores, blocked scoring and the segment gather around the DRT's stage methods.


@flax.struct.dataclass
class DecodeState:
  """Device state of b sequences (S rows per chunk, G groups, K = min(topk, capacity))."""
  cache: Any  # the DRT's "cache" collection: ring buffers and positions per attention layer
  position: jax.Array  # int32 [b]: rows of the landmark-inserted stream processed
  chunk_rows: jax.Array  # float32 [b, S, d]: lower-layer output of the current chunk's rows
  active: Retrieval  # [b, G, K]: per group, the retrieval serving the current chunk
  active_kv: jax.Array  # [b, G, K, S, 2, heads, head_dim]: the K/V of those chunks


class DeviceChunkStore:
  """Encoded chunks in device buffers: K/V [b, capacity, S, 2, heads, head_dim] and landmark keys
  float32 [b, key_capacity, d] (capacity rounded up to whole key blocks)."""

  def __init__(self, batch: int, capacity: int, key_capacity: int, chunk_shape, d_model: int,
               dtype):
    self.buffer = jnp.zeros((batch, capacity) + tuple(chunk_shape), dtype)
    self.keys = jnp.zeros((batch, key_capacity, d_model), jnp.float32)

  def write(self, kv, keys, first, rows):
    """kv [b, n, ...] and keys [b, n, d] -> chunks first[i] .. first[i] + n - 1 of the sequences
    where rows[i]."""
    first, rows = jnp.asarray(first), jnp.asarray(rows)
    self.buffer = _write_chunks(self.buffer, kv, first, rows)
    self.keys = _write_chunks(self.keys, keys, first, rows)

  def gather(self, indices):
    """int [b, m] chunk ids -> device [b, m, S, 2, heads, head_dim]."""
    return _gather_chunks(self.buffer, jnp.asarray(indices, jnp.int32))

  def key_block(self, first: int, size: int):
    """The landmark keys of chunks first .. first + size - 1 -> device float32 [b, size, d]."""
    return _key_slice(self.keys, first, size=size)


class HostChunkStore:
  """Chunk K/V and landmark keys in host memory (numpy), for contexts beyond device memory: one
  copy to the host per write; per retrieval, one transfer per block of landmark keys scored and
  one of the selected chunks.

  The K/V are not a jax array in "pinned_host" memory: a retrieval gathers chunks and a write
  scatters them, and XLA does not run such ops on host-memory arrays on every backend;
  jax.device_put of whole arrays (one per chunk) works everywhere but costs ~0.1 ms of dispatch
  per chunk. A block of landmark keys, though, is read whole at every retrieval and never changes
  once every sequence has filled it: such a block is also kept as a whole jax array in pinned host
  memory, which copies to the device ~7x faster than numpy's pageable memory (H100: 0.7 vs 5.2 ms
  per 8192 x 768 float32 keys), and the landmark step at 4M tokens reads 9 blocks.
  """

  def __init__(self, batch: int, capacity: int, key_capacity: int, chunk_shape, d_model: int,
               dtype):
    # Zero pages are mapped lazily: memory is committed only as chunks are written.
    self.buffer = np.zeros((batch, capacity) + tuple(chunk_shape), np.dtype(dtype))
    self.keys = np.zeros((batch, key_capacity, d_model), np.float32)
    self.filled = np.zeros(batch, np.int64)  # chunks written per sequence
    self._pinned = {}  # (first, size) of a block every sequence has filled -> its pinned copy

  def write(self, kv, keys, first, rows):
    kv, keys = jax.device_get((kv, keys))
    for i in np.flatnonzero(rows):
      self.buffer[i, first[i]:first[i] + kv.shape[1]] = kv[i]
      self.keys[i, first[i]:first[i] + keys.shape[1]] = keys[i]
      self.filled[i] = max(self.filled[i], first[i] + keys.shape[1])

  def gather(self, indices):
    indices = np.asarray(indices)
    return jax.device_put(self.buffer[np.arange(len(indices))[:, None], indices])

  def key_block(self, first: int, size: int):
    keys = self.keys[:, first:first + size]
    if first + size > self.filled.min():
      return jax.device_put(keys)
    if (first, size) not in self._pinned:
      self._pinned[first, size] = jax.device_put(keys, jax.memory.Space.Host)
    return jax.device_put(self._pinned[first, size], jax.memory.Space.Device)


@functools.partial(jax.jit, donate_argnums=0)
def _write_chunks(buffer, kv, first, rows):
  batch, n = kv.shape[:2]
  b = jnp.arange(batch)[:, None]
  slots = jnp.minimum(first[:, None] + jnp.arange(n)[None, :], buffer.shape[1] - 1)
  keep = rows.reshape((batch, 1) + (1,) * (kv.ndim - 2))
  return buffer.at[b, slots].set(jnp.where(keep, kv.astype(buffer.dtype), buffer[b, slots]))


@jax.jit
def _gather_chunks(buffer, indices):
  return buffer[jnp.arange(buffer.shape[0])[:, None], indices]


@functools.partial(jax.jit, static_argnames="size")
def _key_slice(keys, first, *, size: int):
  return jax.lax.dynamic_slice_in_dim(keys, first, size, axis=1)


def _drt(config: ModelConfig, mode: str, history: int = 0) -> DRT:
  return DRT(config, mode, history)


@functools.partial(jax.jit, static_argnums=0, static_argnames="topk")
def _score_block(config: ModelConfig, params, best, queries, query_chunks, groups, keys, first, *,
                 topk: int):
  """merge_top_k of one block: queries float32 [b, q, d] of chunks query_chunks (int [b, q]) in
  retrieval groups `groups` (int [q]) against keys float32 [b, n, d] of chunks first ..
  first + n - 1, each visible to the queries of later chunks; ranked as the model ranks."""
  scores = retrieval_ops.chunk_scores(queries, keys)
  key_chunks = first + jnp.arange(keys.shape[1])
  mask = retrieval_ops.causal_chunk_mask(query_chunks, key_chunks)
  ranking = _drt(config, "step").apply({"params": params}, groups, scores, query_chunks,
                                       key_chunks, train=False, method="rank")
  return retrieval_ops.merge_top_k(best, scores, mask, first, topk, ranking)


@jax.jit
def _retrieval_of(best) -> Retrieval:
  return retrieval_ops.top_k_retrieval(*best)


@jax.jit
def _where_rows(rows, after, before):
  """Per sequence (rows bool [b]), the leaves of `after` where rows, else those of `before`."""
  def pick(a, b):
    return jnp.where(rows.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
  return jax.tree.map(pick, after, before)


def keep_rows(rows, after, before):
  """_where_rows, or `after` itself when rows is None (every sequence took the piece: the
  programs of a whole batch select nothing)."""
  return after if rows is None else _where_rows(rows, after, before)


def device_rows(rows):
  """Session's rows (None or bool [b]) as the jitted pieces take them."""
  return None if rows is None else jnp.asarray(rows)


def _stack_groups(retrievals: Sequence[Retrieval]) -> Retrieval:
  """G retrievals [b, ..., K] -> one Retrieval [b, G, ..., K]."""
  return Retrieval(*(jnp.stack(parts, axis=1) for parts in zip(*retrievals)))


def _active_slots(active: Retrieval, group: int) -> Retrieval:
  """The active retrieval of one group, indexing its own gathered chunks: [b, 1, K]."""
  batch, _, k = active.indices.shape
  slots = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (batch, 1, k))
  return Retrieval(slots, active.weights[:, group, None], active.valid[:, group, None])


def _local_slots(indices, valid):
  """Chunk ids [b, n, K] -> (the distinct valid ids per sequence, padded with 0 to [b, U] where
  U is the most any sequence has, ids as positions in that list [b, n, K])."""
  distinct = [np.unique(indices[i][valid[i]]) for i in range(len(indices))]
  needed = np.zeros((len(indices), max(1, max(len(ids) for ids in distinct))), np.int32)
  local = np.zeros(indices.shape, np.int32)
  for i, ids in enumerate(distinct):
    needed[i, :len(ids)] = ids
    local[i][valid[i]] = np.searchsorted(ids, indices[i][valid[i]])
  return needed, local


def _unstack(kv):
  """Stacked K/V [..., S, 2, heads, head_dim] -> k, v [..., S, heads, head_dim]."""
  return kv[..., 0, :, :], kv[..., 1, :, :]


@functools.partial(jax.jit, static_argnames=("width",))
def _empty_slots(piece, *, width: int):
  """Zero k, v buffers [b, width, S, heads, head_dim] for the chunks of piece [b, P, S, 2, heads,
  head_dim]."""
  b, _, s, _, heads, head_dim = piece.shape
  return tuple(jnp.zeros((b, width, s, heads, head_dim), piece.dtype) for _ in range(2))


@functools.partial(jax.jit, donate_argnums=0)
def _put_slots(buffers, piece, start):
  """buffers (k, v) [b, W, ...] with piece's K/V [b, P, ...] written at slots start ..
  start + P - 1, in place."""
  return tuple(jax.lax.dynamic_update_slice_in_dim(buffer, part, start, axis=1)
               for buffer, part in zip(buffers, _unstack(piece)))


# The jitted pieces, module-level with the (hashable) ModelConfig static, so every decoder of a
# model shares their compilations. Params are an argument, not a closure constant.


def _stacked(keys, k, v):
  """The encoder's (keys, k, v) with K/V stacked as the chunk stores keep them."""
  return keys, jnp.stack([k, v], axis=3)


def _token_rows(config: ModelConfig, params, state: DecodeState, tokens):
  """One token per sequence (int [b]) -> (hidden [b, d], state). The landmark that follows a
  chunk's last token is landmark_step's."""
  batch = tokens.shape[0]

  def run(m):
    x = m.lower_layers(m.token_row(tokens))
    slot = jnp.remainder(state.position, config.chunk_size)
    chunk_rows = state.chunk_rows.at[jnp.arange(batch), slot].set(x[:, 0])
    for g in range(config.num_groups):
      x = m.upper_layers(g, x, *_unstack(state.active_kv[:, g]), _active_slots(state.active, g))
    return m.finish(x)[:, 0], chunk_rows

  (hidden, chunk_rows), variables = _drt(config, "step").apply(
      {"params": params, "cache": state.cache}, method=run, mutable=["cache"])
  return hidden, state.replace(cache=variables["cache"], position=state.position + 1,
                               chunk_rows=chunk_rows)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _token_step(config: ModelConfig, params, state: DecodeState, tokens, rows):
  """_token_rows for the sequences where rows (keep_rows); the others keep their state."""
  hidden, new = _token_rows(config, params, state, tokens)
  return hidden, keep_rows(rows, new, state)


@functools.partial(jax.jit, static_argnums=0)
def _token_hidden(config: ModelConfig, params, state: DecodeState, tokens):
  """_token_step's hidden state [b, d] alone; `state` is not consumed (prompt-end retrieval
  computes the last prompt token again from the state before it)."""
  return _token_rows(config, params, state, tokens)[0]


def _landmark_queries(m: DRT, config: ModelConfig, state: DecodeState, x):
  """Every group's landmark query float32 [b, G, d] for landmark rows x [b, 1, d] (the lower
  layers' output), running them through the upper layers (writing their caches). The landmark
  row is served by the active retrieval, as in training the landmark row of a chunk is served by
  the retrieval serving that chunk, so every group's query depends on that one alone."""
  queries = []
  for g in range(config.num_groups):
    queries.append(m.retrieval_queries(g, x))
    x = m.upper_layers(g, x, *_unstack(state.active_kv[:, g]), _active_slots(state.active, g))
  return jnp.concatenate(queries, axis=1)


@functools.partial(jax.jit, static_argnums=0)
def _prompt_end_queries(config: ModelConfig, params, state: DecodeState):
  """Every group's query float32 [b, G, d] of a provisional landmark row after each sequence's
  last row: it runs exactly as _landmark_step runs a real landmark (its lower layers attend to
  the window, the partial chunk included; the upper layers are served by the active
  retrieval), against a copy of the caches that is dropped, so nothing of it is kept."""
  batch = state.position.shape[0]

  def run(m):
    return _landmark_queries(m, config, state, m.lower_layers(m.landmark_row(batch)))

  queries, _ = _drt(config, "step").apply({"params": params, "cache": state.cache}, method=run,
                                          mutable=["cache"])
  return queries


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _landmark_step(config: ModelConfig, params, state: DecodeState, closes):
  """The landmark row of the sequences where closes (bool [b]); the others are unchanged.

  Encodes the finished chunk and computes each group's landmark query (_landmark_queries), so
  all come out of this step. Returns (state, queries float32 [b, G, d], the chunk's landmark key
  float32 [b, 1, d] and K/V [b, 1, S, 2, heads, head_dim]); the caller retrieves and refreshes
  active and active_kv.
  """
  batch = closes.shape[0]

  def run(m):
    x = m.lower_layers(m.landmark_row(batch))
    chunk_rows = state.chunk_rows.at[:, -1].set(x[:, 0])
    keys, kv = _stacked(*m.encode(chunk_rows[:, None]))
    return chunk_rows, _landmark_queries(m, config, state, x), keys, kv

  (chunk_rows, queries, keys, kv), variables = _drt(config, "step").apply(
      {"params": params, "cache": state.cache}, method=run, mutable=["cache"])
  new = state.replace(cache=variables["cache"], position=state.position + 1,
                      chunk_rows=chunk_rows)
  return _where_rows(closes, new, state), queries, keys, kv


@functools.partial(jax.jit, static_argnums=0, static_argnames=("history",), donate_argnums=2)
def _segment_start(config: ModelConfig, params, state: DecodeState, tokens, rows, *,
                   history: int):
  """Whole chunks (int [b, n * chunk_len]) through the lower layers and the chunk encoder, for
  the sequences where rows (keep_rows; the others' state is kept).

  Returns (rows [b, n * S, d], the chunks' K/V [b, n, S, 2, heads, head_dim] and landmark keys
  float32 [b, n, d], state with the lower caches advanced, group 0's queries float32 [b, n, d]).
  """
  length = tokens.shape[1]
  chunks = length // config.chunk_len

  def run(m):
    x = m.lower_layers(m.chunk_rows(tokens))
    keys, kv = _stacked(*m.encode(m.by_chunk(x)))
    return x, kv, keys, m.retrieval_queries(0, m.by_chunk(x)[:, :, -1])

  (x, kv, keys, queries), variables = _drt(config, "segment", history).apply(
      {"params": params, "cache": state.cache}, method=run, mutable=["cache"])
  return x, kv, keys, state.replace(
      cache=keep_rows(rows, variables["cache"], state.cache),
      position=keep_rows(rows, state.position + length + chunks, state.position)), queries


@functools.partial(jax.jit, static_argnums=0, static_argnames=("group", "history"))
def _segment_group(config: ModelConfig, params, cache, x, retrieved, serving: Retrieval, rows, *,
                   group: int, history: int):
  """Group `group`'s upper layers over x [b, n * S, d] (serving indexes the chunks of retrieved,
  k and v [b, m, S, heads, head_dim]), then the next group's queries -> (x, cache, float32
  [b, n, d]); after the last group, the final norm without landmark rows -> (hidden
  [b, n * chunk_len, d], cache, None). The cache changes only where rows (keep_rows)."""

  def run(m):
    y = m.upper_layers(group, x, *retrieved, serving)
    if group + 1 < config.num_groups:
      return y, m.retrieval_queries(group + 1, m.by_chunk(y)[:, :, -1])
    return drop_landmarks(m.finish(y), config.chunk_size), None

  (y, queries), variables = _drt(config, "segment", history).apply(
      {"params": params, "cache": cache}, method=run, mutable=["cache"])
  return y, keep_rows(rows, variables["cache"], cache), queries


def _initial_cache(config: ModelConfig, params, batch: int):
  """Zero ring buffers ("cache" collection) for `batch` sequences at position 0."""

  def touch(m):
    x = m.lower_layers(m.token_row(jnp.zeros((batch,), jnp.int32)))
    chunk = jnp.zeros((batch, 1, config.chunk_size, config.num_heads, config.head_dim),
                      config.compute_dtype)  # its keys and its values
    serving = Retrieval(jnp.zeros((batch, 1, 1), jnp.int32), jnp.zeros((batch, 1, 1)),
                        jnp.zeros((batch, 1, 1), bool))
    for g in range(config.num_groups):
      x = m.upper_layers(g, x, chunk, chunk, serving)
    return x

  shapes = jax.eval_shape(lambda p: _drt(config, "step").apply(
      {"params": p}, method=touch, mutable=["cache"])[1]["cache"], params)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


class DRTSession(Session):
  """The DRT inference state of `batch` sequences: DecodeState and a chunk store."""

  def __init__(self, decoder: "DRTDecoder", batch: int, chunk_memory: str):
    super().__init__(decoder, batch, chunk_memory)
    self.state = decoder.initial_state(batch)
    self.store = decoder.new_store(batch, chunk_memory)
    # Per group and sequence: chunk ids each landmark retrieved (-1 = empty slot), in order.
    self._retrieved = [[[] for _ in range(batch)] for _ in range(decoder.config.num_groups)]
    # Per group and sequence: the retrieval serving the last prompt end (None: none marked).
    self._prompt_end = [[None] * batch for _ in range(decoder.config.num_groups)]

  def retrieved(self, group: int) -> list[np.ndarray]:
    k = self.decoder.topk
    return [np.concatenate(rows) if rows else np.zeros((0, k), np.int64)
            for rows in self._retrieved[group]]

  def prompt_end_retrieved(self, group: int) -> list[np.ndarray | None]:
    return list(self._prompt_end[group])

  def _prefill_prompt(self, tokens, lengths):
    """prefill(tokens, end_prompt=True) (module docstring): each prompt but its last token as
    prefill would take it, then every last token in one step, from a copy of the state before
    it."""
    if (lengths > 1).any():
      self._prefill_rows(tokens, lengths - 1)
    last = jnp.asarray(tokens[np.arange(self.batch), lengths - 1], jnp.int32)
    # A copy: the step consumes (donates) the state it is given.
    before = jax.tree.map(lambda x: x.copy(), self.state)
    self.step(last)  # and the landmark after it when it closes a chunk
    d, c = self.decoder, self.decoder.config
    inside = self.lengths % c.chunk_len != 0
    if inside.any():
      # The partial chunk is not in the store: its provisional landmark scores the complete
      # chunks before it, as its real landmark will (query chunk = the partial chunk).
      queries = _prompt_end_queries(c, d.params, self.state)
      chunk = np.where(inside, self.lengths // c.chunk_len, 0)  # chunk 0 reads no key block
      selected = self._retrieve(queries, np.repeat(chunk[:, None], c.num_groups, axis=1),
                                np.arange(c.num_groups))
      active = _where_rows(jnp.asarray(inside), selected, self.state.active)
      kv = self.store.gather(np.asarray(active.indices).reshape(self.batch, -1))
      self.state = self.state.replace(active=active,
                                      active_kv=kv.reshape(self.state.active_kv.shape))
    served = np.where(np.asarray(self.state.active.valid), np.asarray(self.state.active.indices),
                      -1)
    for g in range(c.num_groups):
      for i in range(self.batch):
        self._prompt_end[g][i] = served[i, g]
    # The last prompt token again, under the retrieval now serving: its hidden state predicts the
    # first generated token. Only that is kept; its keys and values stay those of the step above.
    return _token_hidden(c, d.params, before.replace(active=self.state.active,
                                                     active_kv=self.state.active_kv), last)

  def _step(self, tokens, rows):
    d = self.decoder
    hidden, self.state = _token_step(d.config, d.params, self.state, tokens, device_rows(rows))
    self._advance(1, rows)
    closes = self.lengths % d.config.chunk_len == 0
    if rows is not None:
      closes &= rows  # a sequence left out may sit at a chunk boundary: its landmark has run
    if closes.any():
      self._landmark(closes)
    return hidden

  def _retrieve(self, queries, query_chunks, groups) -> Retrieval:
    """Queries float32 [b, q, d] of chunks query_chunks (numpy int [b, q]) in retrieval groups
    `groups` (int [q]) -> Retrieval [b, q, K] over the chunks before each query's: the stored
    landmark keys are scored a block at a time; blocks from the latest query's chunk on hold
    nothing visible and are not visited."""
    d = self.decoder
    chunks = jnp.asarray(query_chunks, jnp.int32)
    groups = jnp.asarray(groups, jnp.int32)
    best = None
    # At least one block: at chunk 0 it marks every slot invalid.
    for first in range(0, max(int(query_chunks.max()), 1), d.key_block):
      if best is not None:
        # Dispatch runs ahead of the device: without this wait the blocks of a long context would
        # be transferred and scored concurrently, each with its own [q, block] scores, so the
        # device memory would grow with the number of blocks. The transfer dominates a block's
        # time anyway, so little overlap is lost.
        jax.block_until_ready(best)
      best = _score_block(d.config, d.params, best, queries, chunks, groups,
                          self.store.key_block(first, d.key_block), first, topk=d.topk)
    return _retrieval_of(best)
  def _landmark(self, closes):
    d, c = self.decoder, self.decoder.config
    self.state, queries, keys, kv = _landmark_step(c, d.params, self.state, jnp.asarray(closes))
    chunk = self.lengths // c.chunk_len - 1
    # The other rows' retrieval is dropped: they query chunk 0, which needs no block.
    query_chunks = np.repeat(np.where(closes, chunk, 0)[:, None], c.num_groups, axis=1)
    selected = self._retrieve(queries, query_chunks, np.arange(c.num_groups))
    # A chunk's landmark does not see the chunk's own key, so it is stored after the retrieval is
    # dispatched: the key blocks' transfers overlap the landmark step.
    self.store.write(kv, keys, chunk, closes)
    active = _where_rows(jnp.asarray(closes), selected, self.state.active)  # [b, G, K]
    for g in range(c.num_groups):
      self._record(g, np.flatnonzero(closes), jax.tree.map(lambda x: x[:, g, None], active))
    kv = self.store.gather(np.asarray(active.indices).reshape(self.batch, -1))
    self.state = self.state.replace(active=active,
                                    active_kv=kv.reshape(self.state.active_kv.shape))

  def _segment(self, tokens, rows):
    d, c = self.decoder, self.decoder.config
    first = self._position(rows) // c.chunk_len
    chunks = tokens.shape[1] // c.chunk_len
    history = min(first * c.chunk_size, c.window + 1)
    taking = np.ones(self.batch, bool) if rows is None else rows
    x, encoded, keys, state, queries = _segment_start(c, d.params, self.state, tokens,
                                                      device_rows(rows), history=history)
    self.store.write(encoded, keys, np.full(self.batch, first), taking)
    # The store has them now; held through the group calls below, the segment's own chunk K/V
    # added their size (0.19 GiB for drt_pg19) to a long prefill's peak device memory.
    del encoded, keys
    query_chunks = np.broadcast_to(first + np.arange(chunks), (self.batch, chunks))
    cache, active = state.cache, []
    for g in range(c.num_groups):
      selected = self._retrieve(queries, query_chunks, np.full(chunks, g))
      # Chunk j is served by the retrieval at chunk j - 1's landmark; the segment's first chunk
      # by the one carried from before the segment.
      serving = Retrieval(*(jnp.concatenate([now[:, g, None], new[:, :-1]], axis=1)
                            for now, new in zip(state.active, selected)))
      needed, local = _local_slots(np.asarray(serving.indices), np.asarray(serving.valid))
      active.append(jax.tree.map(lambda a: a[:, -1], selected))
      self._record(g, np.flatnonzero(taking), selected)
      x, cache, queries = _segment_group(
          c, d.params, cache, x, self._gather_retrieved(needed),
          serving._replace(indices=jnp.asarray(local)), device_rows(rows), group=g, history=history)
    active = keep_rows(device_rows(rows), _stack_groups(active), state.active)
    kv = self.store.gather(np.asarray(active.indices).reshape(self.batch, -1))
    self.state = state.replace(cache=cache, active=active,
                               active_kv=kv.reshape(state.active_kv.shape))
    self._advance(tokens.shape[1], rows)
    return x

  def _gather_retrieved(self, needed):
    """Chunk ids [b, U] -> their keys and values in slots 0 .. U - 1 of device buffers k, v
    [b, gather_width, S, heads, head_dim] (the other slots hold zeros), piece by piece."""
    d = self.decoder
    buffers = None
    for start in range(0, needed.shape[1], d.gather_block):
      if buffers is not None:
        # As in _retrieve: one piece in flight, or device memory grows with the piece count.
        jax.block_until_ready(buffers)
      ids = needed[:, start:start + d.gather_block]
      piece = self.store.gather(np.pad(ids, ((0, 0), (0, d.gather_block - ids.shape[1]))))
      if buffers is None:
        buffers = _empty_slots(piece, width=d.gather_width)
      buffers = _put_slots(buffers, piece, start)
    return buffers

  def _record(self, group: int, rows, selected: Retrieval):
    """Keeps the chunk ids retrieved at landmarks (selected [b, n, K]) of sequences `rows`."""
    indices = np.where(np.asarray(selected.valid), np.asarray(selected.indices), -1)
    for i in rows:
      self._retrieved[group][i].append(indices[i])


class DRTDecoder(Decoder):
  """DRT decoding (Decoder's args, and:)

  Args:
    key_block: landmark keys scored per block at a retrieval, in chunks (a transfer and a jitted
      top-k merge each; with host chunk memory the device holds about a block of keys at a
      time). Not capped at the capacity: one block shape at every context length, so the
      device memory of a retrieval does not depend on it.
    gather_block: chunks' K/V copied to the device per piece when a segment gathers the chunks
      it retrieved: they go, piece by piece, into one buffer of segment/chunk_len x K chunks
      (the most a segment can retrieve), so only the retrieved chunks are copied and the
      device memory is the same at every context length.
  """
  session_class = DRTSession

  def __init__(self, config: ModelConfig, params, *, max_len: int, segment_len: int,
               key_block: int = 8192, gather_block: int = 256):
    for name, value in (("key_block", key_block), ("gather_block", gather_block)):
      if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r}: must be a positive integer")
    super().__init__(config, params, max_len=max_len, segment_len=segment_len)
    c = config.chunk_len
    self.capacity = -(-max_len // c)
    self.topk = min(config.topk, self.capacity)
    self.key_block = key_block
    # Whole blocks, so every block has one shape (one compilation); the excess is never visible.
    self.key_capacity = -(-self.capacity // self.key_block) * self.key_block
    most = segment_len // c * self.topk  # chunks one segment may retrieve
    self.gather_block = min(gather_block, most)
    self.gather_width = -(-most // self.gather_block) * self.gather_block  # whole pieces

  def initial_state(self, batch: int) -> DecodeState:
    c = self.config
    groups, k, size = c.num_groups, self.topk, c.chunk_size
    return DecodeState(
        cache=_initial_cache(c, self.params, batch),
        position=jnp.zeros((batch,), jnp.int32),
        chunk_rows=jnp.zeros((batch, size, c.d_model), jnp.float32),
        active=Retrieval(jnp.zeros((batch, groups, k), jnp.int32),
                         jnp.zeros((batch, groups, k), jnp.float32),
                         jnp.zeros((batch, groups, k), bool)),
        active_kv=jnp.zeros((batch, groups, k) + self.chunk_shape, c.compute_dtype))

  @property
  def chunk_shape(self):
    c = self.config
    return (c.chunk_size, 2, c.num_heads, c.head_dim)

  def new_store(self, batch: int, chunk_memory: str):
    store = DeviceChunkStore if chunk_memory == "device" else HostChunkStore
    return store(batch, self.capacity, self.key_capacity, self.chunk_shape, self.config.d_model,
                 self.config.compute_dtype)
