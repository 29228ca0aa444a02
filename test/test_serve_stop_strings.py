"""OpenAI `stop` strings over streamed pieces: cut before the first stop, never send a part of one."""
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
