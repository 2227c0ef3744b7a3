"""Test helpers: the package's tiny models (earlyexit.tiny) and a records writer."""

from earlyexit.tiny import BOS, EOS, PAD, TINY_CONFIGS, VOCAB, char_tokenizer, save_tiny, tiny_model

__all__ = ["BOS", "EOS", "PAD", "TINY_CONFIGS", "VOCAB", "char_tokenizer", "records_file", "save_tiny", "tiny_model"]


def records_file(tmp_path_factory, records: list[dict]) -> str:
    """Write Alpaca records to a fresh ``alpaca_data.json`` and return its path."""
    import json

    path = tmp_path_factory.mktemp("data") / "alpaca_data.json"
    path.write_text(json.dumps(records))
    return str(path)
