"""Trying a model: streamed text generation (greedy or seeded sampling), a chat session that keeps its
history within the context length, and a memory-bounded cache of loaded model versions."""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# End-of-turn markers of common chat templates: a reply ends at these even where the model's EOS differs.
_TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
# The prompt ends at "Assistant:" without the space: byte-level BPE attaches a word's space to the word
# (" pong"), so a prompt ending in a bare space is a token sequence the model has rarely seen.
PLAIN_USER, PLAIN_ASSISTANT = "User: ", "Assistant:"
# Where a plain-transcript reply ends: the model starting the user's next turn itself.
PLAIN_STOP = "\nUser:"


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    # 0 means greedy decoding (argmax); sampling otherwise.
    temperature: float = 0.0
    top_p: float = 1.0
    # None: a fresh random seed per call; an int makes sampling repeatable.
    seed: int | None = None

    def validate(self) -> list[str]:
        p = []
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 2048:
            p.append(f"max_new_tokens: must be an integer in [1, 2048], got {n!r}")
        t = self.temperature
        if not _is_number(t) or not 0.0 <= t <= 5.0:
            p.append(f"temperature: must be a finite number in [0, 5] (0 = greedy), got {t!r}")
        top_p = self.top_p
        if not _is_number(top_p) or not 0.0 < top_p <= 1.0:
            p.append(f"top_p: must be a finite number in (0, 1], got {top_p!r}")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63):
            p.append(f"seed: must be null or an integer in [0, 2**63), got {s!r}")
        return p

    def checked(self) -> GenerationSettings:
        problems = self.validate()
        if problems:
            raise ValueError("invalid generation settings: " + "; ".join(problems))
        return self


@dataclass
class GenerationStats:
    """Filled in while a stream is read: the new tokens produced so far (the EOS that ends a reply
    included), for tokens/s figures that do not re-tokenize the text."""

    tokens: int = 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def context_length(model: Any) -> int | None:
    """The longest sequence the model was built for, or None if its config does not say."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """The ids that end generation: the model's EOS (generation config, else the tokenizer's)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def stream_generate(
    model: Any, tokenizer: Any, prompt: str, settings: GenerationSettings,
    stats: GenerationStats | None = None,
) -> Generator[str, None, None]:  # fmt: skip
    """Text pieces as tokens are produced; they join to the decoded continuation of `prompt`
    (special tokens skipped), ending at EOS or after `max_new_tokens`."""
    settings.checked()  # here, not at the first read: a bad setting fails the call itself
    ids = tokenizer(prompt).input_ids
    return stream_from_ids(model, tokenizer, ids, settings, stop_token_ids(model, tokenizer), stats)


def generate_text(model: Any, tokenizer: Any, prompt: str, settings: GenerationSettings) -> str:
    return "".join(stream_generate(model, tokenizer, prompt, settings))


def stream_from_ids(
    model: Any, tokenizer: Any, ids: Sequence[int], settings: GenerationSettings, stop_ids: set[int],
    stats: GenerationStats | None = None,
) -> Generator[str, None, None]:  # fmt: skip
    """Decode token by token with the KV cache (so a consumer that stops reading stops the work),
    yielding only text that can no longer change as more tokens arrive."""
    settings.checked()
    ids, max_new = fit_to_context(list(ids), settings.max_new_tokens, context_length(model), tokenizer)
    new_ids: list[int] = []
    emitted = ""
    for token in _tokens(model, ids, max_new, settings, stop_ids):
        new_ids.append(token)
        if stats is not None:
            stats.tokens += 1
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        # A trailing U+FFFD is half a UTF-8 character; trailing blanks may still be cleaned up
        # (" ." -> "."): hold both back until the next token settles them.
        stable = text.rstrip()
        if stable.endswith("\ufffd") or not stable.startswith(emitted):
            continue
        if len(stable) > len(emitted):
            yield stable[len(emitted) :]
            emitted = stable
    final = tokenizer.decode(new_ids, skip_special_tokens=True)
    if final.startswith(emitted):
        if len(final) > len(emitted):
            yield final[len(emitted) :]
    else:
        logger.warning(
            "the decoded text changed after it was streamed; the stream differs from a one-shot decode"
        )


def fit_to_context(
    ids: list[int], max_new_tokens: int, context: int | None, tokenizer: Any
) -> tuple[list[int], int]:
    """Keep the prompt's tail so prompt + new tokens fit the context; an empty prompt starts at BOS."""
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start if start is not None else 0]
    if context is None:
        return ids, max_new_tokens
    if max_new_tokens >= context:
        # Leave one position for the prompt: a continuation needs something to continue.
        logger.info(
            "max_new_tokens=%d does not fit a %d-token context; generating %d",
            max_new_tokens,
            context,
            context - 1,
        )
        max_new_tokens = context - 1
    room = context - max_new_tokens
    if len(ids) > room:
        logger.info("prompt of %d tokens truncated to its last %d to fit the context", len(ids), room)
        ids = ids[-room:]
    return ids, max_new_tokens


def _tokens(
    model: Any, ids: list[int], max_new: int, settings: GenerationSettings, stop_ids: set[int]
) -> Iterator[int]:
    import torch

    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if settings.seed is None:
        generator.seed()
    else:
        generator.manual_seed(settings.seed)
    inputs = torch.tensor([ids], device=device)
    cache: dict[str, Any] = {}
    for _ in range(max_new):
        with torch.inference_mode():
            out = model(input_ids=inputs, use_cache=True, **cache)
        # transformers 5.2x renamed `past_key_values` to `cache` (the old name warns); 4.x has only the old one.
        key = "cache" if "cache" in out else "past_key_values"
        cache = {key: out[key]}
        token = _next_token(out.logits[0, -1].float(), settings, generator)
        yield token
        if token in stop_ids:
            return
        inputs = torch.tensor([[token]], device=device)


