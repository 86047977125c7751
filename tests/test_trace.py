"""Routing traces: loading, validation naming the key, sequence selection, synthesis."""

import numpy as np
import pytest

from moe_uvm.trace import (
    SAMPLE_TRACE,
    RoutingTrace,
    TraceError,
    load_trace,
    parse_range,
    synthetic_trace,
    trace_path,
)


def write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def valid_arrays():
    trace = synthetic_trace(2, 6, 2, num_sequences=3, tokens_per_sequence=4)
    return {"topk_ids": trace.topk_ids, "num_experts": np.int32(6), "top_k": np.int32(2),
            "seq_starts": trace.seq_starts}


def test_bundled_sample_trace_is_valid_and_small():
    trace = load_trace(SAMPLE_TRACE)
    assert trace.topk_ids.shape == (8, 1024, 8)
    assert (trace.num_experts, trace.top_k, trace.num_sequences) == (128, 8, 8)
    assert SAMPLE_TRACE.stat().st_size < 200_000


def test_save_load_round_trip_with_weights(tmp_path):
    trace = synthetic_trace(3, 8, 2, num_sequences=2, tokens_per_sequence=5, seed=4)
    weights = np.random.default_rng(0).random(trace.topk_ids.shape).astype(np.float16)
    trace = RoutingTrace(trace.topk_ids, 8, 2, trace.seq_starts, weights)
    trace.save(tmp_path / "t.npz")
    loaded = load_trace(tmp_path / "t.npz")
    np.testing.assert_array_equal(loaded.topk_ids, trace.topk_ids)
    np.testing.assert_array_equal(loaded.seq_starts, trace.seq_starts)
    np.testing.assert_array_equal(loaded.topk_weights, weights)


def test_missing_seq_starts_means_one_sequence(tmp_path):
    arrays = valid_arrays()
    del arrays["seq_starts"]
    trace = load_trace(write_npz(tmp_path / "t.npz", **arrays))
    assert trace.num_sequences == 1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"topk_ids": None}, r"missing key\(s\) \['topk_ids'\]"),
        ({"num_experts": None}, r"missing key\(s\) \['num_experts'\]"),
        ({"num_experts": np.array([6, 6])}, "'num_experts' must be an integer scalar"),
        ({"top_k": np.float32(2)}, "'top_k' must be an integer scalar"),
        ({"top_k": np.int32(3)}, "top_k is 3 but topk_ids has 2 ids per token"),
        ({"num_experts": np.int32(4)}, r"topk_ids must lie in \[-1, 4\)"),
        ({"topk_ids": np.full((2, 12, 2), -2, np.int16)}, r"topk_ids must lie in \[-1, 6\)"),
        ({"topk_ids": np.zeros((2, 12, 2), np.float32)}, "topk_ids must be an integer array"),
        ({"topk_ids": np.zeros((12, 2), np.int32)}, "topk_ids must be an integer array"),
        ({"seq_starts": np.array([1, 4], np.int32)}, "seq_starts must be strictly increasing"),
        ({"seq_starts": np.array([0, 4, 4], np.int32)}, "seq_starts must be strictly increasing"),
        ({"seq_starts": np.array([0, 12], np.int32)}, "below 12 tokens"),
        ({"topk_weights": np.zeros((2, 12, 3), np.float32)}, "topk_weights must be a float"),
    ],
)
def test_invalid_traces_are_refused_naming_the_key(tmp_path, change, message):
    arrays = valid_arrays()
    for key, value in change.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    path = write_npz(tmp_path / "t.npz", **arrays)
    with pytest.raises(TraceError, match=message) as info:
        load_trace(path)
    assert str(path) in str(info.value)


def test_truncated_or_foreign_files_are_refused(tmp_path):
    path = write_npz(tmp_path / "t.npz", **valid_arrays())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="trace"):
        load_trace(path)
    np.save(tmp_path / "a.npy", np.zeros(3))
    with pytest.raises(TraceError, match="not an .npz archive"):
        load_trace(tmp_path / "a.npy")
    (tmp_path / "x.npz").write_text("hello")
    with pytest.raises(TraceError, match="not a numpy .npz archive"):
        load_trace(tmp_path / "x.npz")
    with pytest.raises(TraceError, match="no such file"):
        load_trace(tmp_path / "missing.npz")


def test_sequences_select_whole_sequences_and_rebase_starts():
    trace = synthetic_trace(2, 8, 2, num_sequences=4, tokens_per_sequence=3, seed=1)
    part = trace.sequences(1, 3)
    np.testing.assert_array_equal(part.topk_ids, trace.topk_ids[:, 3:9])
    assert part.seq_starts.tolist() == [0, 3]
    assert trace.sequences(-1, None).num_tokens == 3
    with pytest.raises(TraceError, match="select nothing; the trace has 4 sequences"):
        trace.sequences(3, 2)
    with pytest.raises(TraceError, match="4:8 go past the trace's 4 sequences"):
        trace.sequences(4, 8)


