"""OpenAI `stop` strings over streamed pieces: cut before the first stop, never send a part of one."""
import random

from chitu.serve.stop_strings import StopStrings


def feed_all(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    matcher = StopStrings(stops)
    sent = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        sent.append(text)
        if stopped:
            return sent, True
    return sent + [matcher.flush()], False


def test_stop_split_across_pieces_is_held_then_cut():
    assert feed_all(["END"], ["Hello E", "N", "D there"]) == (["Hello ", "", ""], True)


def test_held_prefix_is_released_when_it_is_not_a_stop():
    assert feed_all(["END"], ["Hello E", "N", "o"]) == (["Hello ", "", "ENo", ""], False)


def test_earliest_of_several_stops_wins():
    assert feed_all(["b", "xa"], ["zzxab"]) == (["zz"], True)


def test_held_text_is_flushed_at_the_end():
    assert feed_all([".\n"], ["One.", ""]) == (["One", "", "."], False)


def test_no_stops_passes_text_through():
    assert feed_all([], ["a", "b"]) == (["a", "b", ""], False)


def test_longest_of_stops_ending_together_wins():
    assert feed_all(["b", "ab"], ["xxab"]) == (["xx"], True)


def reference_cut(stops: list[str], text: str) -> tuple[str, bool]:
    """The text up to the first position where a stop string ends (cut before the longest such stop)."""
    for end in range(1, len(text) + 1):
        ended = [len(s) for s in stops if text[:end].endswith(s)]
        if ended:
            return text[:end - max(ended)], True
    return text, False


def test_random_texts_and_stops_match_the_definition():
    rng = random.Random(0)
    for _ in range(2000):
        stops = ["".join(rng.choices("ab", k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choices("abc", k=rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 5))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        sent, stopped = feed_all(stops, pieces)
        assert ("".join(sent), stopped) == reference_cut(stops, text), (stops, pieces)
        # streaming never sends text that a later piece turns into the start of a stop string
        for k in range(1, len(sent)):
            assert reference_cut(stops, text)[0].startswith("".join(sent[:k]))