def _next_token(logits: Any, settings: GenerationSettings, generator: Any) -> int:
    import torch

    if settings.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    if settings.top_p < 1.0:
        # Nucleus: keep the most likely tokens until their mass reaches top_p (always at least one).
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= settings.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class _Turn:
    user: str
    assistant: str = ""


class ChatSession:
    """A conversation with one model: the tokenizer's chat template when it has one, otherwise a
    plain "User: / Assistant: " transcript; the oldest turns leave the prompt when it outgrows the context."""

    def __init__(self, model: Any, tokenizer: Any, settings: GenerationSettings | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = (settings or GenerationSettings()).checked()
        self.uses_template = bool(getattr(tokenizer, "chat_template", None))
        self.turns: list[_Turn] = []
        # The text of the last prompt sent to the model, to see which turns it still held.
        self.last_prompt = ""

    @property
    def history(self) -> list[dict[str, str]]:
        messages = []
        for turn in self.turns:
            messages.append({"role": "user", "content": turn.user})
            if turn.assistant:
                messages.append({"role": "assistant", "content": turn.assistant})
        return messages

    def send(self, user_text: str) -> Iterator[str]:
        """The reply, streamed; it joins the history as it is read (a partial reply if reading stops)."""
        turn = _Turn(user_text)
        self.turns.append(turn)
        ids = self._prompt_ids()
        stops = stop_token_ids(self.model, self.tokenizer) | self._turn_end_ids()
        pieces = stream_from_ids(self.model, self.tokenizer, ids, self.settings, stops)
        if not self.uses_template:
            pieces = _without_leading_space(_until(pieces, PLAIN_STOP))
        try:
            for piece in pieces:
                turn.assistant += piece
                yield piece
        finally:
            pieces.close()

    def _render(self, turns: list[_Turn]) -> str:
        if self.uses_template:
            messages = [
                m
                for t in turns
                for m in ({"role": "user", "content": t.user}, {"role": "assistant", "content": t.assistant})
            ]
            # The current turn has no reply yet: the template's generation prompt opens it.
            return self.tokenizer.apply_chat_template(
                messages[:-1], tokenize=False, add_generation_prompt=True
            )
        past = "".join(f"{PLAIN_USER}{t.user}\n{PLAIN_ASSISTANT} {t.assistant}\n" for t in turns[:-1])
        return f"{past}{PLAIN_USER}{turns[-1].user}\n{PLAIN_ASSISTANT}"

    def _prompt_ids(self) -> list[int]:
        context = context_length(self.model)
        room = None if context is None else context - min(self.settings.max_new_tokens, context - 1)
        first = 0
        while True:
            text = self._render(self.turns[first:])
            # The template writes its own special tokens (BOS included, where it has one).
            ids = self.tokenizer(text, add_special_tokens=not self.uses_template).input_ids
            if room is None or len(ids) <= room or first == len(self.turns) - 1:
                break
            first += 1
        if first:
            logger.info(
                "chat prompt: dropped the %d oldest turns to fit the %s-token context", first, context
            )
        # A lone turn that is still too long is cut from the left by fit_to_context.
        self.last_prompt = text
        return ids

    def _turn_end_ids(self) -> set[int]:
        if not self.uses_template:
            return set()
        vocab = self.tokenizer.get_vocab()
        return {vocab[t] for t in _TURN_END_TOKENS if t in vocab and t in self.tokenizer.chat_template}


def _until(pieces: Generator[str, None, None], stop: str) -> Generator[str, None, None]:
    """The stream up to `stop`; text that might be the start of `stop` waits for the next piece."""
    pending = ""
    try:
        for piece in pieces:
            pending += piece
            cut = pending.find(stop)
            if cut >= 0:
                if cut:
                    yield pending[:cut]
                return
            keep = next(
                (k for k in range(min(len(stop) - 1, len(pending)), 0, -1) if stop.startswith(pending[-k:])),
                0,
            )
            if len(pending) > keep:
                yield pending[: len(pending) - keep]
                pending = pending[len(pending) - keep :]
        if pending:
            yield pending
    finally:
        pieces.close()


def _without_leading_space(pieces: Generator[str, None, None]) -> Generator[str, None, None]:
    """The reply without the space that separates it from "Assistant:"."""
    started = False
    try:
        for piece in pieces:
            if not started:
                piece = piece.lstrip(" ")
                started = bool(piece)
            if piece:
                yield piece
    finally:
        pieces.close()


@dataclass
class _Entry:
    model: Any
    tokenizer: Any
    nbytes: int = 0


def model_bytes(model: Any) -> int:
    """Memory held by the model's parameters and buffers (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


class ModelCache:
    """Loaded (model, tokenizer) pairs by version id, least recently used evicted first so their
    parameter and buffer bytes stay within `max_bytes`; the most recent one always stays."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes: must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, loader: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                # Loading under the lock: two requests for one version load it once, and two
                # different loads never overlap and exceed the budget together.
                model, tokenizer = loader()
                entry = _Entry(model, tokenizer, model_bytes(model))
                self._entries[key] = entry
                logger.info("model cache: loaded %s (%.1f MB)", key, entry.nbytes / 1e6)
                self._evict()
            else:
                self._entries.move_to_end(key)
            return entry.model, entry.tokenizer

    def _evict(self) -> None:
        while len(self._entries) > 1 and self.total_bytes > self.max_bytes:
            key, _ = self._entries.popitem(last=False)
            logger.info("model cache: evicted %s to stay within %d bytes", key, self.max_bytes)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def keys(self) -> list[str]:
        """Cached version ids, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
