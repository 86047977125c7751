"""Calibration from a transformers model: the profile counts exactly what each block's router
chose (tokens x top_k per layer), co-occurrence pairs each token's experts across consecutive MoE
layers, the trace agrees with the profile, and prompt files are read or refused by line."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from moe_uvm.config import ExpertOffloadConfig  # noqa: E402
from moe_uvm.integrations import hf  # noqa: E402
from moe_uvm.profile import Profile, load_profile  # noqa: E402
from moe_uvm.trace import load_trace  # noqa: E402

from helpers import COMMON, tiny_model  # noqa: E402

PROMPTS = [[5, 9, 17, 3, 40], [7, 7, 8, 60, 61, 62, 90], [11, 12, 13, 14]]


def write_jsonl(path, prompts):
    path.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts))
    return path


def router_counts(model, prompts):
    """Per-MoE-layer expert counts seen at the routers' outputs (a different hook point from
    calibrate's, which watches the experts' inputs)."""
    blocks = hf.find_moe_blocks(model)
    counts = np.zeros((len(blocks), blocks[0].num_experts), np.int64)

    def count(layer, module, args, output):
        counts[layer] += np.bincount(output[2].flatten().numpy(), minlength=counts.shape[1])

    hooks = [b.module.gate.register_forward_hook(lambda m, a, o, i=i: count(i, m, a, o))
             for i, b in enumerate(blocks)]
    with torch.no_grad():
        for ids in prompts:
            model(input_ids=torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    return counts


def test_calibrated_profile_counts_the_routers_choices_and_drives_residency(tmp_path, seed):
    model = tiny_model("deepseek_v3", seed)
    model.save_pretrained(tmp_path / "model")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    profile = hf.calibrate_model(tmp_path / "model", prompts, trace_out=tmp_path / "trace.npz",
                                 progress=False)
    T, k = sum(map(len, PROMPTS)), 2
    assert (profile.num_layers, profile.num_experts, profile.top_k, profile.num_tokens) == (
        2, 8, k, T)
    assert profile.counts.sum(axis=1).tolist() == [T * k] * 2
    assert profile.cooccurrence.sum(axis=(1, 2)).tolist() == [T * k * k]
    np.testing.assert_array_equal(profile.counts, router_counts(model, PROMPTS),
                                  err_msg=f"seed {seed}")
    profile.save(tmp_path / "profile.json")
    again = load_profile(tmp_path / "profile.json")
    again.check_matches(2, 8, k)
    np.testing.assert_array_equal(again.counts, profile.counts)
    trace = load_trace(tmp_path / "trace.npz")
    assert trace.topk_ids.shape == (2, T, k) and trace.seq_starts.tolist() == [0, 5, 12]
    from_trace = Profile.from_trace(trace, cooccurrence=True)
    np.testing.assert_array_equal(from_trace.counts, profile.counts)
    np.testing.assert_array_equal(from_trace.cooccurrence, profile.cooccurrence)
    # The profile drives residency: the 3 resident experts of a layer are its most-routed ones.
    config = ExpertOffloadConfig(
        num_resident=3, resident_selection="profile", profile_path=str(tmp_path / "profile.json")
    )
    manager = hf.load_offloaded(tmp_path / "model", config).manager
    for layer, counts in enumerate(profile.counts):
        resident = list(manager.resident_ids(layer))
        offloaded = [e for e in range(8) if e not in resident]
        assert len(resident) == 3 and counts[resident].min() >= counts[offloaded].max()


def test_calibration_stops_at_max_tokens(tmp_path, seed):
    model = tiny_model("qwen3_moe", seed)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    profile = hf.calibrate_model(model, prompts, max_tokens=9, progress=False)
    assert profile.num_tokens == 9
    assert profile.counts.sum(axis=1).tolist() == [9 * 2] * 2
    expected = router_counts(model, [PROMPTS[0], PROMPTS[1][:4]])
    np.testing.assert_array_equal(profile.counts, expected)


def test_text_prompts_use_the_checkpoint_tokenizer(tmp_path, seed):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_model("olmoe", seed)
    model.save_pretrained(tmp_path / "model")
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0").save_pretrained(
        tmp_path / "model")
    (tmp_path / "prompts.txt").write_text("w5 w9 w17\n\nw40 w41\n")
    profile = hf.calibrate_model(tmp_path / "model", tmp_path / "prompts.txt", progress=False)
    assert profile.num_tokens == 5
    np.testing.assert_array_equal(profile.counts, router_counts(model, [[5, 9, 17], [40, 41]]))


def test_text_prompts_without_a_tokenizer_ask_for_token_ids(tmp_path, seed):
    tiny_model("olmoe", seed).save_pretrained(tmp_path / "model")
    (tmp_path / "prompts.txt").write_text("hello world\n")
    with pytest.raises(ValueError, match=r"prompts\.txt:1 is text but the checkpoint .* has no "
                       r"tokenizer .*give token ids instead"):
        hf.calibrate_model(tmp_path / "model", tmp_path / "prompts.txt", progress=False)


def test_token_ids_outside_the_vocabulary_refused(tmp_path, seed):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [[1, 2], [3, COMMON["vocab_size"]]])
    with pytest.raises(ValueError, match=r"prompts\.jsonl:2: token ids \[96\] outside the "
                       r"vocabulary \[0, 96\)"):
        hf.calibrate_model(tiny_model("olmoe", seed), prompts, progress=False)


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"input_ids": [1]}', "{oops"], r"prompts\.jsonl:2: not valid JSON"),
        (['{"prompt": "hi"}'], r'prompts\.jsonl:1: expected an object with "text"'),
        (['{"input_ids": [1, -2]}'], r"prompts\.jsonl:1: input_ids must be a non-empty list"),
        (['{"input_ids": []}'], r"prompts\.jsonl:1: input_ids must be a non-empty list"),
        (["", "  "], r"prompts\.jsonl: no prompts"),
    ],
)
def test_malformed_prompt_files_refused_by_line(tmp_path, lines, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        hf.read_prompts(path)


def test_prompt_files_read_text_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond\n")
    assert hf.read_prompts(tmp_path / "p.txt") == [(1, "first prompt"), (3, "second")]
    (tmp_path / "p.jsonl").write_text('{"text": "a b"}\n{"input_ids": [4, 5]}\n')
    assert hf.read_prompts(tmp_path / "p.jsonl") == [(1, "a b"), (2, [4, 5])]
