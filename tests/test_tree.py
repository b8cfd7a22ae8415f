"""``fscale.tree``: leaves, paths, flatten/unflatten and map, with None as a leaf,
dicts in sorted-key order, and nesting; each against values written out by hand."""

from __future__ import annotations

import collections

import pytest
import torch

from fscale import tree

# Insertion order differs from sorted order on purpose; None leaves at two depths.
NESTED = {"b": {"y": None, "x": 2}, "a": [1, (3, None)], "c": None}
NESTED_LEAVES = [1, 3, None, 2, None, None]
NESTED_PATHS = ["a.0", "a.1.0", "a.1.1", "b.x", "b.y", "c"]


def test_leaves_and_paths_in_sorted_key_order_with_none_leaves():
    assert tree.leaves(NESTED) == NESTED_LEAVES
    assert tree.paths(NESTED) == NESTED_PATHS


def test_paths_name_params_as_state_dicts_do():
    params = {"blocks": [{"attn": {"weight": 0, "bias": None}}], "wte": {"weight": 1}}
    assert tree.paths(params) == [
        "blocks.0.attn.bias",
        "blocks.0.attn.weight",
        "wte.weight",
    ]
    assert tree.leaves(params) == [None, 0, 1]


def test_a_lone_leaf_and_empty_containers():
    assert tree.leaves(None) == [None] and tree.paths(None) == [""]
    assert tree.leaves(torch.ones(2))[0].tolist() == [1.0, 1.0]
    assert tree.leaves({}) == [] and tree.paths({"a": [], "b": {}}) == []


def test_ordered_dict_keeps_its_order():
    od = collections.OrderedDict([("z", 1), ("a", 2)])
    assert tree.leaves(od) == [1, 2] and tree.paths(od) == ["z", "a"]


def test_flatten_unflatten_round_trip_keeps_key_order_and_none():
    leaves, spec = tree.flatten(NESTED)
    assert leaves == NESTED_LEAVES and spec.num_leaves == 6
    assert spec == tree.structure(NESTED)
    rebuilt = tree.unflatten(spec, leaves)
    assert rebuilt == NESTED
    assert list(rebuilt) == ["b", "a", "c"] and list(rebuilt["b"]) == ["y", "x"]
    assert isinstance(rebuilt["a"], list) and isinstance(rebuilt["a"][1], tuple)
    # New leaves land at the paths of the old ones, in leaves order.
    assert tree.unflatten(spec, [10, 20, 30, 40, 50, 60]) == {
        "b": {"y": 50, "x": 40},
        "a": [10, (20, 30)],
        "c": 60,
    }


def test_map_visits_none_leaves():
    seen = []

    def double(v):
        seen.append(v)
        return "none" if v is None else 2 * v

    assert tree.map(double, NESTED) == {
        "b": {"y": "none", "x": 4},
        "a": [2, (6, "none")],
        "c": "none",
    }
    assert seen == NESTED_LEAVES


def test_map_over_several_trees_pairs_leaves_by_path():
    grads = {"w": torch.tensor([1.0, 2.0]), "frozen": None}
    params = {"frozen": torch.tensor([5.0]), "w": torch.tensor([10.0, 20.0])}
    out = tree.map(lambda g, p: p if g is None else p - 0.5 * g, grads, params)
    assert out["w"].tolist() == [9.5, 19.0] and out["frozen"].tolist() == [5.0]
    assert list(out) == ["w", "frozen"]  # the first tree's order


@pytest.mark.parametrize(
    "other,detail",
    [
        ({"a": 1}, r"missing \['b'\]"),
        ({"a": 1, "b": 2, "c": 3}, r"unexpected \['c'\]"),
        ({"a": 1, "b": {"x": 2}}, r"missing \['b'\]; unexpected \['b\.x'\]"),
    ],
)
def test_map_names_the_path_that_differs(other, detail):
    with pytest.raises(ValueError, match=rf"tree argument 1 .*{detail}.*step\.init"):
        tree.map(lambda a, b: a, {"a": 1, "b": 2}, other)


def test_same_paths_different_containers_shows_both_structures():
    with pytest.raises(ValueError, match=r"state does not match.*expected structure.*\[\*, \*\]"):
        tree.assert_same_structure([1, 2], (1, 2), what="state")
    tree.assert_same_structure({"a": None, "b": [1]}, {"b": [7], "a": None})  # no error


def test_none_is_a_leaf_not_an_empty_subtree():
    """A frozen param's None grad keeps its slot: {"w": None} has one leaf, at "w"."""
    assert tree.structure({"w": None}).num_leaves == 1
    with pytest.raises(ValueError, match=r"missing \['w'\]"):
        tree.assert_same_structure({"w": None}, {})
