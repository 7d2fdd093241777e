"""Decode the int-v1 and int-v2 LLM members of an archive with the NumPy engine (no torch at all).

    python spec/reference/decode_numpy.py ARCHIVE MODEL_FOLDER DEST

The container is read with llmarc's reader and the model-free layers (entropy.md) come
from llmarc; the logits come from :class:`int_numpy.IntReference`, the independent
implementation of spec/llm-codec.md §5.  Each decoded member is checked against its
SHA-256 and written below DEST.  It recomputes the whole prefix at every position
(quadratic), so it is meant for the small archives of the portability check.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from int_numpy import ATTENTION_LEVELS, IntReference  # noqa: E402


def decode(archive: Path, folder: Path, dest: Path) -> int:
    from transformers import AutoTokenizer  # the table only: the decoder never tokenizes

    import llmarc
    from llmarc.codecs.llm import apply_escapes, decode_params, parse_payload, parse_profile
    from llmarc.entropy.quantize import logits_to_frequencies
    from llmarc.entropy.rangecoder import RangeDecoder
    from llmarc.model.tokenbytes import build_token_bytes

    table = build_token_bytes(AutoTokenizer.from_pretrained(str(folder)))
    count = 0
    with llmarc.open(archive) as reader:
        for member in reader.members():
            if member.codec != "llm":
                continue
            entry = reader._entries[reader._index(member)]
            record = reader.models[decode_params(entry.codec_params)]
            profile = parse_profile(record.profile)
            if profile["engine"] not in ATTENTION_LEVELS:
                raise SystemExit(f"{member.name}: engine {profile['engine']} is not int-v1/v2")
            length, precision = profile["segment_length"], profile["precision"]
            payload = reader._llm_payload(member)
            n, escapes, streams = parse_payload(payload, member.size, length, True)
            engine = IntReference(folder, max_length=length, engine=profile["engine"])
            width = engine.linear["lm_head"][0].shape[0]
            padded = table + [None] * (width - len(table))
            start = reader_start_token(folder)
            text = bytearray()
            for index, stream in enumerate(streams):
                decoder = RangeDecoder(stream, precision)
                feed = [start]
                for _ in range(min(length, n - index * length)):
                    logits = engine.logits(feed)[-1]
                    token = decoder.decode(logits_to_frequencies(logits[None], precision)[0])
                    text += padded[token]
                    feed.append(token)
            data = apply_escapes(bytes(text), escapes)
            if hashlib.sha256(data).hexdigest() != member.sha256:
                raise SystemExit(f"{member.name}: SHA-256 mismatch")
            target = dest / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            count += 1
    return count


def reader_start_token(folder: Path) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    start = tokenizer.bos_token_id
    return start if start is not None else tokenizer.eos_token_id


if __name__ == "__main__":
    archive, folder, dest = (Path(a) for a in sys.argv[1:4])
    print(f"{decode(archive, folder, dest)} llm members decoded with the NumPy engine")
