import itertools
import random
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supernet import DARTS_GENOTYPES, Genotype, NB201Genotype, get_space, list_spaces
from supernet.spaces import NB201_OPS, PRIMITIVES

DARTS = get_space("darts")
NB201 = get_space("nb201")


def test_registry_lists_and_finds_spaces():
    assert list_spaces() == ["darts", "nb201"]
    assert list_spaces("nb*") == ["nb201"]
    assert DARTS.ops == PRIMITIVES and len(PRIMITIVES) == 8 and PRIMITIVES[0] == "none"
    assert NB201.ops == ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
    assert DARTS.num_edges == 14 and NB201.num_edges == 6
    with pytest.raises(ValueError, match=r"unknown search space 'nasbench101'.*darts"):
        get_space("nasbench101")


# --- genotype strings ---------------------------------------------------------------------------
@st.composite
def darts_genotypes(draw, nodes=st.integers(1, 6), ops=st.sampled_from(PRIMITIVES + ("sep_conv_7x7",))):
    fields = {}
    for cell in ("normal", "reduce"):
        n = draw(nodes)
        fields[cell] = [(draw(ops), draw(st.integers(0, i + 1))) for i in range(n) for _ in range(2)]
        # concat names distinct intermediate nodes (2..n+1); inputs 0 and 1 are not results
        fields[cell + "_concat"] = draw(st.lists(st.integers(2, n + 1), min_size=1, max_size=n, unique=True))
    return Genotype(**fields)


@given(darts_genotypes())
@settings(max_examples=60, deadline=None)
def test_darts_genotypes_round_trip_through_their_string(genotype):
    text = DARTS.format(genotype)
    assert text.startswith("Genotype(normal=[(")
    assert DARTS.parse(text) == genotype
    assert hash(DARTS.parse(text)) == hash(genotype)


@given(st.lists(st.sampled_from(NB201_OPS), min_size=6, max_size=6))
def test_nb201_genotypes_round_trip_through_arch_strings(ops):
    text = "|{}~0|+|{}~0|{}~1|+|{}~0|{}~1|{}~2|".format(*ops)
    genotype = NB201.parse(text)
    assert str(genotype) == NB201.format(genotype) == text
    assert NB201.from_paths(NB201.to_paths(genotype)) == genotype


def test_named_genotypes_print_exactly_as_darts_prints_them():
    published_v2 = (
        "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
        "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], "
        "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
        "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])")
    assert repr(DARTS_GENOTYPES["DARTS_V2"]) == published_v2
    assert DARTS.parse(published_v2) == DARTS_GENOTYPES["DARTS_V2"]
    assert set(DARTS_GENOTYPES) >= {"DARTS_V1", "DARTS_V2", "NASNet", "AmoebaNet"}
    assert DARTS_GENOTYPES["NASNet"].reduce_concat == (4, 5, 6)
    # DARTS writes derived concats as range(2, 6); they parse to the same genotype.
    as_range = published_v2.replace("normal_concat=[2, 3, 4, 5]", "normal_concat=range(2, 6)")
    assert DARTS.parse(as_range) == DARTS_GENOTYPES["DARTS_V2"]


# --- paths, sampling, mutation --------------------------------------------------------------------
@pytest.mark.parametrize("space", [DARTS, NB201], ids=["darts", "nb201"])
def test_random_genotypes_fit_and_round_trip_through_paths(space):
    rng = random.Random(0)
    seen = set()
    for _ in range(50):
        g = space.random_genotype(rng)
        assert space.validate(g) == g
        assert space.from_paths(space.to_paths(g)) == g
        seen.add(g)
    assert len(seen) > 40


@pytest.mark.parametrize("space", [DARTS, NB201], ids=["darts", "nb201"])
def test_mutation_changes_exactly_one_edge(space):
    rng = random.Random(1)
    for _ in range(50):
        g = space.random_genotype(rng)
        child = space.mutate(g, rng)
        before, after = space.to_paths(g), space.to_paths(child)
        changed = sum(a != b for ct in space.cell_types for a, b in zip(before[ct], after[ct]))
        assert child != g and changed in (1, 2)  # an op change is 1 edge; moving an input is 2
        if space is NB201:
            assert changed == 1


