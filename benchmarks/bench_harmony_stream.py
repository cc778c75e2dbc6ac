"""Streaming a gpt-oss (harmony) reply as the server does (`ReasoningStream`, then `ToolCallStream`):
the channels kept as the text grows (`tool_syntax.GrowingMatches`) against searching the whole
reply again per piece (what `ReasoningStream` did before), same reply, same process.

    python benchmarks/bench_harmony_stream.py [--chars 32000] [--piece 4]

The reply: an analysis channel of about `chars`/2 characters, then a call whose argument is a file of
about `chars`/2; fed `piece` characters at a time (about a token). Prints the CPU features, seconds
both ways and the ratio; asserts the two give the same deltas.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

from lagoon.tool_calls import ReasoningStream, ToolCallDelta, ToolCallStream
from lagoon.tool_syntax import GrowingMatches


def cpu_features() -> str:
    flags: set[str] = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    keep = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "amx_tile") if f in flags]
    return f"{platform.machine()} {platform.processor() or ''} flags={','.join(keep) or 'none'}".strip()


class _Fresh(GrowingMatches):
    """The reference: a fresh search of the whole text every time."""

    def update(self, text: str) -> list:
        return self.spans(self.pattern, text)


def _run(reply: str, piece: int, fresh: bool) -> tuple[float, list]:
    thinking = ReasoningStream()
    if fresh:
        thinking._messages = _Fresh(thinking._messages.pattern, thinking._messages.closes)
        thinking._calls = _Fresh(thinking._calls.pattern, thinking._calls.closes)
    calls, out = ToolCallStream(tools=[]), []
    t0 = time.perf_counter()
    for i in range(0, len(reply) + piece, piece):
        final = i >= len(reply)
        for kind, text in thinking.feed(reply[i : i + piece], final):
            out += [(kind, text)] if kind == "reasoning" else list(calls.feed(text))
        if final:
            out += list(calls.feed("", final=True))
            break
    return time.perf_counter() - t0, [(d.index, d.name, d.arguments) if isinstance(d, ToolCallDelta) else d for d in out]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chars", type=int, default=32000)
    ap.add_argument("--piece", type=int, default=4)
    args = ap.parse_args()
    print(cpu_features())
    rng = random.Random(0)
    words = "the test imports a missing name so check a.py then run it again < ok".split()
    analysis = " ".join(rng.choice(words) for _ in range(args.chars // 10))[: args.chars // 2]
    body = json.dumps({"path": "src/a.py", "content": "x = {'k': 1} if a < b else None\n" * (args.chars // 64)})
    reply = (f"<|channel|>analysis<|message|>{analysis}<|end|><|start|>assistant<|channel|>commentary "
             f"to=functions.write_file <|constrain|>json<|message|>{body}")
    kept, got = _run(reply, args.piece, fresh=False)
    again, want = _run(reply, args.piece, fresh=True)
    assert got == want, "the two ways stream different deltas"
    print(f"{len(reply)} chars in {args.piece}-char pieces: kept {kept:.2f} s, searched again {again:.2f} s, "
          f"ratio {again / kept:.1f}x")


if __name__ == "__main__":
    main()
