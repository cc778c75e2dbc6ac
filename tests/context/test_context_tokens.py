"""The code-aware BM25 tokenizer."""

from lagoon.context.tokens import code_tokens, split_identifier


def test_splits_camel_snake_and_digits_keeping_the_whole_identifier():
    assert split_identifier("parseHTTPResponse2") == ("parsehttpresponse2", "parse", "http", "response")
    assert split_identifier("max_chunk_size") == ("max_chunk_size", "max", "chunk", "size")
    assert split_identifier("XMLParser") == ("xmlparser", "xml", "parser")
    assert split_identifier("__init__") == ("init",)
    assert split_identifier("utf8_decode") == ("utf8_decode", "utf", "decode")
    assert split_identifier("sha256sum") == ("sha256sum", "sha", "256", "sum")


def test_drops_stop_words_and_keeps_repeats():
    assert code_tokens("the parser and the Parser") == ["parser", "parser"]
    assert code_tokens("getValue(get_value)") == ["getvalue", "get", "value", "get_value", "get", "value"]