def test_nb201_cells_share_a_signature_exactly_when_they_compute_the_same_function():
    # Every cell evaluated on one input, each op a fixed nonlinear map with f(0) = 0 (a convolution of
    # zeros counts as zero), identity for skip_connect, zero for none: two cells compute the same function
    # exactly when they get the same value, which must be when their signatures match.
    rng = np.random.default_rng(0)
    maps = {op: rng.normal(size=(8, 8)) for op in NB201_OPS if op not in ("none", "skip_connect")}

    def apply(op, v):
        return np.zeros_like(v) if op == "none" else v if op == "skip_connect" else np.tanh(maps[op] @ v)

    x = rng.normal(size=8)
    by_value, by_signature = {}, {}
    for k, path in enumerate(itertools.product(range(len(NB201_OPS)), repeat=NB201.num_edges)):
        genotype = NB201.from_paths({"cell": path})
        nodes = [x]
        for node in range(1, 4):
            nodes.append(sum(apply(NB201_OPS[path[e]], nodes[NB201.edges[e][1]]) for e in NB201.node_edges(node)))
        by_value.setdefault(tuple(np.round(nodes[3], 9)), set()).add(k)
        by_signature.setdefault(NB201.signature(genotype), set()).add(k)
    assert sorted(map(sorted, by_value.values())) == sorted(map(sorted, by_signature.values()))
    assert len(by_signature) < 15_625  # unused edges and skips do make cells equivalent


def test_darts_signature_ignores_the_order_of_a_nodes_inputs_only():
    g = DARTS_GENOTYPES["DARTS_V2"]
    swapped = g._replace(normal=[g.normal[1], g.normal[0]] + list(g.normal[2:]))
    assert swapped != g and DARTS.signature(swapped) == DARTS.signature(g)
    rng = random.Random(2)
    for _ in range(20):
        child = DARTS.mutate(g, rng)
        assert DARTS.signature(child) != DARTS.signature(g)


# --- derivation -----------------------------------------------------------------------------------
def test_darts_derivation_keeps_the_two_strongest_inputs_by_their_best_non_none_op():
    strengths = {ct: torch.full((14, 8), 0.1) for ct in ("normal", "reduce")}
    W = strengths["normal"]
    W[:, 0] = 0.9  # `none` dominates every edge and must be ignored
    # node 2 (edges 0, 1): both inputs; node 3 (edges 2, 3, 4): inputs 2 then 0
    W[0, 4], W[1, 7] = 0.5, 0.4
    W[2, 1], W[4, 6], W[3, 2] = 0.6, 0.7, 0.2
    # node 4 (edges 5..8) and node 5 (edges 9..13) keep input order on ties (DARTS's stable sort)
    W[8, 3] = 0.3
    W[13, 5] = 0.3
    g = get_space("darts").derive(strengths)
    assert g.normal == (("sep_conv_3x3", 0), ("dil_conv_5x5", 1),
                        ("dil_conv_3x3", 2), ("max_pool_3x3", 0),
                        ("skip_connect", 3), ("max_pool_3x3", 0),
                        ("sep_conv_5x5", 4), ("max_pool_3x3", 0))
    assert g.normal_concat == (2, 3, 4, 5)


def test_nb201_derivation_takes_the_argmax_of_every_edge_including_none():
    W = torch.zeros(6, 5)
    best = [0, 3, 1, 4, 2, 3]
    W[range(6), best] = 1.0
    g = NB201.derive({"cell": W})
    assert str(g) == "|none~0|+|nor_conv_3x3~0|skip_connect~1|+|avg_pool_3x3~0|nor_conv_1x1~1|nor_conv_3x3~2|"


def test_derivation_checks_the_weight_shapes():
    with pytest.raises(ValueError, match=r"shape \(6, 4\); expected \(6, 5\)"):
        NB201.derive({"cell": torch.zeros(6, 4)})
    with pytest.raises(ValueError, match="missing weights for cell type 'reduce'"):
        DARTS.derive({"normal": torch.zeros(14, 8)})


