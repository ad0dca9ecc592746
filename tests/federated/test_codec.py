"""Upload encodings: float32 as is, bfloat16 as the update; and a run with bfloat16 uploads."""

import pytest
import torch
from helpers import one_round

from spearfl.federated.codec import decode_upload, encode_upload, payload_bytes


def states():
    generator = torch.Generator().manual_seed(0)
    global_state = {"a": torch.randn(4, 3, generator=generator), "b": torch.randn(2, generator=generator)}
    trained = {name: tensor + 1e-3 * torch.randn(tensor.shape, generator=generator) for name, tensor in global_state.items()}
    return global_state, trained


def test_float32_sends_the_trained_state_unchanged():
    global_state, trained = states()
    payload = encode_upload(trained, global_state, "float32")
    assert payload_bytes(payload) == 4 * 14
    assert all(torch.equal(decode_upload(payload, global_state, "float32")[name], trained[name]) for name in trained)


def test_bfloat16_sends_the_update_in_half_the_bytes_and_keeps_it_to_bfloat16_precision():
    global_state, trained = states()
    payload = encode_upload(trained, global_state, "bfloat16")
    assert payload_bytes(payload) == 2 * 14 and {t.dtype for t in payload.values()} == {torch.bfloat16}
    received = decode_upload(payload, global_state, "bfloat16")
    for name in trained:
        update, received_update = trained[name] - global_state[name], received[name] - global_state[name]
        # bfloat16 keeps 8 significant bits: the update's relative error is at most 2^-8 (plus float32 rounding)
        assert torch.allclose(received_update, update, rtol=2**-8, atol=1e-7)
        # rounding the weights instead would have lost most of a 1e-3 update
        weights_rounded = trained[name].to(torch.bfloat16).float() - global_state[name]
        assert (weights_rounded - update).abs().max() > 10 * (received_update - update).abs().max()


def test_an_unknown_encoding_is_refused():
    global_state, trained = states()
    with pytest.raises(ValueError, match="unknown upload encoding 'int4'"):
        encode_upload(trained, global_state, "int4")


def test_a_round_with_bfloat16_uploads_counts_half_the_bytes_and_aggregates_the_decoded_updates(tmp_path, monkeypatch):
    (tmp_path / "float32").mkdir()
    (tmp_path / "bfloat16").mkdir()
    _, _, _, full = one_round(tmp_path / "float32", monkeypatch, "spear")
    _, _, _, half = one_round(tmp_path / "bfloat16", monkeypatch, "spear", "server.upload_encoding=bfloat16")
    for row_full, row_half in zip(full["clients"], half["clients"]):
        assert row_half["weight"] == row_full["weight"]
        assert row_half["metrics"]["upload_bytes"] * 2 == row_full["metrics"]["upload_bytes"]
    assert half["online"]["upload_bytes"] > 0


def test_a_work_order_takes_its_own_reply_once():
    from spearfl.federated.codec import InvalidReply, WorkOrders

    orders = WorkOrders()
    first, other = orders.issue(1, 0), orders.issue(1, 1)
    with pytest.raises(InvalidReply, match="replayed or forged"):
        orders.redeem(1, 0, other)  # another client's nonce
    with pytest.raises(InvalidReply, match="replayed or forged"):
        orders.redeem(1, 0, None)
    orders.redeem(1, 0, first)
    with pytest.raises(InvalidReply, match="duplicate or stale"):
        orders.redeem(1, 0, first)  # the same reply again
    second = orders.issue(2, 1)
    with pytest.raises(InvalidReply, match="replayed or forged"):
        orders.redeem(2, 1, other)  # round 1's nonce in round 2
    orders.redeem(2, 1, second)
    assert first != second and len(first) == 32
