import pytest

from moe_uvm.config import ExpertOffloadConfig, parse_ids


@pytest.mark.parametrize(
    "text, ids",
    [("1, 2,,3,", (1, 2, 3)), (" 7 ", (7,)), ("", ()), (",,", ()), ([4, 0, 2], (4, 0, 2))],
)
def test_parse_ids_skips_empty_items(text, ids):
    assert parse_ids(text) == ids


@pytest.mark.parametrize(
    "text, message",
    [
        ("1,x", "'x' is not an expert id"),
        ("1,-2", "expert id -2 is negative"),
        ("3,1,3", "duplicate expert ids [3]"),
        ([1.5], "1.5 is not an expert id"),
        ([True], "True is not an expert id"),
        (12, "comma-separated string or a list"),
    ],
)
def test_parse_ids_rejects_bad_items(text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_ids(text)


def test_defaults_keep_everything_resident_and_never_oversubscribe():
    cfg = ExpertOffloadConfig()
    assert cfg.resident_counts(num_layers=3, num_experts=8) == [8, 8, 8]
    assert cfg.allow_oversubscription is False
    assert cfg.warmup_tokens == 4096 and cfg.min_batch_tokens == 1  # decode steps count
    assert cfg.resident_selection == "first_n" and cfg.prefetch == "none"


def test_num_resident_accepts_int_list_and_string():
    assert ExpertOffloadConfig(num_resident=4).resident_counts(2, 8) == [4, 4]
    assert ExpertOffloadConfig(num_resident=[1, -1]).resident_counts(2, 8) == [1, 8]
    assert ExpertOffloadConfig(num_resident="2,3").resident_counts(2, 8) == [2, 3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_resident=-2), "num_resident must be >= -1"),
        (dict(num_resident=[1, -5]), "num_resident per layer must be >= -1"),
        (dict(resident_selection="lru"), "resident_selection must be one of first_n, manual"),
        (dict(prefetch="always"), "prefetch must be one of none, frequency, speculative"),
        (dict(prefetch="speculative"), "needs prefetch_slots >= 1"),
        (dict(prefetch_slots=-1), "prefetch_slots must be >= 0"),
        (dict(prefetch_slots=4, prefetch_experts=5), r"prefetch_experts must be in \[1, "),
        (dict(resident_selection="manual"), "needs resident_ids"),
        (dict(resident_ids="1,2"), "only used with resident_selection='manual'"),
        (dict(resident_selection="profile"), "needs profile_path"),
        (dict(warmup_tokens=0), "warmup_tokens must be >= 1"),
        (dict(min_batch_tokens=0), "min_batch_tokens must be >= 1"),
    ],
)
def test_invalid_config_is_refused_with_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExpertOffloadConfig(**kwargs)


@pytest.mark.parametrize("budget", [-1, 0, 0.0, float("inf"), float("nan"), "nan", "x", True])
def test_gpu_budget_must_be_a_finite_positive_number_of_gb(budget):
    with pytest.raises(ValueError, match=r"gpu_budget_gb must be a finite number of GB > 0, got"):
        ExpertOffloadConfig(gpu_budget_gb=budget)


def test_gpu_budget_from_cli_text():
    assert ExpertOffloadConfig.from_kwargs(expert_offload_gpu_budget_gb="2.5").gpu_budget_gb == 2.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(resident_ids=[0, 1, 2], num_resident=2), "name 3 experts per layer but num_"
         "resident=2"),
        (dict(resident_ids=["0,1", "2"], num_resident=2), r"name \[2, 1\] experts but"),
        (dict(resident_ids=[0, 1], num_resident=[2, 1]), "name 2 experts per layer but"),
        (dict(resident_ids=["0", "1"], num_resident=[1, 1, 1]), "lists 3 layers but "
         "resident_ids 2"),
    ],
)
def test_resident_ids_and_a_disagreeing_num_resident_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExpertOffloadConfig(resident_selection="manual", **kwargs)


def test_resident_ids_with_an_agreeing_num_resident_are_accepted():
    cfg = ExpertOffloadConfig(resident_selection="manual", resident_ids="4,5", num_resident=[2, 2])
    assert cfg.resolve(2, 8, 100, 100).per_layer == (2, 2)
    cfg = ExpertOffloadConfig(resident_selection="manual", resident_ids="0,1,2", num_resident=-1)
    with pytest.raises(ValueError, match=r"num_resident=-1 \(all 8 experts\)"):
        cfg.resolve(1, 8, 100, 100)  # -1 = all needs the shape: refused in resolve


GB = 10**9


