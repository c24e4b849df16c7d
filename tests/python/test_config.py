"""EchoConfig: the seed's fields, defaults and messages, plus ours."""

import dataclasses
import math

import pytest

from attention_echo import AttentionEchoCache, EchoConfig


def test_seed_defaults():
    c = EchoConfig()
    assert c.capacity == 1000
    assert c.similarity_threshold == 0.85
    assert c.max_prefix_length == 2048
    assert c.adjustment_strength == 0.1
    assert c.enable_jacobian is True
    assert c.hash_dim == 128
    assert c.eviction_policy == "lru"
    assert c.per_layer is False


def test_our_fields_exist_with_sane_defaults():
    c = EchoConfig()
    assert c.mode in ("exact", "sparse", "dense")
    assert c.max_bytes > 0
    assert c.max_error >= 0
    assert c.verify_rows >= 1
    assert 0 <= c.length_tolerance <= 1
    assert c.threads >= 0
    assert 0 < c.sparse_mass <= 1
    assert c.block_size in (32, 64, 128)


def test_is_a_dataclass_with_keywords_and_positionals():
    c = EchoConfig(capacity=5, similarity_threshold=0.9, eviction_policy="lfu", mode="dense")
    assert (c.capacity, c.similarity_threshold, c.eviction_policy, c.mode) == (5, 0.9, "lfu", "dense")
    assert EchoConfig(7, 0.5).capacity == 7
    assert dataclasses.asdict(c)["capacity"] == 5
    assert dataclasses.replace(c, capacity=9).capacity == 9
    assert EchoConfig(capacity=3) == EchoConfig(capacity=3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"capacity": 0}, "capacity must be positive"),
        ({"capacity": -5}, "capacity must be positive"),
        ({"similarity_threshold": 1.5}, "similarity_threshold must be between 0 and 1"),
        ({"similarity_threshold": -0.1}, "similarity_threshold must be between 0 and 1"),
        ({"similarity_threshold": math.nan}, "similarity_threshold must be between 0 and 1"),
        ({"adjustment_strength": 1.5}, "adjustment_strength must be between 0 and 1"),
        ({"adjustment_strength": -0.1}, "adjustment_strength must be between 0 and 1"),
    ],
)
def test_seed_validation_messages(kwargs, message):
    with pytest.raises(ValueError) as err:
        EchoConfig(**kwargs)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_prefix_length", 0),
        ("adjustment_strength", -1.0),
        ("hash_dim", 0),
        ("eviction_policy", "fifo"),
        ("max_bytes", 0),
        ("mode", "fast"),
        ("max_error", -0.1),
        ("verify_rows", 0),
        ("length_tolerance", 2.0),
        ("threads", -1),
        ("sparse_mass", 0.0),
        ("block_size", 48),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError) as err:
        EchoConfig(**{field: value})
    assert str(err.value).startswith(field)


def test_infinite_max_error_turns_the_guard_off():
    assert EchoConfig(max_error=math.inf).max_error == math.inf


@pytest.mark.parametrize("field, value", [("capacity", "many"), ("per_layer", "yes"), ("mode", 3)])
def test_wrong_types_raise_type_error_naming_the_field(field, value):
    with pytest.raises(TypeError) as err:
        EchoConfig(**{field: value})
    assert str(err.value).startswith(field)


def test_unknown_field_is_a_type_error():
    with pytest.raises(TypeError):
        EchoConfig(capacityy=3)


def test_cache_reports_its_config_and_rejects_non_configs():
    cache = AttentionEchoCache(EchoConfig(capacity=12, mode="dense"))
    assert cache.config.capacity == 12 and cache.config.mode == "dense"
    assert AttentionEchoCache().config == EchoConfig()
    with pytest.raises(TypeError):
        AttentionEchoCache({"capacity": 3})


def test_config_mutated_after_construction_is_revalidated_by_the_cache():
    c = EchoConfig()
    c.capacity = 0
    with pytest.raises(ValueError, match="^capacity must be positive$"):
        AttentionEchoCache(c)
