"""OpenAI's `stop`: the output ends before the first stop string, which is never sent.

Text that could be the start of a stop string is held back until the next pieces settle it. Each
stop string is matched by a Knuth–Morris–Pratt automaton fed one character at a time, so the work
per piece is linear in the new text whatever the stop strings are.
"""
from __future__ import annotations


class _Matcher:
    """How much of `stop` the text seen so far ends with."""

    def __init__(self, stop: str):
        self.stop = stop
        self.matched = 0
        # fallback[i]: the longest proper prefix of stop[:i + 1] that is also its suffix
        self.fallback = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fallback[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fallback[i] = k

    def advance(self, char: str) -> bool:
        """Feed one character; True when the text now ends with the whole stop string."""
        k = self.matched
        while k and char != self.stop[k]:
            k = self.fallback[k - 1]
        if char == self.stop[k]:
            k += 1
        self.matched = k
        return k == len(self.stop)


class StopStrings:
    def __init__(self, stops: list[str]):
        self.matchers = [_Matcher(stop) for stop in stops if stop]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(the text that is safe to send now, whether a stop string was reached)."""
        if not self.matchers:
            return text, False
        pending = self.held + text
        offset = len(self.held)
        for i, char in enumerate(text):
            # every matcher sees the character; of stops ending here, the longest starts first
            ended = [len(matcher.stop) for matcher in self.matchers if matcher.advance(char)]
            if ended:
                self.held = ""
                return pending[:offset + i + 1 - max(ended)], True
        keep = max(matcher.matched for matcher in self.matchers)
        self.held = pending[len(pending) - keep:]
        return pending[:len(pending) - keep], False

    def flush(self) -> str:
        """The held text, once the output ended without reaching a stop string."""
        held, self.held = self.held, ""
        return held
