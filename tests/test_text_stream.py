"""Incremental decoding: pieces join into the full text; stop strings cut it, even across tokens,
and nothing after (or a partial stop string) is ever shown."""

from tinyllm.infer.text import TextStream


def _pieces(tok, text, stop=()):
    stream = TextStream(tok, stop)
    shown = []
    for token in tok.encode(text, add_special_tokens=False).ids:
        shown.append(stream.push(token))
        if stream.stopped:
            break
    shown.append(stream.finish())
    return shown, stream


def test_pieces_join_into_the_decoded_text_including_multibyte_characters(tokenizer):
    text = "李明住在杭州。He likes 🐱 cats."
    pieces, stream = _pieces(tokenizer, text)
    assert "".join(pieces) == text == stream.text and not stream.stopped
    assert all("\ufffd" not in p for p in pieces)


def test_a_stop_string_cuts_the_text_and_is_never_shown(tokenizer):
    pieces, stream = _pieces(tokenizer, "王芳是一名医生。END 这句不该出现", stop=["END"])
    assert stream.stopped and stream.text == "王芳是一名医生。"
    assert "".join(pieces) == "王芳是一名医生。"


def test_a_possible_stop_string_is_held_back_until_it_is_not_one(tokenizer):
    stream = TextStream(tokenizer, stop=["\n\n###"])
    shown = ""
    for token in tokenizer.encode("a\n\nb", add_special_tokens=False).ids:
        shown += stream.push(token)
        assert "\n\n" not in shown or "b" in shown  # the blank line waits until "b" rules the stop out
    shown += stream.finish()
    assert shown == "a\n\nb" and not stream.stopped


def test_a_stop_string_is_caught_at_the_end_and_before_a_half_character(tokenizer):
    ids = tokenizer.encode("答案是杭州", add_special_tokens=False).ids
    stream = TextStream(tokenizer, stop=["杭州"])
    shown = "".join(stream.push(t) for t in ids) + stream.finish()
    assert shown == "答案是" and stream.stopped
    stream = TextStream(tokenizer, stop=["是"])  # generation ends right after the stop string
    shown = "".join(stream.push(t) for t in tokenizer.encode("答案是", add_special_tokens=False).ids)
    assert shown + stream.finish() == "答案" and stream.stopped
