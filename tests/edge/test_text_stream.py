"""edge.text_stream: what a streamed answer shows, byte by byte."""

from factedge.edge.text_stream import TextStream


def test_text_stream_is_utf8_safe_and_cuts_stop_strings():
    ts = TextStream(["END"])
    got = [ts.push(b) for b in (b" \xe5", b"\x85\x88 a", b"E", b"N", b"D tail")] + [ts.finish()]
    assert "".join(got) == ts.text == "\u5148 a" and ts.stopped
    assert all("\ufffd" not in g for g in got)
    ts = TextStream([])
    assert "".join([ts.push(b"\xf0\x9f"), ts.push(b"\x98\x80 "), ts.push(b" "), ts.finish()]) == "\U0001F600"
