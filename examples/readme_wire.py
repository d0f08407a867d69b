"""The README's wire-core snippet (``tests/test_readme.py`` checks the README shows it
verbatim; ``.ci/run`` type-checks it with ``mypy --strict``)."""

from __future__ import annotations

import rapace

desc = rapace.wire.MsgDescHot(
    msg_id=7,
    channel_id=3,
    flags=rapace.wire.FrameFlags.DATA,
    method_id=rapace.wire.compute_method_id("Calculator", "add"),
)
frame = rapace.wire.Frame.with_payload(desc, b"\x04\x06")  # inline: 16 bytes or fewer
wire = rapace.wire.encode_frame(frame)  # [len u32][descriptor][payload]
decoder = rapace.wire.FrameDecoder(max_payload_size=1 << 20)
frames = decoder.feed(wire)  # any split, many frames per call
if decoder.has_skipped:  # cheap: test it after every feed
    for skipped_desc, payload_len in decoder.take_skipped():  # oversized, in arrival order
        print(skipped_desc.channel_id, payload_len)  # e.g. fail the one call it belongs to
