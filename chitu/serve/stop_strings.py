"""OpenAI's `stop`: the output ends before the first stop string, which is never sent.

Text that could be the start of a stop string is held back until the next pieces settle it.
"""
from __future__ import annotations


class StopStrings:
    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(the text that is safe to send now, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        text = self.held + text
        hits = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        keep = max((n for stop in self.stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """The held text, once the output ended without reaching a stop string."""
        held, self.held = self.held, ""
        return held
