"""Tokenizer models for tests: another model of the embedded tokenizer's vocabulary size and EOS."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def swapped_model(path: Path) -> Path:
    """The embedded model with two ordinary pieces swapped: same size, same EOS, but two ids mean other tokens."""
    import sentencepiece.sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    model.ParseFromString((REPO / "tokenizer" / "embedded.model").read_bytes())
    a, b = [i for i, p in enumerate(model.pieces) if p.type == pb.ModelProto.SentencePiece.NORMAL][:2]
    model.pieces[a].piece, model.pieces[b].piece = model.pieces[b].piece, model.pieces[a].piece
    path.write_bytes(model.SerializeToString())
    return path