# --- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("Genotype(normal=[('sep_conv_3x3', 0)", "malformed genotype"),
    ("Gentype(normal=[], normal_concat=[], reduce=[], reduce_concat=[])", "expected 'Genotype"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('conv_9x9', 1)], normal_concat=[2], reduce=[('skip_connect', 0), "
     "('skip_connect', 1)], reduce_concat=[2])", "unknown op 'conv_9x9'"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 2)], normal_concat=[2], reduce=[('skip_connect', 0), "
     "('skip_connect', 1)], reduce_concat=[2])", "node 2 takes input 2"),
    ("Genotype(normal=[('sep_conv_3x3', 0)], normal_concat=[2], reduce=[], reduce_concat=[2])", "two per node"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('skip_connect', 1)], normal_concat=[2], reduce=[('skip_connect', 0), "
     "('skip_connect', 1)], reduce_concat=[7])", "reduce_concat names node 7"),
    # concat must name distinct intermediate nodes: inputs 0 and 1 are not results
    ("Genotype(normal=[('sep_conv_3x3', 0), ('skip_connect', 1)], normal_concat=[2], reduce=[('skip_connect', 0), "
     "('skip_connect', 1)], reduce_concat=[0, 2])", "reduce_concat names node 0"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('skip_connect', 1)], normal_concat=[2, 2], reduce=[('skip_connect', 0), "
     "('skip_connect', 1)], reduce_concat=[2])", "normal_concat names a node twice"),
    # a field that is not a list of pairs
    ("Genotype(normal=1, normal_concat=[2], reduce=[('skip_connect', 0), ('skip_connect', 1)], reduce_concat=[2])",
     "normal=1 is not a list"),
    ("Genotype(normal=1, ...)", "malformed genotype"),
    ("Genotype(normal='ab', normal_concat=[2], reduce=[], reduce_concat=[2])", "normal='ab' is not a list"),
    ("Genotype(normal=[('skip_connect', 0), ('skip_connect', 1)], normal_concat=5, reduce=[('skip_connect', 0), "
     "('skip_connect', 1)], reduce_concat=[2])", "normal_concat=5 is not a list"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('skip_connect', 1)], normal_concat=[2])", "missing fields"),
    # an expression where a literal belongs: our message, not the ast module's
    ("Genotype(normal=[('skip_connect', 0)] * 8, normal_concat=[2], reduce=[], reduce_concat=[2])",
     "malformed genotype .*fields must be literal lists"),
])
def test_malformed_darts_genotypes_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        DARTS.parse(text)


def test_a_huge_concat_range_is_refused_before_it_is_built():
    text = ("Genotype(normal=[('sep_conv_3x3', 0), ('skip_connect', 1)], normal_concat=range(0, 10**7), "
            "reduce=[('skip_connect', 0), ('skip_connect', 1)], reduce_concat=[2])").replace("10**7", str(10**12))
    started = time.perf_counter()
    with pytest.raises(ValueError, match=f"normal_concat names {10**12} nodes; at most"):
        DARTS.parse(text)
    assert time.perf_counter() - started < 0.5
    small = text.replace(f"range(0, {10**12})", "range(2, 3)")
    assert DARTS.parse(small).normal_concat == (2,)


def test_genotypes_that_do_not_fit_the_darts_search_space_are_named():
    with pytest.raises(ValueError, match="normal has 5 nodes; expected 4"):
        DARTS.validate(DARTS_GENOTYPES["NASNet"])
    twice = DARTS_GENOTYPES["DARTS_V2"]._replace(normal=[("sep_conv_3x3", 1)] * 2 + list(DARTS_GENOTYPES["DARTS_V2"].normal[2:]))
    with pytest.raises(ValueError, match="takes input 1 twice"):
        DARTS.validate(twice)
    sep7 = DARTS_GENOTYPES["DARTS_V2"]._replace(reduce=[("sep_conv_7x7", 0)] + list(DARTS_GENOTYPES["DARTS_V2"].reduce[1:]))
    with pytest.raises(ValueError, match="op 'sep_conv_7x7' in reduce is not one of"):
        DARTS.validate(sep7)


@pytest.mark.parametrize("text, message", [
    ("|nor_conv_3x3~0|+|nor_conv_3x3~0|", "2 nodes; expected 3"),
    ("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|conv_9x9~2|", "unknown op 'conv_9x9'"),
    ("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~2|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|",
     r"node 2 takes inputs \[0, 2\]"),
    ("|nor_conv_3x3-0|+|x~0|x~1|+|x~0|x~1|x~2|", "must look like 'op~input'"),
    ("nor_conv_3x3~0", "must look like '|op~input|...|'"),
])
def test_malformed_arch_strings_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        NB201.parse(text)


def test_nb201_genotype_prints_as_the_arch_string():
    text = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"
    g = NB201.parse(text)
    assert isinstance(g, NB201Genotype) and str(g) == text and repr(g) == f"NB201Genotype({text!r})"


def test_spaces_declare_how_a_cell_is_read_and_drawn():
    assert DARTS.output_nodes == (2, 3, 4, 5) and NB201.output_nodes == (3,)  # concat vs last node
    assert DARTS.node_labels == ["c_{k-2}", "c_{k-1}", "0", "1", "2", "3"]
    assert NB201.node_labels == ["0", "1", "2", "3"]
    assert (DARTS.cell_type(True), DARTS.cell_type(False), NB201.cell_type(False)) == ("reduce", "normal", "cell")
    states = [torch.full((1, 1, 2, 2), float(n)) for n in range(6)]
    assert DARTS.cell_output(states).flatten(1)[:, ::4].tolist() == [[2.0, 3.0, 4.0, 5.0]]
    assert NB201.cell_output(states[:4]) is states[3]
