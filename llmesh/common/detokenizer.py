"""Incremental detokenization: token ids in, text deltas out, never splitting a UTF-8 character and
never emitting text past a stop string."""

from __future__ import annotations

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"


class StreamDecoder:
    """Decodes one request's token stream.

    Decodes only a short window (the tokens since the last emitted boundary) so the cost per token
    stays constant, and holds back text that could still become a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self._prefix = 0  # window start: decoding from here gives stable text
        self._read = 0  # tokens before this index have been turned into text
        self._pending = ""  # decoded but held back (possible stop-string prefix)
        self.text = ""  # everything emitted so far
        self.stopped = False

    def push(self, ids: list[int]) -> str:
        """Add generated ids; return the text that can be shown now."""
        if self.stopped or not ids:
            return ""
        self.ids.extend(ids)
        before = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=False)
        after = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=False)
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""  # an incomplete multi-byte character: wait for more tokens
        self._pending += after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The generation ended: release whatever is held back (up to a stop string)."""
        if self.stopped:
            return ""
        tail = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=False)
        before = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=False)
        if len(tail) > len(before):
            self._pending += tail[len(before) :].rstrip(REPLACEMENT)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop:
            cut = min((i for i in (self._pending.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                out, self._pending, self.stopped = self._pending[:cut], "", True
                self.text += out
                return out
        keep = 0 if final or not self.stop else max(len(s) for s in self.stop) - 1
        split = max(0, len(self._pending) - keep)
        out, self._pending = self._pending[:split], self._pending[split:]
        self.text += out
        return out
