"""Profiles: counting from traces, JSON round trip, and every kind of bad file refused."""

import json

import numpy as np
import pytest

from moe_uvm.profile import FORMAT, VERSION, Profile, ProfileError, load_profile
from moe_uvm.trace import synthetic_trace


def small_trace(seed=0, padding=0.1):
    trace = synthetic_trace(3, 10, 3, num_sequences=4, tokens_per_sequence=20, seed=seed)
    ids = trace.topk_ids.copy()
    ids[np.random.default_rng(seed).random(ids.shape) < padding] = -1
    return type(trace)(ids, trace.num_experts, trace.top_k, trace.seq_starts)


def test_from_trace_counts_match_loop_reference():
    trace = small_trace(seed=3)
    profile = Profile.from_trace(trace, cooccurrence=True, model_id="toy")
    L, T, _ = trace.topk_ids.shape
    counts = np.zeros((L, 10), np.int64)
    co = np.zeros((L - 1, 10, 10), np.int64)
    for layer in range(L):
        for t in range(T):
            here = [e for e in trace.topk_ids[layer, t] if e >= 0]
            for a in here:
                counts[layer, a] += 1
            if layer + 1 < L:
                for a in here:
                    for b in trace.topk_ids[layer + 1, t]:
                        if b >= 0:
                            co[layer, a, b] += 1
    np.testing.assert_array_equal(profile.counts, counts)
    np.testing.assert_array_equal(profile.cooccurrence, co)
    assert (profile.num_tokens, profile.top_k, profile.model_id) == (T, 3, "toy")


@pytest.mark.parametrize("cooccurrence", [False, True])
def test_save_load_round_trip(tmp_path, cooccurrence):
    profile = Profile.from_trace(small_trace(), cooccurrence=cooccurrence, model_id="m/x")
    path = tmp_path / "p.json"
    profile.save(path)
    loaded = load_profile(path)
    np.testing.assert_array_equal(loaded.counts, profile.counts)
    assert (loaded.cooccurrence is None) == (not cooccurrence)
    if cooccurrence:
        np.testing.assert_array_equal(loaded.cooccurrence, profile.cooccurrence)
    assert (loaded.num_layers, loaded.num_experts, loaded.top_k, loaded.num_tokens,
            loaded.model_id) == (3, 10, 3, 80, "m/x")


def write_variant(tmp_path, **changes):
    data = Profile.from_trace(small_trace(), cooccurrence=True).to_json()
    for key, value in changes.items():
        if value is KeyError:
            del data[key]
        else:
            data[key] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


def counts_with(value, where=(0, 0)):
    counts = Profile.from_trace(small_trace()).counts.tolist()
    counts[where[0]][where[1]] = value
    return counts


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"version": VERSION + 1}, "version 2 is not supported"),
        ({"version": True}, "version True is not supported"),
        ({"format": "something-else"}, "format tag"),
        ({"num_layers": 4}, r"counts has shape \(3, 10\), expected \(4, 10\)"),
        ({"num_experts": 0}, "num_experts must be an integer >= 1"),
        ({"top_k": 11}, "top_k .* exceeds num_experts"),
        ({"num_tokens": -1}, "num_tokens must be an integer >= 0"),
        ({"num_tokens": 2.5}, "num_tokens must be an integer"),
        ({"counts": KeyError}, r"missing fields \['counts'\]"),
        ({"extra": 1}, r"unknown fields \['extra'\]"),
        ({"counts": [[1, 2], [3]]}, "ragged"),
        ({"counts": counts_with(-3)}, r"counts must be >= 0, found -3 at index \[0, 0\]"),
        ({"counts": counts_with(1.5)}, "must hold integers"),
        ({"counts": counts_with("7")}, "must hold integers"),
        ({"counts": counts_with(81)}, "above num_tokens=80"),
        ({"cooccurrence": [[[0]]]}, r"cooccurrence has shape \(1, 1, 1\), expected \(2, 10, 10\)"),
        ({"model_id": 5}, "model_id must be a string"),
    ],
)
def test_bad_profiles_are_refused_with_the_reason(tmp_path, changes, message):
    path = write_variant(tmp_path, **changes)
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_layer_counts_above_tokens_times_top_k_are_refused(tmp_path):
    counts = np.zeros((3, 10), np.int64)
    counts[1, :4] = 80  # 320 routings in 80 tokens of top-3
    with pytest.raises(ProfileError, match="layer 1 sum to 320"):
        Profile(3, 10, 3, 80, counts)


def test_cooccurrence_above_the_counts_is_refused():
    profile = Profile.from_trace(small_trace(), cooccurrence=True)
    co = profile.cooccurrence.copy()
    co[1, 2, 3] = profile.counts[1, 2] + 1
    with pytest.raises(ProfileError, match=r"cooccurrence\[1\]\[2\]\[3\]"):
        Profile(3, 10, 3, 80, profile.counts, co)


def test_truncated_file_is_refused_as_invalid_json(tmp_path):
    path = tmp_path / "p.json"
    Profile.from_trace(small_trace()).save(path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(path)


@pytest.mark.parametrize("content, message", [("[1, 2]", "expected a JSON object"),
                                              ("", "not valid JSON")])
def test_non_object_or_empty_file_is_refused(tmp_path, content, message):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(ProfileError, match=message):
        load_profile(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ProfileError, match="no such file"):
        load_profile(tmp_path / "nope.json")


def test_check_matches_refuses_another_model_shape():
    profile = Profile.from_trace(small_trace(), model_id="toy")
    profile.check_matches(3, 10, 3)
    with pytest.raises(ProfileError, match=r"profile \(toy\) is for 3 MoE layers x 10 experts, "
                                           r"top-3; the model has 48 x 128, top-8"):
        profile.check_matches(48, 128, 8)


def test_merge_adds_counts_and_tokens():
    a = Profile.from_trace(small_trace(seed=1), cooccurrence=True, model_id="toy")
    b = Profile.from_trace(small_trace(seed=2), cooccurrence=True)
    merged = a.merge(b)
    np.testing.assert_array_equal(merged.counts, a.counts + b.counts)
    np.testing.assert_array_equal(merged.cooccurrence, a.cooccurrence + b.cooccurrence)
    assert merged.num_tokens == 160 and merged.model_id == "toy"
    assert a.merge(Profile.from_trace(small_trace(seed=2))).cooccurrence is None


def test_merge_refuses_other_shapes_and_other_models():
    a = Profile.from_trace(small_trace(), model_id="a")
    with pytest.raises(ProfileError, match="different models"):
        a.merge(Profile.from_trace(small_trace(), model_id="b"))
    other = synthetic_trace(2, 10, 3, num_sequences=1, tokens_per_sequence=8)
    with pytest.raises(ProfileError, match="2 MoE layers"):
        a.merge(Profile.from_trace(other))


def test_saved_file_names_its_format_and_version(tmp_path):
    path = tmp_path / "p.json"
    Profile.from_trace(small_trace()).save(path)
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["version"] == VERSION
    assert not (tmp_path / "p.json.tmp").exists()


@pytest.mark.parametrize("changes", [
    {"num_tokens": 0, "counts": [[0] * 10] * 3, "cooccurrence": KeyError},
    {"counts": [[0] * 10] * 3, "cooccurrence": KeyError},
])
def test_profiles_that_recorded_no_routing_are_refused_at_load(tmp_path, changes):
    path = write_variant(tmp_path, **changes)
    with pytest.raises(ProfileError, match="nothing to rank experts by") as info:
        load_profile(path)
    assert str(path) in str(info.value)