@pytest.mark.parametrize(
    "fields, per_layer",
    [
        (dict(num_resident=3), (3, 3)),
        (dict(num_resident=[1, 4]), (1, 4)),
        (dict(resident_selection="manual", resident_ids="2,5"), (2, 2)),
        (dict(num_resident=2, prefetch_slots=2), (2, 2)),
    ],
)
def test_explicit_counts_override_the_budget_split_when_they_fit(fields, per_layer):
    # 10 GB would hold every expert (2 layers x 8 x 0.5 GB): the explicit fields decide
    cfg = ExpertOffloadConfig(gpu_budget_gb=10, **fields)
    assert cfg.resolve(2, 8, GB // 2, GB // 4).per_layer == per_layer


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(num_resident=4), r"num_resident=4 needs 4 GB \(8 resident experts x 500000000 "
         r"bytes\), more than gpu_budget_gb=3, which holds 6 resident experts$"),
        (dict(resident_selection="manual", resident_ids="0,1,2,3"),
         r"resident_ids \(4 per layer\) needs 4 GB"),
        (dict(num_resident=2, prefetch_slots=3), r"num_resident=2 needs 2 GB .* and "
         r"prefetch_slots=3 needs 1.5 GB \(2 layers x 3 slots x 250000000 bytes\): 3.5 GB in "
         r"all, more than gpu_budget_gb=3, which holds 3 resident experts besides the slots"),
        (dict(prefetch_slots=7), r"prefetch_slots=7 needs 3.5 GB .*, more than gpu_budget_gb=3"),
    ],
)
def test_explicit_fields_beyond_the_budget_are_refused_naming_both(fields, message):
    cfg = ExpertOffloadConfig(gpu_budget_gb=3, **fields)
    with pytest.raises(ValueError, match=message):
        cfg.resolve(2, 8, GB // 2, GB // 4)


@pytest.mark.parametrize(
    "fields, most",
    [
        (dict(num_resident=4), 12),
        (dict(num_resident=[16, 10]), 6),
        (dict(num_resident=16), 0),
        (dict(gpu_budget_gb=1000), 0),  # the budget holds every expert
        (dict(gpu_budget_gb=10.4), 12),  # 20 of 32 experts resident: one layer keeps >= 4
        (dict(gpu_budget_gb=4), 16),  # 8 of 32: the split by counts may leave a layer none
    ],
)
def test_prefetch_slots_beyond_the_offloaded_experts_are_refused(fields, most):
    with pytest.raises(ValueError, match=rf"prefetch_slots=100, .* the maximum is {most}$"):
        ExpertOffloadConfig(prefetch_slots=100, **fields).resolve(2, 16, GB // 2, 1)
    if most:  # the maximum itself is fine
        ExpertOffloadConfig(prefetch_slots=most, **fields).resolve(2, 16, GB // 2, 1)


def test_resident_counts_checked_against_model_shape():
    with pytest.raises(ValueError, match="lists 3 layers but the model has 2"):
        ExpertOffloadConfig(num_resident=[1, 2, 3]).resident_counts(2, 8)
    with pytest.raises(ValueError, match=r"num_resident \[9\] exceeds the 8 experts"):
        ExpertOffloadConfig(num_resident=[9, 2]).resident_counts(2, 8)


def test_manual_ids_per_layer_and_range_checked():
    cfg = ExpertOffloadConfig(resident_selection="manual", resident_ids=["0,1", [5]])
    assert cfg.manual_ids(0, 2, 8) == (0, 1) and cfg.manual_ids(1, 2, 8) == (5,)
    with pytest.raises(ValueError, match=r"resident_ids \[9\] out of range \[0, 8\)"):
        ExpertOffloadConfig(resident_selection="manual", resident_ids="1,9").manual_ids(0, 1, 8)
    with pytest.raises(ValueError, match="gives 2 layers but the model has 3"):
        cfg.manual_ids(0, 3, 8)


def test_from_kwargs_takes_cli_names_and_rejects_unknown():
    cfg = ExpertOffloadConfig.from_kwargs(
        expert_offload_num_resident="3", expert_offload_prefetch="speculative",
        expert_offload_prefetch_slots=8,
    )
    assert cfg.num_resident == 3 and cfg.prefetch == "speculative"
    with pytest.raises(ValueError, match="unknown config fields"):
        ExpertOffloadConfig.from_kwargs(num_resdent=3)


def test_config_is_frozen():
    cfg = ExpertOffloadConfig()
    with pytest.raises(AttributeError):
        cfg.num_resident = 3


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf")])
def test_adaptive_poll_ms_must_be_a_finite_positive_number(value):
    with pytest.raises(ValueError, match="adaptive_poll_ms must be a finite number > 0"):
        ExpertOffloadConfig(adaptive_poll_ms=value)


@pytest.mark.parametrize("field, value", [("readvise_chunk_mb", -1.0), ("readvise_pause_ms", -0.5),
                                          ("readvise_chunk_mb", float("nan"))])
def test_readvise_pace_fields_are_checked(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number >= 0"):
        ExpertOffloadConfig(**{field: value})