@pytest.mark.parametrize("text, expected", [("0:8", (0, 8)), (":8", (0, 8)), ("8:", (8, None)),
                                            ("-4:", (-4, None))])
def test_parse_range(text, expected):
    assert parse_range(text) == expected


@pytest.mark.parametrize("text", ["8", "a:b", "1:2:3"])
def test_parse_range_refuses_malformed_text(text):
    with pytest.raises(TraceError, match="FIRST:STOP"):
        parse_range(text)


def test_synthetic_trace_draws_distinct_experts_with_skew():
    trace = synthetic_trace(4, 32, 4, num_sequences=4, tokens_per_sequence=64,
                            zipf_exponent=1.2, seed=3)
    ids = trace.topk_ids
    assert ids.shape == (4, 256, 4) and ids.min() >= 0 and ids.max() < 32
    assert all(len(set(row)) == 4 for row in ids.reshape(-1, 4).tolist())
    counts = np.sort(np.bincount(ids[0].ravel(), minlength=32))[::-1]
    assert counts[:8].sum() > 0.4 * counts.sum()  # top quarter of experts: well above 25%


def test_the_sample_name_loads_the_bundled_trace():
    assert trace_path("sample") == SAMPLE_TRACE
    np.testing.assert_array_equal(load_trace("sample").topk_ids, load_trace(SAMPLE_TRACE).topk_ids)


@pytest.mark.parametrize("content, message", [
    (b"", "empty file, not a numpy .npz archive"),
    (b"num_experts,top_k\n128,8\n", "not a numpy .npz archive"),
])
def test_files_that_are_not_npz_archives_are_named_so_without_pickle_advice(
        tmp_path, content, message):
    path = tmp_path / "t.npz"
    path.write_bytes(content)
    with pytest.raises(TraceError, match=message) as info:
        load_trace(path)
    assert "pickle" not in str(info.value)


def test_object_arrays_are_refused_without_pickle_advice(tmp_path):
    arrays = valid_arrays()
    arrays["topk_ids"] = arrays["topk_ids"].astype(object)
    path = tmp_path / "t.npz"
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(TraceError, match="'topk_ids' is damaged or not a numeric array") as info:
        load_trace(path)
    assert "pickle" not in str(info.value)


@pytest.mark.parametrize("ids, message", [
    (np.zeros((2, 0, 2), np.int16), r"shape \(2, 0, 2\): a trace needs at least one layer and "
                                    "one token"),
    (np.full((2, 4, 2), -1, np.int16), "every expert id is -1"),
])
def test_traces_without_routed_tokens_are_refused(ids, message):
    with pytest.raises(TraceError, match=message):
        RoutingTrace(ids, 6, 2, np.zeros(1, np.int32))


def test_repeated_expert_in_a_tokens_top_k_is_refused_naming_layer_token_and_id():
    ids = synthetic_trace(2, 6, 3, num_sequences=1, tokens_per_sequence=5).topk_ids.copy()
    ids[1, 3] = [4, -1, 4]
    with pytest.raises(TraceError, match="layer 1, token 3: expert 4 appears more than once"):
        RoutingTrace(ids, 6, 3, np.zeros(1, np.int32))
    ids[1, 3] = [4, -1, -1]  # repeated padding is fine
    RoutingTrace(ids, 6, 3, np.zeros(1, np.int32))


def test_selected_sequences_without_routing_are_refused():
    ids = synthetic_trace(1, 6, 2, num_sequences=2, tokens_per_sequence=3).topk_ids.copy()
    ids[:, 3:] = -1
    trace = RoutingTrace(ids, 6, 2, np.array([0, 3], np.int32))
    with pytest.raises(TraceError, match="sequences 1:: every expert id is -1"):
        trace.sequences(1, None)


@pytest.mark.parametrize("first, stop", [(0, 5), (4, None), (-5, None), (0, -5)])
def test_sequence_bounds_past_the_trace_are_refused_not_clamped(first, stop):
    trace = synthetic_trace(1, 6, 2, num_sequences=4, tokens_per_sequence=3)
    with pytest.raises(TraceError, match="go past the trace's 4 sequences"):
        trace.sequences(first, stop)


def test_the_bundled_flat_trace_is_near_uniform_and_24_layers_deep():
    trace = load_trace("flat")
    assert (trace.num_layers, trace.num_experts, trace.top_k) == (24, 128, 8)
    for layer in range(trace.num_layers):
        counts = np.sort(np.bincount(trace.topk_ids[layer].ravel(), minlength=128))[::-1]
        top_half = counts[:64].sum() / counts.sum()
        assert 0.5 < top_half < 0.7  # near-uniform: 0.5 would be exactly uniform
