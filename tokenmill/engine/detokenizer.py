"""Incremental detokenization and stop strings.

Decoding one token at a time is wrong for tokens that are part of a multi-byte character or that
change the spacing of their neighbours, so each step decodes a short window: the text of
ids[prefix_offset:] minus the text of ids[prefix_offset:read_offset]. A trailing U+FFFD means the
character is incomplete: emit nothing and wait for the next token.
"""
from __future__ import annotations

_CONTEXT = 5  # prompt tokens decoded along with the first output tokens, for correct spacing


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool,
                 stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # A fast tokenizer that cleans up no spaces decodes exactly as its Rust backend does: call
        # that directly (transformers' decode wrapper costs more than the decode itself, twice a
        # token for every running request).
        backend = getattr(tokenizer, "_tokenizer", None)
        self._backend_decode = (backend.decode if backend is not None and hasattr(backend, "decode")
                                and not getattr(tokenizer, "clean_up_tokenization_spaces", True) else None)
        self.ids = list(prompt_token_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.stop = stop
        self._max_stop_len = max((len(s) for s in stop), default=0)

    def _decode(self, ids: list[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one token; return the stop string it completed (text is cut before it), if any.

        check_stop is False while min_tokens is not reached: stop strings don't count yet.
        """
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return None
        new_text = full_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += new_text
        return self._check_stop(len(new_text)) if check_stop else None

    def _check_stop(self, num_new_chars: int) -> str | None:
        if not self.stop:
            return None
        # A stop string can only end inside the new text; it may start up to len-1 chars before it.
        start = max(0, len(self.text) - num_new_chars - self._max_stop_len + 1)
        best = None
        for s in self.stop:
            idx = self.text.find(s, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        self.text = self.text[: best[0]]
        return best[1]
